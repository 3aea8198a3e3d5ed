"""The images and masks a caller gives a pipeline: checked, normalised for diffusers' processors, batched.

What is accepted (everything else raises :class:`~serve_unlearn.errors.EraserInputError` saying what was expected):

- **PIL images** of any mode a photo comes in. Images become RGB: ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``,
  ``LAB``, ``HSV`` are converted; an alpha channel (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``P`` with transparency) is
  composited over white; 16-bit greyscale (``I;16``, ``I`` within 0..65535) is scaled to 8 bits. Masks become one
  channel: a mask whose alpha channel is not fully opaque uses its alpha as the mask (opaque = remove: a brush
  stroke painted on a transparent layer); any other mask uses its luminance (white = remove). 32-bit float
  (``F``) images are refused.
- **numpy arrays**, channels last: ``HW``, ``HWC`` and ``BHWC`` with C = 1 (grey), 2 (grey + alpha), 3 (RGB) or 4
  (RGBA); for masks also ``BHW``. uint8 is 0..255, uint16 0..65535, bool 0/1; floats must lie in [0, 1].
- **torch tensors**, channels first: ``HW``, ``CHW`` and ``BCHW`` with C = 1..4 as above (a 3-d mask tensor is a
  batch of ``HW`` masks); float (images: [0, 1], or [-1, 1] as diffusers accepts) or bool; integer tensors are
  ambiguous and refused. NaN/inf, values outside the range (e.g. a float image in 0..255), meta tensors and empty
  batches are refused.

Arrays and tensors leave here as float32 CPU tensors (images ``(B, 3, H, W)`` in [0, 1], masks ``(B, 1, H, W)``);
PIL images as a list of RGB / L images, so diffusers resizes them as it always does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch

from ...errors import EraserInputError

# Images larger than this many pixels (height x width, per image) are refused before anything is encoded: a
# 2048 x 2048 SDXL image takes ~8 GB in fp16 at the VAE; 4000 x 4000 would take ~30 GB. Set ``pipe.ae_max_pixels``.
DEFAULT_MAX_PIXELS = 2048 * 2048
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_TOL = 1e-3  # float slack on the [0, 1] / [-1, 1] ranges
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")


def _has_alpha(img: PIL.Image.Image) -> bool:
    return img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)


def _sixteen_bit(img: PIL.Image.Image, name: str) -> PIL.Image.Image:
    """``I;16*`` / ``I`` images as 8-bit ``L`` (scaled, not clipped as PIL's own conversion does)."""
    arr = np.asarray(img)
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise EraserInputError(f"{name} is a 32-bit integer image (mode {img.mode}) with values outside 0..65535: "
                               "give an 8- or 16-bit image")
    return PIL.Image.fromarray(np.round(arr.astype(np.float64) / 257.0).astype(np.uint8), mode="L")


def pil_to_rgb(img: PIL.Image.Image, name: str = "image") -> PIL.Image.Image:
    """An RGB copy of ``img``: alpha composited over white, 16-bit greyscale scaled, other modes converted."""
    if img.mode == "RGB":
        return img
    if img.mode == "F":
        raise EraserInputError(f"{name} is a 32-bit float image (mode F): give an 8- or 16-bit image")
    if img.mode.startswith("I"):
        img = _sixteen_bit(img, name)
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise EraserInputError(f"{name} has mode {img.mode!r}, which cannot be converted to RGB: {exc}") from exc


def pil_to_mask(img: PIL.Image.Image, name: str = "mask_image") -> PIL.Image.Image:
    """A one-channel (``L``) copy of a mask: its alpha where the alpha is not fully opaque, else its luminance."""
    if img.mode == "L":
        return img
    if img.mode == "F":
        raise EraserInputError(f"{name} is a 32-bit float image (mode F): give an 8-bit mask (white = remove)")
    if img.mode.startswith("I"):
        return _sixteen_bit(img, name)
    if _has_alpha(img):
        alpha = img.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha
        return img.convert("RGBA").convert("L")
    try:
        return img.convert("L")
    except ValueError as exc:
        raise EraserInputError(f"{name} has mode {img.mode!r}, which cannot be converted to a mask: {exc}") from exc


def image_size(x: Any) -> tuple[int, int] | None:
    """(height, width) of an image or mask input in the conventions above, or of the first item of a list."""
    if isinstance(x, (list, tuple)):
        return image_size(x[0]) if x else None
    if isinstance(x, PIL.Image.Image):
        return x.height, x.width
    if isinstance(x, torch.Tensor):
        return tuple(x.shape[-2:]) if x.dim() >= 2 else None
    if isinstance(x, np.ndarray):
        if x.ndim == 2:
            return x.shape
        if x.ndim == 3:
            return x.shape[:2] if x.shape[-1] <= 4 else x.shape[1:]
        if x.ndim == 4:
            return x.shape[1:3]
    return None


def input_size(x: Any, name: str) -> tuple[int, int]:
    """``image_size`` for a call's input, or EraserInputError saying what a usable input is."""
    if isinstance(x, (list, tuple)) and not x:
        raise EraserInputError(f"{name} is an empty list: give at least one image")
    first = x[0] if isinstance(x, (list, tuple)) else x
    if not isinstance(first, (PIL.Image.Image, np.ndarray, torch.Tensor)):
        raise EraserInputError(f"{name} must be a PIL image, a numpy array, a torch tensor or a list of them; got "
                               f"{type(first).__name__}")
    hw = image_size(x)
    if hw is None:
        raise EraserInputError(f"cannot read the size of {name}: give HxW, CxHxW or BxCxHxW tensors, HxW(xC) "
                               "arrays or PIL images")
    return int(hw[0]), int(hw[1])


def _as_unit_float(x: torch.Tensor, name: str, is_mask: bool) -> torch.Tensor:
    """A float32 CPU tensor in [0, 1], refusing NaN/inf and values outside the documented range."""
    x = x.detach().to("cpu", torch.float32)
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        raise EraserInputError(f"{name} holds {int(bad.sum())} NaN/inf value(s): give finite values "
                               f"({'0..1, 1 = remove' if is_mask else 'in [0, 1]'})")
    lo, hi = float(x.min()), float(x.max())
    if hi > 1 + _TOL:
        raise EraserInputError(f"{name} has values up to {hi:g} but a float {'mask' if is_mask else 'image'} must lie "
                               "in [0, 1]: divide 0..255 data by 255, or pass uint8")
    if lo < -_TOL:
        if is_mask or lo < -1 - _TOL:
            raise EraserInputError(f"{name} has values down to {lo:g}: a float "
                                   f"{'mask must lie in [0, 1]' if is_mask else 'image must lie in [0, 1] or [-1, 1]'}")
        x = (x + 1) / 2  # diffusers' convention: a negative image is in [-1, 1]
    return x.clamp(0, 1)


def _channels(x: torch.Tensor, name: str, is_mask: bool) -> torch.Tensor:
    """(B, C, H, W) with C in 1..4 -> images (B, 3, H, W) (grey repeated, alpha over white), masks (B, 1, H, W)."""
    c = x.shape[1]
    if not 1 <= c <= 4:
        raise EraserInputError(f"{name} has {c} channels: give 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA)")
    colour, alpha = (x[:, : c - 1], x[:, c - 1 :]) if c in (2, 4) else (x, None)
    if is_mask:
        if alpha is not None and bool((alpha < 1).any()):
            return alpha
        if colour.shape[1] == 3:
            w = torch.tensor(_LUMA).view(1, 3, 1, 1)
            return (colour * w).sum(1, keepdim=True)
        return colour
    if colour.shape[1] == 1:
        colour = colour.repeat(1, 3, 1, 1)
    if alpha is not None:
        colour = colour * alpha + (1 - alpha)
    return colour


def _array_to_tensor(x: np.ndarray, name: str, is_mask: bool) -> torch.Tensor:
    if x.dtype == bool:
        t = torch.from_numpy(x.astype(np.float32))
    elif x.dtype == np.uint8:
        t = torch.from_numpy(x.astype(np.float32) / 255.0)
    elif x.dtype == np.uint16:
        t = torch.from_numpy(x.astype(np.float32) / 65535.0)
    elif np.issubdtype(x.dtype, np.floating):
        t = _as_unit_float(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), name, is_mask)
    else:
        raise EraserInputError(f"{name} is a {x.dtype} array: give floats in [0, 1], uint8 (0..255), uint16 or bool")
    if t.dim() == 2:
        t = t[None, :, :, None]
    elif t.dim() == 3:
        t = t[None] if t.shape[-1] <= 4 else (t[..., None] if is_mask else None)
        if t is None:
            raise EraserInputError(f"{name} is a {x.shape} array: images are HxW, HxWxC or BxHxWxC (channels last, "
                                   "C <= 4)")
    elif t.dim() != 4:
        raise EraserInputError(f"{name} is a {x.ndim}-d array: give HxW, HxWxC or BxHxWxC (channels last)")
    return _channels(t.permute(0, 3, 1, 2), name, is_mask)


