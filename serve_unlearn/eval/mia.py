"""Membership inference and ROC: how well a score separates two sets (forget vs holdout, forget vs retain).

Attack scores (higher = "more likely a member"), computed on the gold answer's tokens given the question:

- loss: ``mean_t log p(a_t | ·)``, the negated average token loss (Yeom et al. 2018);
- Min-K%: the mean of the lowest k% token log-probabilities (Shi et al. 2024);
- Min-K%++: the mean of the lowest k% of ``(log p(a_t) - mu_t) / sigma_t``, where ``mu_t`` and ``sigma_t`` are
  the mean and standard deviation of ``log p(z)`` under the model's own next-token distribution ``z ~ p(· | ·)``
  at that position (Zhang et al. 2024). It needs the whole distribution, so only local targets report it.

AUC is the Mann-Whitney form ``P(s_pos > s_neg) + P(s_pos = s_neg) / 2``. For forget (members) vs holdout
(non-members) it is near the pre-unlearning model's value when nothing was forgotten, and 0.5 when the forget set
looks like data the model never saw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["auc", "loss_score", "min_k_plus_plus_score", "min_k_score", "roc_curve"]


def _lowest(values: np.ndarray, k: float) -> np.ndarray:
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    if values.size == 0:
        raise ValueError("an answer with no tokens has no membership score")
    n = max(1, math.ceil(k * values.size))
    return np.sort(values)[:n]


def loss_score(token_logprobs: Sequence[float]) -> float:
    return float(np.mean(np.asarray(token_logprobs, dtype=np.float64)))


def min_k_score(token_logprobs: Sequence[float], k: float = 0.2) -> float:
    return float(np.mean(_lowest(np.asarray(token_logprobs, dtype=np.float64), k)))


def min_k_plus_plus_score(token_logprobs: Sequence[float], mu: Sequence[float], sigma: Sequence[float],
                          k: float = 0.2) -> float:
    lp, m, s = (np.asarray(v, dtype=np.float64) for v in (token_logprobs, mu, sigma))
    if not lp.shape == m.shape == s.shape:
        raise ValueError(f"log-probs, mu and sigma differ in length: {lp.shape}, {m.shape}, {s.shape}")
    z = (lp - m) / np.maximum(s, 1e-12)
    return float(np.mean(_lowest(z, k)))


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    """P(positive > negative) + P(tie)/2 over all pairs; None when either side is empty."""
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def roc_curve(positives: Sequence[float], negatives: Sequence[float]) -> tuple[list[float], list[float]]:
    """(false-positive rates, true-positive rates) for every threshold "score >= t", from (0, 0) to (1, 1)."""
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return [], []
    fpr, tpr = [0.0], [0.0]
    for t in np.unique(np.r_[pos, neg])[::-1]:
        fpr.append(float((neg >= t).mean()))
        tpr.append(float((pos >= t).mean()))
    return fpr, tpr
