"""Serving integrations: the vLLM plugin, loader and middleware, and the transformers + peft gated generator.

Exports resolve lazily, so the vLLM plugin (imported in every vLLM process) does not pull in peft or the gate.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"GatedGenerator": ".gated_generator", "GatedGeneration": ".gated_generator",
            "PerSampleLoraScale": ".per_sample_lora"}
__all__ = ["GatedGeneration", "GatedGenerator", "PerSampleLoraScale"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
