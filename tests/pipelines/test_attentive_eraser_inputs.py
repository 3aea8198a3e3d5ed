"""Attentive Eraser inputs as users have them: PIL images of every mode (RGBA, P, L, CMYK, 16-bit), multi-channel
and alpha masks, numpy / torch channel layouts; and what is refused with ``EraserInputError``: NaN/inf, a float
image in 0..255, empty batches, an image over the pixel bound (before anything is converted or encoded)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from serve_unlearn.errors import EraserInputError
from serve_unlearn.pipelines import AE_PRESET_SD, StableDiffusionAttentiveEraserPipeline
from serve_unlearn.pipelines.attentive_eraser.inputs import (
    DEFAULT_MAX_PIXELS,
    as_processor_input,
    pil_to_mask,
    pil_to_rgb,
)
from serve_unlearn.testing.tiny_sd import tiny_sd_components

H = W = 32


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    p = StableDiffusionAttentiveEraserPipeline(**tiny_sd_components(tmp_path_factory.mktemp("tok")),
                                               scheduler=AE_PRESET_SD.scheduler())
    p.set_progress_bar_config(disable=True)
    return p


def _rgb_array(seed=0):
    return (np.random.default_rng(seed).random((H, W, 3)) * 255).astype(np.uint8)


def _mask_array():
    m = np.zeros((H, W), np.uint8)
    m[8:20, 10:24] = 255
    return m


def _erase(pipe, image, mask, **kw):
    kw = {"num_inference_steps": 2, "mask_dilation": 0, "output_type": "np", **kw}
    return pipe(image, mask, generator=torch.Generator().manual_seed(0), **kw).images


@pytest.fixture(scope="module")
def rgb_result(pipe):
    """The result for the plain RGB image and L mask: every equivalent input must give exactly this."""
    return _erase(pipe, PIL.Image.fromarray(_rgb_array()), PIL.Image.fromarray(_mask_array()))


def test_pil_modes_of_the_same_photo_give_the_same_result(pipe, rgb_result):
    rgb = PIL.Image.fromarray(_rgb_array())
    mask = PIL.Image.fromarray(_mask_array())
    opaque_rgba = rgb.convert("RGBA")
    for image in (opaque_rgba, rgb.convert("CMYK").convert("RGB")):  # no crash, same pixels
        np.testing.assert_array_equal(_erase(pipe, image, mask), rgb_result)
    for mode in ("RGB", "RGBA", "LA", "P", "1", "I;16"):  # masks of every mode: same result
        m = mask.convert(mode) if mode != "I;16" else PIL.Image.fromarray(_mask_array().astype(np.uint16) * 257)
        np.testing.assert_array_equal(_erase(pipe, rgb, m), rgb_result, err_msg=mode)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "LA", "1", "I;16", "YCbCr", "PA"])
def test_every_photo_mode_runs(pipe, mode):
    rgb = PIL.Image.fromarray(_rgb_array())
    image = (PIL.Image.fromarray(_rgb_array()[..., 0].astype(np.uint16) * 257) if mode == "I;16"
             else rgb.convert(mode))
    out = _erase(pipe, image, PIL.Image.fromarray(_mask_array()))
    assert out.shape == (1, H, W, 3) and np.isfinite(out).all()


def test_alpha_is_composited_over_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red-ish, fully transparent on the left half
    rgba[:, 2:, 3] = 255
    out = np.asarray(pil_to_rgb(PIL.Image.fromarray(rgba, "RGBA")))
    assert (out[:, :2] == 255).all()
    assert (out[:, 2:] == (200, 0, 0)).all()
    p = PIL.Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    assert np.asarray(pil_to_rgb(p)).tolist() == [[[255, 255, 255], [10, 20, 30]]]


def test_mask_alpha_is_the_mask_when_not_opaque():
    stroke = np.zeros((4, 4, 4), np.uint8)
    stroke[1:3, 1:3] = (255, 0, 0, 255)  # a red stroke on a transparent layer: alpha is the mask
    m = np.asarray(pil_to_mask(PIL.Image.fromarray(stroke, "RGBA")))
    assert (m[1:3, 1:3] == 255).all() and m.sum() == 4 * 255
    opaque = np.full((4, 4, 4), 255, np.uint8)
    opaque[..., :3] = 0
    opaque[0, 0, :3] = 255  # opaque black with one white pixel: luminance is the mask
    assert np.asarray(pil_to_mask(PIL.Image.fromarray(opaque, "RGBA"))).tolist()[0][:2] == [255, 0]


def test_arrays_and_tensors_of_every_layout_match_pil(pipe, rgb_result):
    arr, mask = _rgb_array(), _mask_array()
    mask_f = mask.astype(np.float32) / 255
    t = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    cases = [
        (arr, mask), (arr[None], mask[None]), (arr, np.repeat(mask[..., None], 3, -1)),  # HWC mask, 3 channels
        (np.dstack([arr, np.full((H, W), 255, np.uint8)]), np.dstack([mask] * 4)),  # opaque RGBA image and mask
        (t, torch.from_numpy(mask_f)), (t[None], torch.from_numpy(mask_f)[None, None].repeat(1, 3, 1, 1)),
        (t * 2 - 1, torch.from_numpy(mask_f) > 0.5),  # [-1, 1] image (diffusers' convention), bool mask
        (arr.astype(np.float32) / 255, mask_f),
    ]
    for i, (image, m) in enumerate(cases):
        np.testing.assert_allclose(_erase(pipe, image, m), rgb_result, atol=2e-6, err_msg=f"case {i}")


def test_grey_array_is_repeated_to_rgb():
    grey = np.arange(16, dtype=np.uint8).reshape(4, 4)
    out = as_processor_input(grey, "image")
    assert out.shape == (1, 3, 4, 4) and torch.equal(out[0, 0], out[0, 2])


@pytest.mark.parametrize(("image", "mask", "match"), [
    (lambda: torch.full((1, 3, H, W), float("nan")), None, "NaN"),
    (None, lambda: _nan_mask(), "1 NaN"),
    (lambda: torch.rand(1, 3, H, W) * 255, None, "divide 0..255 data by 255"),
    (None, lambda: torch.rand(1, 1, H, W) * 255, "mask must lie in"),
    (None, lambda: -torch.rand(1, 1, H, W), "mask must lie in"),
    (lambda: torch.rand(1, 3, H, W) * 3 - 2, None, r"\[0, 1\] or \[-1, 1\]"),
    (lambda: torch.empty(0, 3, H, W), None, "empty batch"),
    (lambda: np.zeros((0, H, W, 3), np.uint8), None, "empty batch"),
    (list, None, "empty list"),
    (None, list, "empty list"),
    (lambda: torch.rand(1, 5, H, W), None, "5 channels"),
    (lambda: torch.randint(0, 255, (1, 3, H, W)), None, "int64 tensor"),
    (lambda: np.zeros((H, W, 3), np.int32), None, "int32 array"),
    (lambda: PIL.Image.new("F", (W, H)), None, "32-bit float"),
    (lambda: [torch.rand(3, H, W), torch.rand(3, H, 2 * W)], None, "several sizes"),
    (lambda: [torch.rand(3, H, W), np.zeros((H, W, 3))], None, "mixes"),
    (lambda: "photo.png", None, "got str"),
])
def test_bad_inputs_are_refused_with_what_was_expected(pipe, image, mask, match):
    image = image() if image else PIL.Image.fromarray(_rgb_array())
    mask = mask() if mask else PIL.Image.fromarray(_mask_array())
    with pytest.raises(EraserInputError, match=match):
        _erase(pipe, image, mask)


def _nan_mask():
    m = torch.zeros(1, 1, H, W)
    m[0, 0, 5, 5] = float("nan")
    return m


def test_pixel_bound_refuses_before_converting_and_is_adjustable(pipe, monkeypatch):
    """A 4000x4000 image is refused before anything is converted or encoded (no 3 GB spike); a smaller bound is
    enforced per pipeline and ``None`` lifts it."""
    assert 2048 * 2048 == DEFAULT_MAX_PIXELS
    calls = []
    monkeypatch.setattr(pipe, "_encode_vae_image", lambda *a, **k: calls.append(1))
    big = torch.zeros(1, 3, 4000, 4000).expand(1, 3, 4000, 4000)  # no real memory: an expanded view
    with pytest.raises(EraserInputError, match="4000x4000 = 16000000 pixels is over .* 4194304"):
        _erase(pipe, big, torch.zeros(1, 1, 4000, 4000).expand(1, 1, 4000, 4000))
    assert calls == []
    monkeypatch.undo()
    pipe.ae_max_pixels = 24 * 24
    try:
        with pytest.raises(EraserInputError, match="ae_max_pixels"):
            _erase(pipe, PIL.Image.fromarray(_rgb_array()), PIL.Image.fromarray(_mask_array()))
        out = _erase(pipe, PIL.Image.fromarray(_rgb_array()), PIL.Image.fromarray(_mask_array()), height=24, width=24)
        assert out.shape == (1, 24, 24, 3)
        pipe.ae_max_pixels = None
        assert _erase(pipe, PIL.Image.fromarray(_rgb_array()), PIL.Image.fromarray(_mask_array())).shape[1] == H
    finally:
        pipe.ae_max_pixels = DEFAULT_MAX_PIXELS


def test_one_nan_pixel_never_reaches_the_output(pipe):
    image = torch.rand(1, 3, H, W)
    image[0, 1, 3, 3] = float("nan")
    with pytest.raises(EraserInputError, match="1 NaN/inf"):
        _erase(pipe, image, torch.from_numpy(_mask_array() / 255.0).float())
