"""Attentive Eraser: processors (every backend vs the reference and vs the reference's own two-softmax form), mask
pyramid and dilation, layer selection, the SD and SDXL pipelines, bad input, SalUn on the pipeline's UNet, and the
``erase`` CLI. Tiny components built offline (a byte-level CLIP tokenizer written here), 64 px, 2-4 steps."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from serve_unlearn.errors import EraserInputError, UnsupportedModelError
from serve_unlearn.kernels import is_triton_available
from serve_unlearn.pipelines import (
    AE_PRESET_SD,
    AE_PRESET_SDXL,
    AttentionRedirectionState,
    AttentiveEraserCFGSelfAttnProcessor,
    AttentiveEraserSelfAttnProcessor,
    StableDiffusionAttentiveEraserPipeline,
    StableDiffusionXLAttentiveEraserPipeline,
    build_mask_pyramid,
)
from serve_unlearn.pipelines.attentive_eraser import (
    dilate_mask,
    resolve_applied_layers,
    self_attention_layers,
)
from serve_unlearn.testing.tiny_sd import (
    tiny_sd_components,
    tiny_sdxl_components,
    tiny_text_encoder,
    tiny_vae,
)

LOGGER = "serve_unlearn.pipelines.attentive_eraser"


# -- tiny components (serve_unlearn.testing.tiny_sd) ---------------------------------------------------------
@pytest.fixture(scope="module")
def sd_components(tmp_path_factory):
    return tiny_sd_components(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def sdxl_components(tmp_path_factory):
    return tiny_sdxl_components(tmp_path_factory.mktemp("tokxl"))


@pytest.fixture
def sd_pipe(sd_components):
    pipe = StableDiffusionAttentiveEraserPipeline(**sd_components, scheduler=AE_PRESET_SD.scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sdxl_pipe(sdxl_components):
    pipe = StableDiffusionXLAttentiveEraserPipeline(**sdxl_components, scheduler=AE_PRESET_SDXL.scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(h=64, w=64, n=1, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _mask(h=64, w=64, box=(16, 40, 20, 44)):
    m = torch.zeros(1, 1, h, w)
    m[..., box[0]:box[1], box[2]:box[3]] = 1
    return m


def _run(pipe, image=None, mask=None, seed=1, **kw):
    kw = {"num_inference_steps": 4, "strength": 0.75, "mask_dilation": 0, "output_type": "latent", **kw}
    gen = [torch.Generator().manual_seed(s) for s in seed] if isinstance(seed, list) else torch.Generator().manual_seed(seed)
    return pipe(_image() if image is None else image, _mask() if mask is None else mask, generator=gen, **kw).images


def _capture(store):
    """A callback that records the image latents and latent mask the pipeline blends with."""
    def cb(pipe, i, t, kwargs):
        store.update(kwargs)
        return {}
    return cb


# -- processors ------------------------------------------------------------------------------------------------
B, N, C, HEADS = 2, 16 * 16, 32, 2


def _attn():
    torch.manual_seed(0)
    return Attention(query_dim=C, heads=HEADS, dim_head=C // HEADS).eval()


def _fg_masks():
    """Two different foreground masks over a 16x16 token grid: (B, N) bool."""
    fg = torch.zeros(B, 16, 16, dtype=torch.bool)
    fg[0, 4:10, 3:12] = True
    fg[1, 9:15, 8:16] = True
    return fg.flatten(1)


def _state(fg, ss_active, backend="reference", lam=0.3):
    state = AttentionRedirectionState({N: fg}, ss_scale=lam, backend=backend)
    state.set_step(0, active=True, ss_active=ss_active)
    return state


def _available_backends():
    backends = ["reference", "sdpa_mask", "sdpa_gather", "auto"]
    if is_triton_available() and os.environ.get("TRITON_INTERPRET") == "1":
        backends.append("triton")
    return backends


@pytest.mark.parametrize("ss_active", [True, False])
@pytest.mark.parametrize("backend", _available_backends())
def test_every_backend_equals_reference(backend, ss_active):
    attn, fg = _attn(), _fg_masks()
    x = torch.randn(2 * B, N, C)
    with torch.no_grad():
        ref = AttentiveEraserSelfAttnProcessor(_state(fg, ss_active))(attn, x)
        out = AttentiveEraserSelfAttnProcessor(_state(fg, ss_active, backend))(attn, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa_gather", "sdpa_mask", "triton"])
def test_fp16_cuda_backends_match_fp32_reference(backend):
    if backend == "triton" and not is_triton_available():
        pytest.skip("triton is not installed")
    attn, fg = _attn(), _fg_masks()
    x = torch.randn(2 * B, N, C)
    with torch.no_grad():
        ref = AttentiveEraserSelfAttnProcessor(_state(fg, True))(attn, x)
        out = AttentiveEraserSelfAttnProcessor(_state(fg.cuda(), True, backend))(attn.cuda().half(), x.cuda().half())
    torch.testing.assert_close(out.float().cpu(), ref, atol=1e-2, rtol=1e-2)  # fp16 projections too


def _ae_two_softmax(q, k, v, m, lam, ss):
    """The reference's ASS, written from its description independently of the package: both maps for every
    query (lambda * sim + bias and sim + bias, the bias finfo.min on foreground keys), then rows picked by m."""
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
    bias = torch.zeros_like(m, dtype=sim.dtype).masked_fill(m, torch.finfo(sim.dtype).min)[:, None, None, :]
    out_bg = torch.einsum("bhij,bhjd->bhid", (sim + bias).softmax(-1), v)
    if not ss:
        return out_bg
    out_fg = torch.einsum("bhij,bhjd->bhid", (lam * sim + bias).softmax(-1), v)
    rows = m[:, None, :, None].to(sim.dtype)
    return out_fg * rows + out_bg * (1 - rows)


@pytest.mark.parametrize("ss_active", [True, False])
def test_matches_the_reference_two_softmax_formulation(ss_active):
    attn, fg = _attn(), _fg_masks()
    x = torch.randn(2 * B, N, C)
    with torch.no_grad():
        out = AttentiveEraserSelfAttnProcessor(_state(fg, ss_active, "auto"))(attn, x)
        q, k, v = (f(x).view(2 * B, N, HEADS, -1).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
        plain = F.softmax(q[:B] @ k[:B].transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v[:B]
        redirected = _ae_two_softmax(q[B:], k[B:], v[B:], fg, 0.3, ss_active)
        expected = torch.cat([plain, redirected]).transpose(1, 2).reshape(2 * B, N, C)
        expected = attn.to_out[0](expected)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_plain_chunks_and_empty_mask_equal_attnprocessor2_0():
    attn = _attn()
    x = torch.randn(3 * B, N, C)
    with torch.no_grad():
        stock = AttnProcessor2_0()(attn, x)
        cfg = AttentiveEraserCFGSelfAttnProcessor(_state(_fg_masks(), True))(attn, x)
        empty = AttentiveEraserCFGSelfAttnProcessor(_state(torch.zeros(B, N, dtype=torch.bool), False, "auto"))(attn, x)
    torch.testing.assert_close(cfg[: 2 * B], stock[: 2 * B], atol=1e-6, rtol=0)  # [uncond, cond] untouched
    assert (cfg[2 * B :] - stock[2 * B :]).abs().max() > 1e-3  # the redirected chunk is not
    torch.testing.assert_close(empty, stock, atol=1e-6, rtol=0)  # no foreground, no SS: plain attention


def test_all_foreground_level_falls_back_to_plain_attention_with_one_warning(caplog):
    attn = _attn()
    fg = _fg_masks()
    fg[1] = True  # sample 1 is foreground everywhere: no key left
    x = torch.randn(2 * B, N, C)
    proc = AttentiveEraserSelfAttnProcessor(_state(fg, True, "auto"))
    with caplog.at_level(logging.WARNING, logger=LOGGER), torch.no_grad():
        out = proc(attn, x)
        proc(attn, x)
        stock = AttnProcessor2_0()(attn, x)
        alone = AttentiveEraserSelfAttnProcessor(_state(fg[:1], True, "reference"))(attn, x[[0, 2]])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[3], stock[3], atol=1e-6, rtol=0)  # the fallback sample: plain attention
    torch.testing.assert_close(out[2], alone[1], atol=1e-5, rtol=1e-5)  # the other one still redirected
    assert sum("covers the whole" in r.message for r in caplog.records) == 1


def test_inactive_state_is_plain_attention():
    attn = _attn()
    state = _state(_fg_masks(), True)
    state.set_step(5, active=False, ss_active=True)
    x = torch.randn(2 * B, N, C)
    with torch.no_grad():
        torch.testing.assert_close(AttentiveEraserSelfAttnProcessor(state)(attn, x), AttnProcessor2_0()(attn, x),
                                   atol=1e-6, rtol=0)
    assert not state.ss_active


# -- masks -----------------------------------------------------------------------------------------------------
def test_mask_pyramid_levels_batches_and_non_square():
    mask = torch.zeros(2, 1, 64, 96)
    mask[0, :, 8:20, 10:30] = 1
    mask[1, :, 40:64, 60:96] = 1
    pyr = build_mask_pyramid(mask, vae_scale_factor=2, n_levels=3)
    assert sorted(pyr) == [8 * 12, 16 * 24, 32 * 48]
    for n, factor in ((32 * 48, 2), (16 * 24, 4), (8 * 12, 8)):  # the reference's direct max-pool when sizes divide
        direct = F.max_pool2d(mask, factor).flatten(1) > 0.5
        assert torch.equal(pyr[n], direct)
    assert not torch.equal(pyr[384][0], pyr[384][1])
    odd = build_mask_pyramid(torch.ones(1, 1, 40, 24), vae_scale_factor=8, n_levels=3)  # 5x3 -> 3x2 -> 2x1
    assert sorted(odd) == [2, 6, 15]


def _torchvision_blur(mask: np.ndarray, k: int) -> np.ndarray:
    """torchvision's gaussian_blur by hand: 2-D kernel (outer product), reflect padding, sigma = 0.15k + 0.35."""
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    x = np.linspace(-(k - 1) / 2, (k - 1) / 2, k)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    g /= g.sum()
    kernel = np.outer(g, g)
    padded = np.pad(mask, k // 2, mode="reflect")
    h, w = mask.shape
    out = np.zeros_like(mask, dtype=np.float64)
    for dy in range(k):
        for dx in range(k):
            out += kernel[dy, dx] * padded[dy : dy + h, dx : dx + w]
    return out


@pytest.mark.parametrize(("k", "size"), [(13, 64), (77, 128)])
def test_dilation_is_the_reference_blur_and_threshold(k, size):
    m = np.zeros((size, size))
    m[size // 4 : size // 2, size // 3 : size // 2 + 5] = 1
    ours = dilate_mask(torch.from_numpy(m).float()[None, None], k)[0, 0].numpy()
    expected = (_torchvision_blur(m, k) >= 0.1).astype(np.float32)
    assert (ours != expected).sum() == 0
    assert ours.sum() > m.sum()
    assert AE_PRESET_SD.blur_kernel_for(512, 512) == 13 and AE_PRESET_SDXL.blur_kernel_for(1024, 1024) == 77
    with pytest.raises(EraserInputError):
        dilate_mask(torch.zeros(1, 1, 8, 8), 21)


# -- layer selection -------------------------------------------------------------------------------------------
def test_layer_selection_regex_and_block_index(sd_pipe, sdxl_pipe):
    unet = sd_pipe.unet
    up = {f"up_blocks.0.attentions.{i}.transformer_blocks.0.attn1" for i in range(2)}
    assert set(resolve_applied_layers(unet, ["up"])) == up
    assert resolve_applied_layers(unet, ("block_index", tuple(range(2, 4)))) == sorted(up)
    assert resolve_applied_layers(unet, ["mid"]) == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    for bad in (["down_blocks.0"], ["mid_block.attentions.1"], ("block_index", (99,))):
        with pytest.raises(EraserInputError):
            resolve_applied_layers(unet, bad)
    with pytest.raises(EraserInputError):
        sd_pipe.set_ae_applied_layers([3])
    xl = sdxl_pipe.unet  # 2 transformer layers per attention in the deep blocks: down 0-1, mid 2-3, up 4-7
    assert len(self_attention_layers(xl)) == 8
    assert resolve_applied_layers(xl, ("block_index", tuple(range(4, 8)))) == resolve_applied_layers(xl, ["up"])


def test_block_index_reproduces_the_reference_numbering_on_full_size_configs():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # the real SD 1.5 and SDXL layouts, no memory
        sd = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768)
        xl = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    for unet, preset, total in ((sd, AE_PRESET_SD, 16), (xl, AE_PRESET_SDXL, 70)):
        assert len(self_attention_layers(unet)) == total
        assert resolve_applied_layers(unet, ("block_index", tuple(preset.block_index))) == \
            resolve_applied_layers(unet, ["up"])


# -- pipelines -------------------------------------------------------------------------------------------------
def test_scale_zero_equals_diffusers_blended_inpaint(sd_pipe):
    from diffusers import StableDiffusionInpaintPipeline

    base = StableDiffusionInpaintPipeline.from_pipe(sd_pipe)
    base.set_progress_bar_config(disable=True)
    kw = {"num_inference_steps": 4, "strength": 0.75, "output_type": "np"}
    expected = base("", image=_image(), mask_image=_mask(), height=64, width=64,
                    generator=torch.Generator().manual_seed(1), **kw).images
    ours = _run(sd_pipe, rm_guidance_scale=0.0, **kw)
    assert np.abs(ours - expected).max() < 1e-3
    assert not sd_pipe.do_self_attention_redirection_guidance


def test_sarg_changes_inside_and_keeps_image_latents_outside(sd_pipe):
    seen = {}
    on = _run(sd_pipe, callback_on_step_end=_capture(seen),
              callback_on_step_end_tensor_inputs=["image_latents", "mask_latents"])
    off = _run(sd_pipe, rm_guidance_scale=0.0)
    m = seen["mask_latents"]
    assert torch.equal(on * (1 - m), seen["image_latents"] * (1 - m))  # SIP's final blend: exact
    assert (on - off).abs().max() > 1e-3


def test_scale_one_single_pass_equals_two_branches(sd_pipe, monkeypatch):
    single = _run(sd_pipe, rm_guidance_scale=1.0)
    assert sd_pipe._ae_branches() == ("redirected",)
    monkeypatch.setattr(sd_pipe, "_ae_branches", lambda: ("cond", "redirected"))
    both = _run(sd_pipe, rm_guidance_scale=1.0)
    torch.testing.assert_close(single, both, atol=1e-5, rtol=1e-5)


def test_ss_window_counts_executed_steps(sd_pipe):
    phases = []

    def spy(pipe, i, t, kwargs):
        state = next(iter(pipe.ae_attn_processors.values())).state
        phases.append((state.step, state.active, state.ss_active))
        return {}

    a = _run(sd_pipe, ss_steps=2, callback_on_step_end=spy)
    assert phases == [(0, True, True), (1, True, True), (2, True, False)]
    b = _run(sd_pipe, ss_steps=0)
    assert (a - b).abs().max() > 1e-4
    phases.clear()
    _run(sd_pipe, ae_start_step=1, ae_end_step=2, callback_on_step_end=spy)
    assert [p[1] for p in phases] == [False, True, False]


def test_processors_restored_after_call_and_after_exception(sd_pipe):
    before = dict(sd_pipe.unet.attn_processors)
    _run(sd_pipe)
    assert sd_pipe.unet.attn_processors == before

    def boom(pipe, i, t, kwargs):
        assert pipe.ae_attn_processors  # installed during the call
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        _run(sd_pipe, callback_on_step_end=boom)
    assert sd_pipe.unet.attn_processors == before
    assert not sd_pipe.ae_attn_processors


def test_batch_of_two_masks_equals_each_alone(sd_pipe):
    images = _image(n=2)
    masks = torch.cat([_mask(box=(8, 30, 8, 30)), _mask(box=(30, 60, 24, 56))])
    batched = _run(sd_pipe, images, masks, seed=[3, 4])
    for i, seed in enumerate((3, 4)):
        alone = _run(sd_pipe, images[i : i + 1], masks[i : i + 1], seed=seed)
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-4, rtol=1e-4)
    assert _run(sd_pipe, num_images_per_prompt=2).shape[0] == 2


