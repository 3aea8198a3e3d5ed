"""Kernels for the patch hot paths: a plain-torch reference (CPU path, test oracle) and Triton for CUDA.

``masked_apply_`` picks the backend. Triton is optional: it is imported only when the Triton path is taken, so
``import serve_unlearn.kernels`` works without it.

``masked_attention`` is attention over a per-sample subset of keys (Attentive Eraser), with its own backends.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from . import reference
from .masked_attention import MASKED_ATTENTION_BACKENDS, empty_keep_rows, masked_attention
from .reference import masked_gather, pack_mask, popcount, unpack_mask

IMPL_ENV = "SERVE_UNLEARN_KERNEL_IMPL"
_IMPLS = ("auto", "torch", "triton")

__all__ = [
    "IMPL_ENV",
    "MASKED_ATTENTION_BACKENDS",
    "empty_keep_rows",
    "is_triton_available",
    "masked_apply_",
    "masked_attention",
    "masked_gather",
    "pack_mask",
    "popcount",
    "unpack_mask",
]


@functools.lru_cache(maxsize=1)
def is_triton_available() -> bool:
    """Whether triton is installed (looked up once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _triton_kernel_module(name: str, device: torch.device, explicit: bool, refusal: str, operand: str):
    """Import the Triton kernel module ``name`` if its kernel can run on ``device``; else None (auto: take the
    torch path) or RuntimeError(``refusal.format(reason)``) when Triton was asked for explicitly. The rules are
    the same for every kernel here: installed, CUDA or the interpreter, imported in the matching mode.
    ``operand`` names what sits on ``device`` ("the weight is") in the error."""
    if not is_triton_available():
        return _refuse(explicit, refusal, "triton is not installed (pip install 'serve-unlearn[triton]')")
    if device.type != "cuda":
        if not explicit:
            return None  # auto: a CPU tensor takes the torch path, interpreter or not
        if os.environ.get("TRITON_INTERPRET") != "1":
            return _refuse(
                explicit, refusal,
                f"{operand} on {device.type}, and Triton runs non-CUDA tensors only in its interpreter: start the "
                "process with TRITON_INTERPRET=1 (set before triton is imported)",
            )
    module = importlib.import_module(f"{__name__}.{name}")
    if device.type != "cuda" and not module.is_interpreted():
        return _refuse(
            explicit, refusal,
            f"{module.__name__} was imported before TRITON_INTERPRET=1 was set, so its kernel is compiled for CUDA; "
            "start the process with TRITON_INTERPRET=1",
        )
    if device.type == "cuda" and module.is_interpreted() and not explicit:
        return None  # interpreted Triton on CUDA tensors round-trips through host memory: torch is faster
    return module


def _refuse(explicit: bool, refusal: str, reason: str) -> None:
    """Raise for an explicit Triton request that cannot run; None (take the fallback) for auto."""
    if explicit:
        raise RuntimeError(refusal.format(reason))


def masked_apply_(
    weight: torch.Tensor,
    packed: torch.Tensor,
    values: torch.Tensor,
    mode: str = "replace",
    impl: str | None = None,
) -> torch.Tensor:
    """Write ``values`` into the masked positions of ``weight`` in place (see ``reference.masked_apply_``).

    ``impl``: "torch", "triton" or "auto"; None reads ``SERVE_UNLEARN_KERNEL_IMPL`` (default "auto"). Auto
    takes Triton for CUDA weights when triton is installed and torch otherwise, silently; an explicit "triton"
    that cannot run raises RuntimeError instead of quietly measuring or testing the other backend. The mask
    and values are moved to the weight's device first (patches are loaded on CPU).
    """
    choice = (impl if impl is not None else os.environ.get(IMPL_ENV, "auto")).strip().lower()
    if choice not in _IMPLS:
        source = "impl" if impl is not None else IMPL_ENV
        raise ValueError(f"{source} must be one of {', '.join(_IMPLS)}; got {choice!r}")
    packed = packed.to(weight.device)
    values = values.to(weight.device)
    if choice != "torch":
        tri = _triton_kernel_module("masked_apply_triton", weight.device, choice == "triton",
                                   f"impl='triton' cannot run: {{}}; or use impl='torch' / {IMPL_ENV}=torch",
                                   "the weight is")
        if tri is not None:
            return tri.masked_apply_triton_(weight, packed, values, mode)
    return reference.masked_apply_(weight, packed, values, mode)
