"""O3: per-request unlearning LoRAs and the OOD detectors that gate them, trained per forget request.

Exports resolve lazily: ``from serve_unlearn.adapters import ForgetRegistry`` does not import torch or peft.
``ForgetRegistry``, ``ForgetRequest`` and ``Staging`` live in :mod:`serve_unlearn.registry`; they are re-exported
here, where O3 first documented them.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ForgetRegistry": "..registry", "ForgetRequest": "..registry", "Staging": "..registry",
    "Gate": ".gate", "GateConfig": ".gate", "GateDecision": ".gate", "GatePolicy": ".gate",
    "ForgetConfig": ".forget_request", "forget": ".forget_request", "load_forget_records": ".forget_request",
    "UnlearnLoraConfig": ".orthogonal_lora", "concat_adapters": ".orthogonal_lora",
    "DetectorConfig": ".detector", "DetectorEnsemble": ".detector", "OODDetector": ".detector",
    "load_gate": ".served", "served_adapter": ".served",
}
__all__ = [
    "DetectorConfig",
    "DetectorEnsemble",
    "ForgetConfig",
    "ForgetRegistry",
    "ForgetRequest",
    "Gate",
    "GateConfig",
    "GateDecision",
    "GatePolicy",
    "OODDetector",
    "Staging",
    "UnlearnLoraConfig",
    "concat_adapters",
    "forget",
    "load_forget_records",
    "load_gate",
    "served_adapter",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