def test_non_square(sd_pipe):
    out = _run(sd_pipe, _image(64, 96), _mask(64, 96, box=(10, 40, 50, 90)), output_type="np")
    assert out.shape == (1, 64, 96, 3)
    latents = _run(sd_pipe, _image(42, 70), _mask(42, 70, box=(4, 20, 30, 60)))  # 21x35 latents, 11x18 tokens
    assert latents.shape == (1, 4, 21, 35)


def test_dip_round_trip_outside_the_mask(sd_pipe):
    seen = {}
    dip = _run(sd_pipe, inpaint_mode="dip", strength=1.0, callback_on_step_end=_capture(seen),
               callback_on_step_end_tensor_inputs=["image_latents", "mask_latents"])
    m = seen["mask_latents"]
    assert torch.equal(dip * (1 - m), seen["image_latents"] * (1 - m))
    assert (dip - _run(sd_pipe, strength=1.0)).abs().max() > 1e-3  # differs from SIP inside
    from diffusers import DDPMScheduler

    sd_pipe.scheduler = DDPMScheduler.from_config(sd_pipe.scheduler.config)
    with pytest.raises(EraserInputError, match="DDIMScheduler"):
        _run(sd_pipe, inpaint_mode="dip")


def test_ddim_inversion_is_the_inverse_of_the_ddim_step(sd_pipe, monkeypatch):
    """With a prediction that does not depend on the latent, DDIM sampling retraces the inversion exactly."""
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(sd_pipe, "_unet", lambda latents, t, inputs: eps)
    sched = sd_pipe.scheduler
    sched.set_timesteps(10)
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    trajectory = sd_pipe._ddim_invert(z0, sched.timesteps, {})
    z = trajectory[0]
    for i, t in enumerate(sched.timesteps):
        torch.testing.assert_close(z, trajectory[i], atol=1e-4, rtol=1e-4)
        z = sched.step(eps, t, z).prev_sample
    torch.testing.assert_close(z, z0, atol=1e-4, rtol=1e-4)


