"""The reference implementation's defaults (Attentive Eraser, AAAI 2025, official code), per model family.

Both families share the SIP recipe: DDIM (scaled-linear betas 0.00085..0.012, no sample clipping,
``set_alpha_to_one=False``), 50 steps at strength 0.8 (40 executed), SARG scale 9, similarity suppression
lambda = 0.3 for the first 10 executed steps (the reference's ``ss_steps=9`` is an inclusive index), ASS in every
up-block self-attention, empty prompt and no CFG. They differ in the resolution the mask dilation was tuned at
(a Gaussian blur of kernel 13 at 512 px for SD, 77 at 1024 px for SDXL, thresholded at 0.1) and in the
reference's block numbering of the up blocks (7..15 of 16 transformer blocks for SD, 34..69 of 70 for SDXL).

One deliberate difference: ``steps_offset=1`` (diffusers' pipelines force it), so the timesteps are 981, 961, ...
where the reference ran 980, 960, ...
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

AE_SCHEDULER_CONFIG: Mapping[str, Any] = MappingProxyType({
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
    "set_alpha_to_one": False, "steps_offset": 1,
})
AE_CALL_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "strength": 0.8, "num_inference_steps": 50, "rm_guidance_scale": 9.0, "ss_scale": 0.3, "ss_steps": 10,
    "guidance_scale": 1.0, "inpaint_mode": "sip", "mask_dilation": "ae",
})


@dataclass(frozen=True)
class EraserPreset:
    """One model family's reference settings: call arguments, mask blur, layer numbering, scheduler."""

    name: str
    reference_size: int  # pixel side the mask blur kernel was tuned at
    mask_blur_kernel: int
    block_index: range  # the reference's AAS_start_layer..AAS_end_layer, equal to the "up" selector
    call_kwargs: Mapping[str, Any] = field(default_factory=lambda: AE_CALL_DEFAULTS)

    def blur_kernel_for(self, height: int, width: int) -> int:
        """The blur kernel scaled to this image size (odd; 1 means no dilation)."""
        k = round(self.mask_blur_kernel * max(height, width) / self.reference_size)
        return max(1, k if k % 2 else k + 1)

    def scheduler(self, config: Mapping[str, Any] | None = None):
        """A DDIMScheduler with the reference's settings, over ``config`` (e.g. the checkpoint's scheduler)."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config({**dict(config or {}), **AE_SCHEDULER_CONFIG})


AE_PRESET_SD = EraserPreset("sd", reference_size=512, mask_blur_kernel=13, block_index=range(7, 16))
AE_PRESET_SDXL = EraserPreset("sdxl", reference_size=1024, mask_blur_kernel=77, block_index=range(34, 70))
PRESETS: Mapping[str, EraserPreset] = MappingProxyType({"sd": AE_PRESET_SD, "sdxl": AE_PRESET_SDXL})
