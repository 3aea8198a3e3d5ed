"""The losses SalUn minimises inside its mask: a forget term and a retain term, chosen by name.

Forget terms (``SalUnConfig.forget_loss``), as the unlearning literature and OpenUnlearning name them:

- ``swap``: the task's swapped-target loss (causal LMs: a refusal or another forget answer; classifiers: a random
  other label; UNets: the remapped concept). SalUn's own; the default.
- ``ga``: gradient ascent on the forget data's ordinary loss (unbounded: the baseline everyone beats).
- ``npo`` (Zhang et al., 2024): -(2/β)·mean log σ(-β·(log π_θ(y|x) − log π_ref(y|x))), with log π the summed
  log-likelihood of the answer and π_ref the model before unlearning. Bounded: once an answer is far less likely
  than under the reference its gradient fades, which is what keeps GA's collapse away.
- ``simnpo`` (Fan et al., 2024): -(2/β)·mean log σ(-(β/|y|)·log π_θ(y|x) − γ), reference-free and length
  normalised (|y| = answer tokens).

Retain terms (``SalUnConfig.retain_loss``): ``nll`` (the retain data's ordinary loss) or ``kl``: KL(π_ref ‖ π_θ)
over the answer tokens of the retain data, which pins the model's whole output distribution there rather than
only the likelihood of one answer.

``npo`` and ``kl`` need π_ref: a frozen copy of the model taken before training (one more model in memory, no
gradients). Causal-LM batches (``{"true", "swapped"}``) and classifier batches (``(x, y)``) are supported; a
diffusion UNet has no likelihood here, so it takes ``swap``/``ga`` with ``nll``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnlearnConfigError

__all__ = ["FORGET_LOSSES", "RETAIN_LOSSES", "Objective", "answer_logprob"]

FORGET_LOSSES = ("swap", "ga", "npo", "simnpo")
RETAIN_LOSSES = ("nll", "kl")


def _lm_logits(model: nn.Module, enc: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits (float32) and their labels (-100 outside the answer), shifted to line up."""
    dev = next(model.parameters()).device
    out = model(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev))
    return out.logits[:, :-1].float(), enc["labels"][:, 1:].to(dev)


def answer_logprob(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the summed log-likelihood of the answer and its length in tokens (1 for a class label)."""
    if isinstance(batch, dict) and "true" in batch:
        logits, labels = _lm_logits(model, batch["true"])
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        n = (labels != -100).sum(dim=1)
        return -nll.sum(dim=1), n.clamp(min=1).to(nll.dtype)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        logp = -F.cross_entropy(model(x), y, reduction="none")
        return logp, torch.ones_like(logp)
    raise UnlearnConfigError("this forget/retain loss needs a likelihood: causal-LM or classifier data; use "
                             "forget_loss 'swap' or 'ga' and retain_loss 'nll' for this task")


def _kl_to_reference(model: nn.Module, reference: nn.Module, batch: Any) -> torch.Tensor:
    """Mean over answer tokens (or examples) of KL(π_ref ‖ π_θ)."""
    if isinstance(batch, dict) and "true" in batch:
        logits, labels = _lm_logits(model, batch["true"])
        with torch.no_grad():
            ref_logits, _ = _lm_logits(reference, batch["true"])
        keep = labels != -100
        cur, ref = logits[keep], ref_logits[keep]
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        cur = model(batch[0]).float()
        with torch.no_grad():
            ref = reference(batch[0]).float()
    else:
        raise UnlearnConfigError("retain_loss 'kl' needs causal-LM or classifier data; use 'nll' for this task")
    return F.kl_div(F.log_softmax(cur, -1), F.log_softmax(ref, -1), reduction="batchmean", log_target=True)


class Objective:
    """``forget(model, batch)`` and ``retain(model, batch)`` for one configuration; owns the frozen reference."""

    def __init__(self, task, model: nn.Module, *, forget_loss: str = "swap", retain_loss: str = "nll",
                 npo_beta: float = 0.1, simnpo_beta: float = 2.5, simnpo_gamma: float = 0.0):
        if forget_loss not in FORGET_LOSSES:
            raise UnlearnConfigError(f"forget_loss must be one of {FORGET_LOSSES}, got {forget_loss!r}")
        if retain_loss not in RETAIN_LOSSES:
            raise UnlearnConfigError(f"retain_loss must be one of {RETAIN_LOSSES}, got {retain_loss!r}")
        self.task, self.forget_loss, self.retain_loss = task, forget_loss, retain_loss
        self.npo_beta, self.simnpo_beta, self.simnpo_gamma = npo_beta, simnpo_beta, simnpo_gamma
        self.reference: nn.Module | None = None
        if forget_loss == "npo" or retain_loss == "kl":
            self.reference = copy.deepcopy(model).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)

    def forget(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if self.forget_loss == "swap":
            return self.task.unlearn_loss(model, batch)
        if self.forget_loss == "ga":
            return -self.task.forget_loss(model, batch)
        logp, n = answer_logprob(model, batch)
        if self.forget_loss == "npo":
            with torch.no_grad():
                ref, _ = answer_logprob(self.reference, batch)
            beta = self.npo_beta
            return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref)).mean()
        beta = self.simnpo_beta
        return -(2.0 / beta) * F.logsigmoid(-(beta / n) * logp - self.simnpo_gamma).mean()

    def retain(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if self.retain_loss == "kl":
            return _kl_to_reference(model, self.reference, batch)
        return self.task.retain_loss(model, batch)

    def close(self) -> None:
        self.reference = None