def test_cfg_runs_three_branches(sd_pipe):
    sizes = []
    hook = sd_pipe.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        _run(sd_pipe, guidance_scale=3.0, prompt="a wall", num_inference_steps=2, strength=1.0)
        cfg_sizes = list(sizes)
        sizes.clear()
        _run(sd_pipe, guidance_scale=1.0, num_inference_steps=2, strength=1.0)
    finally:
        hook.remove()
    assert cfg_sizes == [3, 3] and sizes == [2, 2]


def test_from_pipe_reuses_components(sd_components):
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline(**sd_components, scheduler=AE_PRESET_SD.scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe = StableDiffusionAttentiveEraserPipeline.from_pipe(base, ae_applied_layers="mid")
    assert pipe.unet is base.unet and pipe.vae is base.vae and pipe.text_encoder is base.text_encoder
    assert pipe.ae_applied_layers == ["mid"]
    back = StableDiffusionPipeline.from_pipe(pipe)
    assert back.unet is base.unet


def test_paste_back_and_pil_io(sd_pipe):
    image = PIL.Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    mask = PIL.Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 24))
    out = sd_pipe(image, mask, num_inference_steps=2, paste_back=True, paste_back_blur_radius=3,
                  generator=torch.Generator().manual_seed(0)).images[0]
    assert isinstance(out, PIL.Image.Image) and out.size == (64, 64)
    a, b = np.asarray(out).astype(int), np.asarray(image).astype(int)
    assert np.abs(a - b)[:8, :8].max() <= 1  # far from the mask: the original pixels
    assert np.abs(a - b)[28:36, 28:36].max() > 5


