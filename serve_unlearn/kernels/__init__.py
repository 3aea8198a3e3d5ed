"""Kernels for the hot paths, in one shape per op: ``<op>.py`` (the public function and its dispatch),
``<op>_torch.py`` (the plain-torch reference: CPU path and test oracle) and ``<op>_triton.py`` (the Triton
kernel, for CUDA; ``masked_apply_numba.py`` is the compiled CPU loop), with one dispatch rule for every op (``dispatch``).

- ``masked_apply_``: write a patch's values into the positions of a bit-packed mask, in place (weight patches).
- ``masked_attention``: attention over a per-sample subset of keys, with its own backends (Attentive Eraser).

Triton is optional: ``import serve_unlearn.kernels`` works without it.
"""

from __future__ import annotations

from .dispatch import is_triton_available
from .masked_apply import IMPL_ENV, is_numba_available, masked_apply_, masked_gather
from .masked_apply_torch import pack_mask, popcount, unpack_mask
from .masked_attention import MASKED_ATTENTION_BACKENDS, empty_keep_rows, masked_attention

__all__ = [
    "IMPL_ENV",
    "MASKED_ATTENTION_BACKENDS",
    "empty_keep_rows",
    "is_numba_available",
    "is_triton_available",
    "masked_apply_",
    "masked_attention",
    "masked_gather",
    "pack_mask",
    "popcount",
    "unpack_mask",
]