def _tensor_to_tensor(x: torch.Tensor, name: str, is_mask: bool) -> torch.Tensor:
    if x.is_meta:
        raise EraserInputError(f"{name} is a meta tensor (no data): load or materialise it first")
    if x.dtype == torch.bool:
        x = x.float()
    elif not x.is_floating_point():
        raise EraserInputError(
            f"{name} is a {x.dtype} tensor: give a float tensor in [0, 1] (channels first), a bool mask, a PIL "
            "image or a numpy array"
        )
    x = _as_unit_float(x, name, is_mask)
    if x.dim() == 2:
        x = x[None, None]
    elif x.dim() == 3:
        x = x[:, None] if is_mask else x[None]  # a 3-d mask is a batch of HxW masks; a 3-d image is CxHxW
    elif x.dim() != 4:
        raise EraserInputError(f"{name} is a {x.dim()}-d tensor: give HxW, CxHxW or BxCxHxW (channels first)")
    return _channels(x, name, is_mask)


def _check_not_empty(x: np.ndarray | torch.Tensor, name: str) -> None:
    if 0 in tuple(x.shape):
        raise EraserInputError(f"{name} has shape {tuple(x.shape)}: an empty batch or an empty image; give at least "
                               "one image of at least one pixel")


def as_processor_input(x: Any, name: str, is_mask: bool | None = None) -> Any:
    """Check an image/mask input and normalise it for diffusers' processors (see the module docstring).

    ``is_mask`` defaults to ``name`` containing "mask". Returns a list of PIL images (RGB, or L for masks) or a
    float32 CPU tensor ``(B, C, H, W)`` in [0, 1] with C = 3 (images) or 1 (masks).
    """
    is_mask = "mask" in name if is_mask is None else is_mask
    if isinstance(x, (list, tuple)):
        if not x:
            raise EraserInputError(f"{name} is an empty list: give at least one image")
        kinds = {type(e) for e in x}
        if len(kinds) > 1 and not all(issubclass(k, PIL.Image.Image) for k in kinds):
            raise EraserInputError(f"{name} mixes {sorted(k.__name__ for k in kinds)}: give one kind per list")
        items = [as_processor_input(e, f"{name}[{i}]", is_mask) for i, e in enumerate(x)]
        if isinstance(items[0], list):
            return [im for item in items for im in item]
        sizes = {tuple(t.shape[-2:]) for t in items}
        if len(sizes) > 1:
            raise EraserInputError(f"{name} holds arrays of several sizes {sorted(sizes)}: give one size per batch "
                                   "(or PIL images, which are resized)")
        return torch.cat(items)
    if isinstance(x, PIL.Image.Image):
        if x.width == 0 or x.height == 0:
            raise EraserInputError(f"{name} is {x.width}x{x.height}: an empty image")
        return [pil_to_mask(x, name) if is_mask else pil_to_rgb(x, name)]
    if isinstance(x, torch.Tensor):
        _check_not_empty(x, name)
        return _tensor_to_tensor(x, name, is_mask)
    if isinstance(x, np.ndarray):
        _check_not_empty(x, name)
        return _array_to_tensor(x, name, is_mask)
    raise EraserInputError(f"{name} must be a PIL image, a numpy array, a torch tensor or a list of them; got "
                           f"{type(x).__name__}")


def check_pixels(height: int, width: int, max_pixels: int | None) -> None:
    """Refuse a working size over ``max_pixels`` (per image) before anything is converted or encoded."""
    if max_pixels is not None and height * width > max_pixels:
        raise EraserInputError(
            f"{height}x{width} = {height * width} pixels is over this pipeline's limit of {max_pixels} "
            f"(pipe.ae_max_pixels): downscale the image or pass smaller height/width"
        )


def expand_batch(t: torch.Tensor, n: int, per_item: int, what: str) -> torch.Tensor:
    """Tile ``t`` (leading dim dividing ``n``) to ``n`` items, then repeat each item ``per_item`` times."""
    if n % t.shape[0]:
        raise EraserInputError(f"{t.shape[0]} {what} cannot be matched to a batch of {n}: give 1 or {n}")
    return t.repeat(n // t.shape[0], *([1] * (t.dim() - 1))).repeat_interleave(per_item, dim=0)