def test_sdxl_pipeline(sdxl_components, sdxl_pipe):
    from diffusers import StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline(**sdxl_components, scheduler=AE_PRESET_SDXL.scheduler())
    pipe = StableDiffusionXLAttentiveEraserPipeline.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet is base.unet
    seen = {}
    masks = torch.cat([_mask(box=(8, 30, 8, 30)), _mask(box=(30, 60, 24, 56))])
    on = _run(pipe, _image(n=2), masks, callback_on_step_end=_capture(seen),
              callback_on_step_end_tensor_inputs=["image_latents", "mask_latents"])
    m = seen["mask_latents"]
    assert on.shape == (2, 4, 32, 32)
    assert torch.equal(on * (1 - m), seen["image_latents"] * (1 - m))
    off = _run(pipe, _image(n=2), masks, rm_guidance_scale=0.0)
    assert (on - off).abs().max() > 1e-3
    assert _run(sdxl_pipe, guidance_scale=2.0, num_inference_steps=2, output_type="np").shape == (1, 64, 64, 3)
    assert _run(sdxl_pipe, inpaint_mode="dip", num_inference_steps=2).shape == (1, 4, 32, 32)


def test_sdxl_scale_zero_equals_diffusers_inpaint(sdxl_pipe):
    from diffusers import StableDiffusionXLInpaintPipeline

    base = StableDiffusionXLInpaintPipeline.from_pipe(sdxl_pipe)
    base.set_progress_bar_config(disable=True)
    kw = {"num_inference_steps": 4, "strength": 0.75, "output_type": "np"}
    expected = base("", image=_image(), mask_image=_mask(), height=64, width=64, guidance_scale=1.0,
                    generator=torch.Generator().manual_seed(1), **kw).images
    assert np.abs(_run(sdxl_pipe, rm_guidance_scale=0.0, **kw) - expected).max() < 1e-3


