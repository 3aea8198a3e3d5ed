"""diffusers pipelines. Imported lazily, so ``serve_unlearn`` (and its CLI) works without diffusers installed.

    from serve_unlearn.pipelines import StableDiffusionAttentiveEraserPipeline
"""

from __future__ import annotations

import importlib
import importlib.util

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
]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if importlib.util.find_spec("diffusers") is None:
        raise ImportError(f"{name} needs diffusers: pip install 'serve-unlearn[diffusers]'")
    return getattr(importlib.import_module(".attentive_eraser", __name__), name)
