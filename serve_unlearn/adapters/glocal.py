"""The detector's statistics: per-layer glocal scores, their one-class-SVM aggregation, and the calibration to w_raw.

Fitting uses scikit-learn (Ledoit-Wolf shrinkage, ``OneClassSVM``); scoring uses only tensors, so a saved detector
scores without any scikit-learn object and without pickle. Arithmetic is float64 (log-densities reach the
thousands on 384-d features and the calibration compares differences of them); stored statistics are float32.

Per layer l, with f_l(x) the masked-mean-pooled hidden state:

- global ``g_l(x) = -1/2 (f_l(x) - mu_l)^T P_l (f_l(x) - mu_l)``, P_l the Ledoit-Wolf precision (n < d, so the
  empirical covariance of the reference is singular);
- local ``c_l(x) = max_j cos(f_l(x), bank_l[j]) - max_k cos(f_l(x), background_l[k])``: the nearest forget text
  against the nearest text of a broad background of ordinary prompts (the second term is absent without a
  background, as in the reference). A one-class score alone rates a prompt by how much it looks like the forget
  texts in *every* respect, question template included, so "What is the name of Earth's natural satellite?" looks
  like "What is the name of a baby kangaroo?"; relative to ordinary traffic only what is specific to the forget
  data counts (the relative-distance idea of Ren et al. 2021, "A simple fix to Mahalanobis distance");
- ``s_l(x) = g_l(x) + gamma * c_l(x)``: both terms rise for forget-like text (see ``detector`` for why the
  reference's ``- gamma * c_l`` is not used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# sigmoid(zeta * p - RANGE_TH): the reference's `range_th`; w_raw spans (sigmoid(-2), sigmoid(zeta - 2))
RANGE_TH = 2.0


@dataclass
class LayerStats:
    """Per-layer Gaussian and nearest-neighbour statistics of the fitted forget texts (L layers, N texts, d dims)."""

    mean: torch.Tensor       # (L, d)
    precision: torch.Tensor  # (L, d, d)
    bank: torch.Tensor       # (L, N, d), rows L2-normalised
    background: torch.Tensor | None = None  # (L, M, d), rows L2-normalised: ordinary prompts' features

    def __post_init__(self):
        # a NaN anywhere makes every score NaN or every comparison false: a detector that cannot say "forget"
        parts = [self.mean, self.precision, self.bank] + ([] if self.background is None else [self.background])
        if not all(bool(torch.isfinite(t).all()) for t in parts):
            raise ValueError("the detector statistics hold non-finite values")

    @classmethod
    def fit(cls, feats: torch.Tensor, background: torch.Tensor | None = None) -> LayerStats:
        """``feats``: (L, N, d) pooled features of the texts the detector is fitted on; ``background``: (L, M, d)
        features of ordinary prompts, or None for the reference's purely one-class local term."""
        from sklearn.covariance import LedoitWolf

        x = feats.double()
        precision = torch.stack([torch.from_numpy(LedoitWolf().fit(layer.numpy()).precision_) for layer in x])
        # rounded to the float32 they are stored in, so a loaded detector scores exactly as the trained one
        stored = [t.float().double() for t in (x.mean(dim=1), precision, _unit(x))]
        return cls(*stored, background=None if background is None else _unit(background.double()).float().double())

    def parts(self, feats: torch.Tensor, shared: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, c), each (n, L), of (L, n, d) features: the Gaussian log-density and the local term.

        ``shared``: (k, n) nearest-background cosines of the first k layers, when another detector with the same
        background has already computed them on the same features (an ensemble's layers below every LoRA)."""
        x = feats.double()
        centred = x - self.mean[:, None, :]
        g = -0.5 * ((centred @ self.precision) * centred).sum(dim=-1)
        unit = _unit(x)
        c = torch.einsum("lnd,lmd->lnm", unit, self.bank).amax(dim=-1)
        if self.background is not None:
            k = 0 if shared is None else shared.shape[0]
            own = self.background_cos(feats[k:], first_layer=k)
            c = c - (own if shared is None else torch.cat([shared, own]))
        return g.T, c.T

    def background_cos(self, feats: torch.Tensor, first_layer: int = 0) -> torch.Tensor:
        """(l, n) nearest-neighbour cosine to the background of (l, n, d) features of layers first_layer, ..."""
        background = self.background[first_layer:first_layer + feats.shape[0]]
        return torch.einsum("lnd,lmd->lnm", _unit(feats.double()), background).amax(dim=-1)

    def scores(self, feats: torch.Tensor, gamma: float, shared: torch.Tensor | None = None) -> torch.Tensor:
        """(n, L) glocal scores g + gamma * c."""
        g, c = self.parts(feats, shared)
        return g + gamma * c

    def tensors(self) -> dict[str, torch.Tensor]:
        """float32 for storage (a roberta-large detector's 24 precision matrices are 100 MB so)."""
        out = {"mean": self.mean.float(), "precision": self.precision.float(), "bank": self.bank.float()}
        if self.background is not None:
            out["background"] = self.background.float()
        return out


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def crossfit_parts(feats: torch.Tensor, folds: int, seed: int,
                   background: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-fold (g, c), each (N, L), of the fitted texts themselves.

    Scored in-sample, every text finds itself in the bank (cosine 1) and sits inside a Gaussian fitted on it
    (its log-density far above a new text's from the same topic; README), so the SVM and mu1
    would describe a distribution no new prompt comes from. K-fold scores look like new forget-like text.
    """
    n = feats.shape[1]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    g, c = (torch.empty(n, feats.shape[0], dtype=torch.float64) for _ in range(2))
    for held in order.tensor_split(folds):
        keep = torch.ones(n, dtype=torch.bool)
        keep[held] = False
        g[held], c[held] = LayerStats.fit(feats[:, keep], background).parts(feats[:, held])
    return g, c


@dataclass
class LinearOCSVM:
    """d_H(x) = coef . (s(x) + shift) - offset: scikit-learn's linear ``OneClassSVM.decision_function`` on
    translated scores, kept as numbers.

    A linear one-class SVM separates the data from the origin, so where the origin sits matters: the scores are
    translated so that the least of them is 1, wherever the log-densities and the (background-relative) cosines
    put them. Its weights are then a non-negative mix of positive vectors, so every layer counts forget-like text
    for the request, never against it.
    """

    coef: torch.Tensor  # (L,)
    offset: float
    shift: float = 0.0

    def __post_init__(self):
        if not (bool(torch.isfinite(self.coef).all()) and math.isfinite(self.offset) and math.isfinite(self.shift)):
            raise ValueError("the one-class SVM holds non-finite values")

    @classmethod
    def fit(cls, scores: torch.Tensor, nu: float) -> LinearOCSVM:
        from sklearn.svm import OneClassSVM

        shift = 1.0 - float(scores.min())
        moved = scores.double() + shift
        # one global scale (the dual of the linear one-class SVM is invariant to it) keeps libsvm's absolute
        # stopping tolerance meaningful when log-densities are in the thousands
        scale = float(moved.mean())
        svm = OneClassSVM(kernel="linear", nu=nu).fit((moved / scale).numpy())
        return cls(coef=torch.from_numpy(svm.coef_.ravel() / scale).double(), offset=float(svm.offset_[0]),
                   shift=shift)

    def decision(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores.double() + self.shift) @ self.coef - self.offset


@dataclass
class Calibration:
    """The reference's two-component construction with a one-sided test (deviation: see ``detector``).

    F(x) = 1/2 Phi((x - mu1)/sigma2) + 1/2 Phi((x - mu2)/sigma2), x0 = (mu1 + mu2)/2;
    p(d) = 1 for d >= x0, else 1 - (F(2 x0 - d) - F(d)); w_raw = sigmoid(zeta p - 2).
    """

    mu1: float     # mean d_H of the fitted texts (out-of-fold)
    mu2: float     # mean d_H of the held-out calibration texts
    sigma2: float  # their standard deviation
    zeta: float

    @classmethod
    def fit(cls, fitted: torch.Tensor, held_out: torch.Tensor, zeta: float) -> Calibration:
        mu2 = float(held_out.mean())
        # ddof=1: the calibration set is small (>= 4 texts); the floor keeps identical scores from dividing by 0
        sigma2 = max(float(held_out.std(correction=1)), 1e-6 * max(1.0, abs(mu2)))
        return cls(mu1=float(fitted.mean()), mu2=mu2, sigma2=sigma2, zeta=zeta)

    @property
    def x0(self) -> float:
        return (self.mu1 + self.mu2) / 2

    def _cdf(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.special.ndtr((x - self.mu1) / self.sigma2) + 0.5 * torch.special.ndtr(
            (x - self.mu2) / self.sigma2)

    def weights(self, d: torch.Tensor) -> torch.Tensor:
        """w_raw in (sigmoid(-2), sigmoid(zeta - 2)), monotone non-decreasing in d_H."""
        d = d.double()
        p = torch.where(d >= self.x0, torch.ones_like(d), 1 - (self._cdf(2 * self.x0 - d) - self._cdf(d)))
        return torch.sigmoid(self.zeta * p - RANGE_TH)

    def to_json(self) -> dict[str, float]:
        return {"mu1": self.mu1, "mu2": self.mu2, "sigma2": self.sigma2, "zeta": self.zeta}

    @classmethod
    def from_json(cls, data: dict) -> Calibration:
        values = {k: float(data[k]) for k in ("mu1", "mu2", "sigma2", "zeta")}
        if not all(math.isfinite(v) for v in values.values()) or values["sigma2"] <= 0 or values["zeta"] <= 0:
            raise ValueError(f"calibration values are not finite, or sigma2 or zeta <= 0 (a zeta of 0 gives every "
                             f"prompt the same weight): {values}")
        return cls(**values)

    @property
    def max_weight(self) -> float:
        """The largest weight this detector can give (p = 1)."""
        return 1.0 / (1.0 + math.exp(RANGE_TH - self.zeta))