# -- bad input -------------------------------------------------------------------------------------------------
def test_mask_of_another_size_is_resized_with_a_warning(sd_pipe, caplog):
    small = F.interpolate(_mask(), size=(32, 32))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = _run(sd_pipe, mask=small)
    assert any("resized" in r.message for r in caplog.records)
    torch.testing.assert_close(out, _run(sd_pipe))  # nearest-aligned box: same mask after resizing


def test_empty_mask_returns_the_image_latents(sd_pipe, caplog):
    seen = {}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = _run(sd_pipe, mask=torch.zeros(1, 1, 64, 64), callback_on_step_end=_capture(seen),
                   callback_on_step_end_tensor_inputs=["image_latents"])
    assert torch.equal(out, seen["image_latents"])
    assert any("is empty" in r.message for r in caplog.records)


def test_all_foreground_mask_falls_back(sd_pipe, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = _run(sd_pipe, mask=torch.ones(1, 1, 64, 64))
    assert torch.isfinite(out).all()
    assert sum("covers the whole" in r.message for r in caplog.records) == 1


def test_non_binary_mask_is_binarised(sd_pipe):
    grey = _mask() * 0.4 + 0.3  # 0.3 outside, 0.7 inside
    torch.testing.assert_close(_run(sd_pipe, mask=grey), _run(sd_pipe))
    assert torch.equal(_run(sd_pipe, mask=_mask().bool()), _run(sd_pipe))


def test_dtypes_and_devices(sd_pipe):
    ref = _run(sd_pipe)
    torch.testing.assert_close(_run(sd_pipe, image=_image().double(), mask=_mask().double()), ref)
    torch.testing.assert_close(_run(sd_pipe, image=_image().half()), ref, atol=2e-2, rtol=0)
    for bad_image, bad_mask in ((_image(), (_mask() * 255).to(torch.uint8)),
                                (_image().to("meta"), _mask()),
                                ("image.png", _mask())):
        with pytest.raises(EraserInputError):
            _run(sd_pipe, image=bad_image, mask=bad_mask)
    for kw in ({"strength": 0.0}, {"inpaint_mode": "lama"}, {"attention_backend": "cuda"}, {"mask_dilation": 4},
               {"rm_guidance_scale": -1.0}, {"callback_on_step_end_tensor_inputs": ["prompt_embeds"]}):
        with pytest.raises(EraserInputError):
            _run(sd_pipe, **kw)


def _tiny_dit_pipe():
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=8, patch_size=2, norm_num_groups=8)
    return DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler())


