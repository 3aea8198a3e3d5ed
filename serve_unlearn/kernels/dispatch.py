"""The one rule every kernel here follows to take its Triton path or its torch one.

Triton is optional: a kernel module (``<op>_triton.py``) imports triton at its top, so it is imported only when
its path is taken, and ``import serve_unlearn.kernels`` works without triton. The rule is the same for every op:
triton installed, and CUDA tensors or the interpreter, with the kernel module imported in the matching mode. "auto"
falls back to torch silently; an explicit request that cannot run raises RuntimeError instead of quietly measuring
or testing the other backend.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch

__all__ = ["is_triton_available", "refuse", "triton_kernel"]


@functools.lru_cache(maxsize=1)
def is_triton_available() -> bool:
    """Whether triton is installed (looked up once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_kernel(name: str, device: torch.device, explicit: bool, refusal: str, operand: str) -> ModuleType | None:
    """Import the Triton kernel module ``name`` if its kernel can run on ``device``; else None (auto: take the
    torch path) or RuntimeError(``refusal.format(reason)``) when Triton was asked for explicitly.
    ``operand`` names what sits on ``device`` ("the weight is") in the error."""
    if not is_triton_available():
        return refuse(explicit, refusal, "triton is not installed (pip install 'serve-unlearn[triton]')")
    if device.type != "cuda":
        if not explicit:
            return None  # auto: a CPU tensor takes the torch path, interpreter or not
        if os.environ.get("TRITON_INTERPRET") != "1":
            return refuse(
                explicit, refusal,
                f"{operand} on {device.type}, and Triton runs non-CUDA tensors only in its interpreter: start the "
                "process with TRITON_INTERPRET=1 (set before triton is imported)",
            )
    module = importlib.import_module(f"{__package__}.{name}")
    if device.type != "cuda" and not module.is_interpreted():
        return refuse(
            explicit, refusal,
            f"{module.__name__} was imported before TRITON_INTERPRET=1 was set, so its kernel is compiled for CUDA; "
            "start the process with TRITON_INTERPRET=1",
        )
    if device.type == "cuda" and module.is_interpreted() and not explicit:
        return None  # interpreted Triton on CUDA tensors round-trips through host memory: torch is faster
    return module


def refuse(explicit: bool, refusal: str, reason: str) -> None:
    """Raise RuntimeError for an explicit Triton request that cannot run; None (take the fallback) for auto."""
    if explicit:
        raise RuntimeError(refusal.format(reason))
