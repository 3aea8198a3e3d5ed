"""One erase request off the wire: the fields (bounds checked), the image and the mask (size read from the file
header and bounded before any pixel is decoded), padded to the VAE's multiple, as a :class:`Job` for the batcher.

Statuses: 413 (body or pixels over the bound), 415 (not an image format the service reads, or not multipart/JSON),
422 (a field out of bounds, a missing or corrupt image, bad base64).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import math
import secrets
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import PIL.Image
import PIL.ImageOps
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ApiError

# formats the service decodes; others (and PIL's rarer, less-audited decoders) are 415
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
MAX_SEED = 2**63 - 1


class EraseParams(BaseModel):
    """The per-request call arguments of ``POST /v1/images/erase`` and their bounds (defaults: the reference's)."""

    model_config = ConfigDict(extra="forbid")

    num_inference_steps: int | None = Field(None, ge=1, description="denoising steps; default the config's "
                                            "default_steps (50), at most its max_steps (100)")
    strength: float = Field(0.8, gt=0, le=1, description="img2img strength: int(strength * steps) steps run")
    rm_guidance_scale: float = Field(9.0, ge=0, le=30, description="SARG scale s (0: plain blended inpainting)")
    ss_scale: float = Field(0.3, gt=0, le=1, description="similarity suppression lambda")
    ss_steps: int = Field(10, ge=0, le=1000, description="executed steps with suppression")
    inpaint_mode: Literal["sip", "dip"] = Field("sip", description="blended latents (sip) or DDIM inversion (dip)")
    paste_back: bool = Field(False, description="keep the original pixels outside the (dilated, feathered) mask")
    paste_back_blur_radius: float = Field(15.0, ge=0, le=64, description="feather of paste_back, in pixels")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random seed; default a random one (returned "
                             "in X-Seed)")

    def batch_key(self, height: int, width: int) -> tuple:
        """Requests with equal keys run as one pipeline call (everything but the seed and the pixels)."""
        return (height, width, self.num_inference_steps, self.strength, self.rm_guidance_scale, self.ss_scale,
                self.ss_steps, self.inpaint_mode, self.paste_back, self.paste_back_blur_radius)


@dataclass(eq=False)
class Job:
    """One request waiting for (or inside) a pipeline call."""

    params: EraseParams
    image: np.ndarray  # (H, W, 3) uint8, padded to the VAE multiple
    mask: np.ndarray  # (H, W) bool, padded with False
    size: tuple[int, int]  # the caller's (height, width): the result is cropped to it
    seed: int
    deadline: float  # loop.time() after which the caller gets 504
    key: tuple = ()
    enqueued: float = 0.0
    future: asyncio.Future | None = field(default=None, repr=False)


def invalid(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(422, message, "InvalidRequestError", code)


def parse_params(fields: dict[str, Any], default_steps: int, max_steps: int) -> EraseParams:
    """Validate the form/JSON fields; 422 naming each bad field and its bound."""
    try:
        params = EraseParams.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:6])
        raise invalid(f"invalid field(s): {problems}", "invalid_field") from exc
    steps = params.num_inference_steps or default_steps
    if steps > max_steps:
        raise invalid(f"num_inference_steps: {steps} is over this server's max_steps {max_steps}", "invalid_field")
    params.num_inference_steps = steps
    if int(params.strength * steps) < 1:
        raise invalid(f"strength {params.strength} x {steps} steps runs no step: raise either", "invalid_field")
    if params.seed is None:
        params.seed = secrets.randbits(63)
    return params


def b64_image(value: Any, name: str) -> bytes:
    """The bytes of a base64 (or ``data:image/...;base64,``) JSON field."""
    if not isinstance(value, str) or not value:
        raise invalid(f"`{name}` must be a base64 string (or a data: URL) of a PNG/JPEG/WebP file", "missing_field")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid(f"`{name}` is not valid base64: {exc}", "invalid_base64") from exc


def open_image(data: bytes, name: str, max_pixels: int) -> PIL.Image.Image:
    """Decode ``data`` after checking the header's size against ``max_pixels`` (413 before any pixel is read)."""
    if not data:
        raise invalid(f"`{name}` is empty: upload an image file", "missing_field")
    try:
        with warnings.catch_warnings():  # PIL's own, looser bomb bound: ours is checked just below
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            img = PIL.Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # lazy: reads the header only
    except PIL.Image.DecompressionBombError as exc:
        raise _too_many_pixels(name, None, max_pixels) from exc
    except PIL.UnidentifiedImageError as exc:
        raise ApiError(415, f"`{name}` is not an image this service reads (give {', '.join(IMAGE_FORMATS)})",
                       "UnsupportedMediaType", "unsupported_image") from exc
    except Exception as exc:  # a malformed header of a known format
        raise invalid(f"`{name}` could not be read: {exc}", "invalid_image") from exc
    if img.width * img.height > max_pixels:
        raise _too_many_pixels(name, (img.width, img.height), max_pixels)
    if img.width < 1 or img.height < 1:
        raise invalid(f"`{name}` is {img.width}x{img.height}: an empty image", "invalid_image")
    try:
        img.load()
        return PIL.ImageOps.exif_transpose(img)  # as a browser shows it (the page paints on that)
    except Exception as exc:  # truncated or corrupt pixel data
        raise invalid(f"`{name}` could not be decoded ({img.format}): {exc}", "invalid_image") from exc


def _too_many_pixels(name: str, size: tuple[int, int] | None, max_pixels: int) -> ApiError:
    what = f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels" if size else "far too many pixels"
    side = math.isqrt(max_pixels)
    return ApiError(413, f"`{name}` has {what}; this server takes at most {max_pixels} (e.g. {side}x{side}): "
                    "downscale it", "PayloadTooLarge", "too_many_pixels")


def to_job_arrays(image: PIL.Image.Image, mask: PIL.Image.Image, factor: int):
    """(image (H', W', 3) uint8, mask (H', W') bool, (H, W), mask_resized_from or None, mask_empty).

    Modes follow the pipelines (alpha over white; a mask's alpha where not opaque, else its luminance; white =
    remove). A mask of another size is resized to the image. Both are padded to a multiple of the VAE factor
    (edge pixels for the image, background for the mask) and the result is cropped back, so the answer has the
    upload's exact size.
    """
    from ...pipelines.attentive_eraser.inputs import pil_to_mask, pil_to_rgb

    try:
        rgb, m = pil_to_rgb(image, "image"), pil_to_mask(mask, "mask")
    except ValueError as exc:  # EraserInputError
        raise invalid(str(exc), "invalid_image") from exc
    resized = None
    if m.size != rgb.size:
        resized = m.size
        m = m.resize(rgb.size, PIL.Image.Resampling.BILINEAR)
    arr, mask_arr = np.asarray(rgb, dtype=np.uint8), np.asarray(m) >= 128
    h, w = arr.shape[:2]
    if min(h, w) < 8 * factor:
        raise invalid(f"the image is {w}x{h}: this model needs at least {8 * factor} pixels a side", "image_too_small")
    ph, pw = -h % factor, -w % factor
    if ph or pw:
        arr = np.pad(arr, ((0, ph), (0, pw), (0, 0)), mode="edge")
        mask_arr = np.pad(mask_arr, ((0, ph), (0, pw)))
    return arr, mask_arr, (h, w), resized, not bool(mask_arr.any())


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