def test_unsupported_denoisers_raise_typed_errors(sd_components, tmp_path):
    from diffusers import UNet2DConditionModel

    dit = _tiny_dit_pipe()
    with pytest.raises(UnsupportedModelError, match="DiT"):
        StableDiffusionAttentiveEraserPipeline.from_pipe(dit)
    dit.save_pretrained(tmp_path / "dit")
    with pytest.raises(UnsupportedModelError, match="UNet2DConditionModel"):
        StableDiffusionAttentiveEraserPipeline.from_pretrained(tmp_path / "dit")
    inpaint_unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, in_channels=9, out_channels=4,
                                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                        norm_num_groups=8)
    with pytest.raises(UnsupportedModelError, match="inpainting"):
        StableDiffusionAttentiveEraserPipeline(**{**sd_components, "unet": inpaint_unet},
                                               scheduler=AE_PRESET_SD.scheduler())


# -- SalUn on the pipeline's UNet ------------------------------------------------------------------------------
def test_salun_patch_applies_to_the_pipeline_unet(sd_components, tiny_unet):
    from diffusers import DDPMScheduler

    from serve_unlearn import apply_patch, revert_patch
    from serve_unlearn.patches.config import SalUnConfig
    from serve_unlearn.patches.salun import salun
    from serve_unlearn.patches.tasks import DiffusionTask

    g = torch.Generator().manual_seed(0)
    forget = {"latents": torch.randn(2, 4, 16, 16, generator=g), "cond": torch.randn(2, 7, 32, generator=g),
              "target_cond": torch.randn(2, 7, 32, generator=g)}
    task = DiffusionTask(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    patch = salun(tiny_unet, task, forget, None, SalUnConfig(ratio=0.05, lr=1e-3, epochs=1, batch_size=2),
                  progress=False)
    pipe = StableDiffusionAttentiveEraserPipeline(**{**sd_components, "unet": tiny_unet,
                                                     "text_encoder": tiny_text_encoder(sd_components["tokenizer"], 32)},
                                                  scheduler=AE_PRESET_SD.scheduler())
    pipe.set_progress_bar_config(disable=True)
    before = _run(pipe, num_inference_steps=2)
    apply_patch(pipe.unet, patch)
    after = _run(pipe, num_inference_steps=2)
    assert (after - before).abs().max() > 0
    revert_patch(pipe.unet, patch)
    assert torch.equal(_run(pipe, num_inference_steps=2), before)


# -- CLI -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_dir(sd_components, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    path = tmp_path_factory.mktemp("tiny-sd")
    StableDiffusionPipeline(**sd_components, scheduler=AE_PRESET_SD.scheduler(), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(path)
    return path


def test_cli_erase(sd_dir, tmp_path, capsys):
    from serve_unlearn.cli import main

    PIL.Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    mask = np.zeros((48, 64), np.uint8)
    mask[10:30, 20:40] = 255
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
    args = ["erase", "--model", str(sd_dir), "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
            "--steps", "2", "--seed", "0"]
    assert main([*args, "--out", str(tmp_path / "out.png")]) == 0
    assert PIL.Image.open(tmp_path / "out.png").size == (64, 48)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out"] == str(tmp_path / "out.png")
    assert main([*args, "--out", str(tmp_path / "dip.png"), "--mode", "dip", "--paste-back"]) == 0


def test_cli_erase_errors(sd_dir, tmp_path, capsys):
    from serve_unlearn.cli import main

    _tiny_dit_pipe().save_pretrained(tmp_path / "dit")
    PIL.Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    common = ["--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "in.png"), "--out", str(tmp_path / "o.png")]
    assert main(["erase", "--model", str(tmp_path / "dit"), *common]) == 2
    assert "UNet2DConditionModel" in capsys.readouterr().err
    assert main(["erase", "--model", str(tmp_path / "nowhere"), *common]) == 2
    assert main(["erase", "--model", str(sd_dir), "--image", str(tmp_path / "missing.png"),
                 "--mask", str(tmp_path / "in.png"), "--out", str(tmp_path / "o.png")]) == 2


def test_pipelines_package_is_lazy_and_says_when_diffusers_is_missing(monkeypatch):
    import importlib.util

    from serve_unlearn import pipelines

    assert pipelines.StableDiffusionAttentiveEraserPipeline is StableDiffusionAttentiveEraserPipeline
    with pytest.raises(AttributeError):
        pipelines.NoSuchPipeline  # noqa: B018
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "diffusers" else real(n, *a))
    with pytest.raises(ImportError, match="pip install"):
        pipelines.StableDiffusionXLAttentiveEraserPipeline  # noqa: B018
