"""Attentive Eraser (ASS + SARG, AAAI 2025) for diffusers: training-free object removal with SD and SDXL."""

from .ae_utils import (
    AttentionRedirectionState,
    AttentiveEraserMixin,
    build_mask_pyramid,
    dilate_mask,
    resolve_applied_layers,
    self_attention_layers,
)
from .attention_processor import AttentiveEraserCFGSelfAttnProcessor, AttentiveEraserSelfAttnProcessor
from .pipeline_sd_attentive_eraser import StableDiffusionAttentiveEraserPipeline
from .pipeline_sdxl_attentive_eraser import StableDiffusionXLAttentiveEraserPipeline
from .presets import AE_PRESET_SD, AE_PRESET_SDXL, PRESETS, EraserPreset

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
