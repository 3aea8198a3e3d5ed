"""Attention over a per-sample subset of keys, with an optional per-query logit scale (Attentive Eraser's ASS).

    out_i = sum_{j in keep} softmax_j(qs_i * (q_i . k_j) * scale) v_j

``keep`` (B, N_k) bars keys per sample (True = may be attended); ``query_scale`` (B, N_q) is the similarity
suppression factor (lambda on foreground queries, 1 elsewhere). Because (lambda q_i) . k_j = lambda (q_i . k_j),
AE's two full softmaxes plus a row select are one attention call with pre-scaled queries, and the -inf key bias
is attention over the kept keys alone, so the backends are all exact rewrites of one formula: ``reference``,
``sdpa_mask`` and ``sdpa_gather`` in torch (``masked_attention_torch``), and ``triton``, a fused
FlashAttention-2-style forward that skips key tiles with no kept key (``masked_attention_triton``). This module
validates the inputs and picks the backend (Triton by the rule in ``dispatch``).

Inputs are 4-D (B, H, N, D): on CPU, SDPA with 3-D inputs falls back to a kernel that materialises the full
score matrix.
"""

from __future__ import annotations

import math

import torch

from .dispatch import refuse, triton_kernel
from .masked_attention_torch import reference, sdpa_gather, sdpa_mask

__all__ = ["MASKED_ATTENTION_BACKENDS", "empty_keep_rows", "masked_attention"]

MASKED_ATTENTION_BACKENDS = ("auto", "reference", "sdpa_mask", "sdpa_gather", "triton")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def empty_keep_rows(keep: torch.Tensor) -> torch.Tensor:
    """bool (B,): samples whose keep row bars every key, where the masked softmax is undefined.

    ``masked_attention`` refuses them; a caller that wants a fallback (plain attention for that sample) selects
    the rows with this first.
    """
    if keep.dtype != torch.bool or keep.dim() != 2:
        raise ValueError(f"keep must be a bool (B, N_k) tensor, got {keep.dtype} of shape {tuple(keep.shape)}")
    return ~keep.any(dim=1)


def _validate(q, k, v, keep, query_scale) -> None:
    """Raise ValueError naming the first thing wrong with the inputs."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (B, H, N, D), got shape {tuple(t.shape)}; split heads with "
                "x.view(B, N, H, D).transpose(1, 2) (3-D (B*H, N, D) inputs make CPU SDPA materialise scores)"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(
                f"q, k, v must share dtype and device; {name} is {t.dtype} on {t.device}, q is {q.dtype} on "
                f"{q.device}"
            )
    B, H, _, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"k must be (B, H, N_k, D) = ({B}, {H}, N_k, {D}) like q, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if keep.dtype != torch.bool or keep.shape != (B, k.shape[2]):
        raise ValueError(
            f"keep must be a bool (B, N_k) = ({B}, {k.shape[2]}) tensor over the keys, got {keep.dtype} of shape "
            f"{tuple(keep.shape)}"
        )
    if query_scale is not None and (
        not isinstance(query_scale, torch.Tensor)
        or not query_scale.is_floating_point()
        or query_scale.shape != (B, q.shape[2])
    ):
        got = (
            f"{query_scale.dtype} of shape {tuple(query_scale.shape)}"
            if isinstance(query_scale, torch.Tensor)
            else type(query_scale).__name__
        )
        raise ValueError(
            f"query_scale must be a float (B, N_q) = ({B}, {q.shape[2]}) tensor or None, got {got}; for one "
            "factor on every query, pass scale= instead"
        )
    for name, t in (("keep", keep), ("query_scale", query_scale)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; move it (and cache it per device)")
    empty = empty_keep_rows(keep)
    if empty.any():
        samples = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"keep bars every key of sample(s) {samples}, where the masked softmax is undefined; give those "
            "samples another path (e.g. plain attention), found with empty_keep_rows(keep)"
        )


def _triton_backend(q: torch.Tensor, explicit: bool):
    """The Triton host function when it can run on ``q``; else None (auto) or RuntimeError (explicit)."""
    refusal = "backend='triton' cannot run: {}; or use backend='sdpa_gather'"
    tri = triton_kernel("masked_attention_triton", q.device, explicit, refusal, "the inputs are")
    if tri is None:
        return None
    if q.shape[-1] > tri.MAX_HEAD_DIM:
        return refuse(explicit, refusal, f"head dim {q.shape[-1]} is above the kernel's {tri.MAX_HEAD_DIM}")
    return tri.masked_attention_triton


_TORCH_BACKENDS = {"reference": reference, "sdpa_mask": sdpa_mask, "sdpa_gather": sdpa_gather}


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    query_scale: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of q (B, H, N_q, D) over the keys of k, v (B, H, N_k, D) that ``keep`` (bool (B, N_k)) allows.

    ``query_scale`` (float (B, N_q), or None for 1) multiplies each query row's logits; ``scale`` defaults to
    1/sqrt(D). Returns (B, H, N_q, D) in q's dtype. ``backend`` is one of ``MASKED_ATTENTION_BACKENDS``; "auto"
    takes Triton for CUDA tensors when triton is installed and ``sdpa_gather`` otherwise, while an explicit
    "triton" that cannot run raises RuntimeError. A sample whose keep row is all False raises ValueError (see
    ``empty_keep_rows``): there is no defined answer, and the right fallback is the caller's choice. That
    check costs one host sync per call on CUDA.
    """
    if backend not in MASKED_ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(MASKED_ATTENTION_BACKENDS)}; got {backend!r}")
    _validate(q, k, v, keep, query_scale)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if backend in ("auto", "triton"):
        fn = _triton_backend(q, explicit=backend == "triton")
        if fn is not None:
            return fn(q, k, v, keep, query_scale, scale)
        backend = "sdpa_gather"
    return _TORCH_BACKENDS[backend](q, k, v, keep, query_scale, scale)
