"""Weight saliency (SalUn): which weights the forget data leans on, and the mask of the most salient ones.

Saliency is |Σ_batches ∇ forget_loss| accumulated in float32 (absolute value *after* summing, as the reference
does). The threshold is found by ``kthvalue`` over the selected tensors or by a refined histogram, never by an
argsort, and the mask is a bool tensor per parameter (1 byte/weight; 1 bit/weight once in a patch).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import UnlearnConfigError, UnlearnDataError


def select_parameters(model: nn.Module, include: Sequence[str] | None = None,
                      exclude: Sequence[str] | None = None) -> dict[str, nn.Parameter]:
    """Floating-point parameters whose name matches any ``include`` regex (default: all) and no ``exclude``."""
    inc = [re.compile(p) for p in include or []]
    exc = [re.compile(p) for p in exclude or []]
    chosen = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        if not p.is_floating_point():
            continue
        if inc and not any(r.search(name) for r in inc):
            continue
        if any(r.search(name) for r in exc):
            continue
        chosen[name] = p
    if not chosen:
        raise UnlearnConfigError(
            f"no parameter matches include={list(include or [])} exclude={list(exclude or [])}; "
            f"parameter names look like {next(iter(dict(model.named_parameters())), '?')!r}"
        )
    return chosen


def accumulate_gradients(model: nn.Module, params: dict[str, nn.Parameter], batches, loss_fn,
                         weight_fn=None, desc: str = "gradients", progress: bool = True,
                         on_batch=None) -> dict[str, torch.Tensor]:
    """Σ over batches of ∇ (weight · loss) into float32 buffers (one per selected parameter); ``on_batch(i)``
    after the i-th batch (1-based), for callers that report progress."""
    if not batches:
        raise UnlearnDataError("no batches to compute gradients on: the data set is empty")
    acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    for i, batch in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False), 1):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        if weight_fn is not None:
            loss = loss * weight_fn(batch)
        loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                acc[n] += p.grad.to(torch.float32)
        if on_batch is not None:
            on_batch(i)
    model.zero_grad(set_to_none=True)
    return acc


def _kth_largest(values: torch.Tensor, k: int) -> float:
    return float(values.kthvalue(values.numel() - k + 1).values)


def _threshold_histogram(tensors: Sequence[torch.Tensor], k: int, bins: int = 4096, rounds: int = 4) -> float:
    """Value γ with about k elements >= γ, found by refining a histogram: memory O(bins), no sort, no copy."""
    lo = min(float(t.min()) for t in tensors)
    hi = max(float(t.max()) for t in tensors)
    above = 0  # elements >= hi already known to be kept
    for _ in range(rounds):
        if hi <= lo:
            break
        counts = sum(torch.histc(t.float(), bins=bins, min=lo, max=hi) for t in tensors)
        # histc puts values == hi in the last bin and drops values > hi (already counted in `above`)
        cum = above
        for b in range(bins - 1, -1, -1):
            c = int(counts[b])
            if cum + c >= k:
                width = (hi - lo) / bins
                lo, hi = lo + b * width, lo + (b + 1) * width
                break
            cum += c
        above = cum
    return lo


def saliency_masks(saliency: dict[str, torch.Tensor], ratio: float, *,
                   scope: Literal["global", "per_tensor"] = "global",
                   threshold: Literal["kthvalue", "histogram"] = "kthvalue") -> dict[str, torch.Tensor]:
    """Bool masks keeping the top ``ratio`` fraction of saliency (ties at the threshold are kept)."""
    if not (0.0 < ratio <= 1.0) or math.isnan(ratio):
        raise UnlearnConfigError(f"mask ratio must be in (0, 1], got {ratio}")
    if scope not in ("global", "per_tensor"):
        raise UnlearnConfigError(f"scope must be 'global' or 'per_tensor', got {scope!r}")
    if threshold not in ("kthvalue", "histogram"):
        raise UnlearnConfigError(f"threshold must be 'kthvalue' or 'histogram', got {threshold!r}")

    def gamma(tensors: list[torch.Tensor]) -> float:
        total = sum(t.numel() for t in tensors)
        k = max(1, math.ceil(ratio * total))
        if threshold == "histogram":
            return _threshold_histogram(tensors, k)
        flat = tensors[0].reshape(-1) if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])
        return _kth_largest(flat, k)

    if scope == "global":
        g = gamma(list(saliency.values()))
        return {n: s >= g for n, s in saliency.items()}
    return {n: s >= gamma([s]) for n, s in saliency.items()}
