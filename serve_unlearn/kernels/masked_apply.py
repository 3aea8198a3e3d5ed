"""``masked_apply_``: write values into the masked positions of a weight, in place (the patch hot path).

The torch reference (``masked_apply_torch``: the CPU path and the test oracle) and the Triton kernel
(``masked_apply_triton``: CUDA) sit side by side; this module picks one by the rule in ``dispatch``.
"""

from __future__ import annotations

import os

import torch

from . import masked_apply_torch
from .dispatch import triton_kernel

__all__ = ["IMPLS", "IMPL_ENV", "masked_apply_"]

IMPL_ENV = "SERVE_UNLEARN_KERNEL_IMPL"
IMPLS = ("auto", "torch", "triton")


def masked_apply_(
    weight: torch.Tensor,
    packed: torch.Tensor,
    values: torch.Tensor,
    mode: str = "replace",
    impl: str | None = None,
) -> torch.Tensor:
    """Write ``values`` into the masked positions of ``weight`` in place (see ``masked_apply_torch.masked_apply_``).

    ``impl``: "torch", "triton" or "auto"; None reads ``SERVE_UNLEARN_KERNEL_IMPL`` (default "auto"). Auto
    takes Triton for CUDA weights when triton is installed and torch otherwise, silently; an explicit "triton"
    that cannot run raises RuntimeError instead of quietly measuring or testing the other backend. The mask
    and values are moved to the weight's device first (patches are loaded on CPU).
    """
    choice = (impl if impl is not None else os.environ.get(IMPL_ENV, "auto")).strip().lower()
    if choice not in IMPLS:
        source = "impl" if impl is not None else IMPL_ENV
        raise ValueError(f"{source} must be one of {', '.join(IMPLS)}; got {choice!r}")
    packed = packed.to(weight.device)
    values = values.to(weight.device)
    if choice != "torch":
        tri = triton_kernel("masked_apply_triton", weight.device, choice == "triton",
                            f"impl='triton' cannot run: {{}}; or use impl='torch' / {IMPL_ENV}=torch",
                            "the weight is")
        if tri is not None:
            return tri.masked_apply_triton_(weight, packed, values, mode)
    return masked_apply_torch.masked_apply_(weight, packed, values, mode)
