"""Percentile bootstrap confidence intervals for means (rates) and for AUCs.

``mean_ci`` resamples the per-item values with replacement ``n_boot`` times and takes the ``alpha/2`` and
``1 - alpha/2`` quantiles of the resampled means; ``auc_ci`` resamples the positives and the negatives separately
(a stratified bootstrap, so each resample keeps both sets' sizes). A fixed seed makes reports reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .mia import auc

__all__ = ["auc_ci", "mean_ci", "summary"]


def mean_ci(values: Sequence[float], *, n_boot: int = 1000, alpha: float = 0.05,
            seed: int = 0) -> tuple[float, float] | None:
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def auc_ci(positives: Sequence[float], negatives: Sequence[float], *, n_boot: int = 1000, alpha: float = 0.05,
           seed: int = 0) -> tuple[float, float] | None:
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return None
    rng = np.random.default_rng(seed)
    stats = [auc(pos[rng.integers(0, pos.size, pos.size)], neg[rng.integers(0, neg.size, neg.size)])
             for _ in range(n_boot)]
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def summary(values: Sequence[float | None], ci: Callable = mean_ci, **kwargs) -> dict:
    """``{"mean", "ci": [lo, hi], "n"}`` over the values that are not None (``mean`` None when there are none)."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return {"mean": None, "ci": None, "n": 0}
    interval = ci(kept, **kwargs)
    return {"mean": float(np.mean(kept)), "ci": list(interval) if interval else None, "n": len(kept)}
