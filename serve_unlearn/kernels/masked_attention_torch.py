"""The torch side of ``masked_attention``: three exact rewrites of one formula (see ``masked_attention``).

- ``reference``: explicit fp32 logits plus an additive -inf bias. The oracle; O(N_q * N_k) memory.
- ``sdpa_mask``: ``F.scaled_dot_product_attention`` with a broadcast (B, 1, 1, N_k) bool mask. Static shapes
  (``torch.compile``-friendly), but pays for every key.
- ``sdpa_gather``: SDPA over the gathered kept keys; FLOPs and memory scale with N_kept / N_k and flash
  kernels stay eligible (no mask). One host sync for the indices.

Each takes validated inputs ``(q, k, v, keep, query_scale, scale)``; ``masked_attention`` validates them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["reference", "scaled_queries", "sdpa_gather", "sdpa_mask"]


def scaled_queries(q: torch.Tensor, query_scale: torch.Tensor | None) -> torch.Tensor:
    """q with row i multiplied by qs_i: (qs_i q_i) . k_j = qs_i (q_i . k_j), so SDPA needs no per-row scale."""
    return q if query_scale is None else q * query_scale[:, None, :, None].to(q.dtype)


def reference(q, k, v, keep, query_scale, scale):
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if query_scale is not None:
        logits *= query_scale.float()[:, None, :, None]
    bias = torch.zeros(keep.shape, dtype=torch.float32, device=q.device).masked_fill_(~keep, float("-inf"))
    logits += bias[:, None, None, :]
    return torch.matmul(torch.softmax(logits, dim=-1), v.float()).to(q.dtype)


def sdpa_mask(q, k, v, keep, query_scale, scale):
    q = scaled_queries(q, query_scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], scale=scale)


def sdpa_gather(q, k, v, keep, query_scale, scale):
    q = scaled_queries(q, query_scale)
    if bool((keep == keep[:1]).all()):  # one mask for the batch (the usual case): one call
        idx = keep[0].nonzero().flatten()
        if idx.numel() < k.shape[2]:
            k, v = k.index_select(2, idx), v.index_select(2, idx)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    out = torch.empty_like(q)
    for b in range(q.shape[0]):  # masks differ: kept counts differ, so one call per sample (B is small)
        idx = keep[b].nonzero().flatten()
        kb, vb = k[b : b + 1].index_select(2, idx), v[b : b + 1].index_select(2, idx)
        out[b : b + 1] = F.scaled_dot_product_attention(q[b : b + 1], kb, vb, scale=scale)
    return out
