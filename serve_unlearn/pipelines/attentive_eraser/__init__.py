"""Attentive Eraser (ASS + SARG, AAAI 2025) for diffusers: training-free object removal with SD and SDXL.

Modules, in diffusers' PAG layout: ``ae_utils`` (the mixin only, like ``pag_utils``), ``attention_processor``,
one file per pipeline, ``presets``, and the mixin's parts: ``state`` (shared by the processors of one call),
``masks``, ``inputs`` and ``layers`` (which UNets and which self-attentions).
"""

from .ae_utils import AttentiveEraserMixin
from .attention_processor import AttentiveEraserCFGSelfAttnProcessor, AttentiveEraserSelfAttnProcessor
from .layers import resolve_applied_layers, self_attention_layers
from .masks import build_mask_pyramid, dilate_mask
from .pipeline_sd_attentive_eraser import StableDiffusionAttentiveEraserPipeline
from .pipeline_sdxl_attentive_eraser import StableDiffusionXLAttentiveEraserPipeline
from .presets import AE_PRESET_SD, AE_PRESET_SDXL, PRESETS, EraserPreset
from .state import AttentionRedirectionState

__all__ = [
    "AE_PRESET_SD",
    "AE_PRESET_SDXL",
    "PRESETS",
    "AttentionRedirectionState",
    "AttentiveEraserCFGSelfAttnProcessor",
    "AttentiveEraserMixin",
    "AttentiveEraserSelfAttnProcessor",
    "EraserPreset",
    "StableDiffusionAttentiveEraserPipeline",
    "StableDiffusionXLAttentiveEraserPipeline",
    "build_mask_pyramid",
    "dilate_mask",
    "resolve_applied_layers",
    "self_attention_layers",
]
