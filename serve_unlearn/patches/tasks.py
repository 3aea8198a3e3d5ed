"""Losses per model kind, so SalUn and IAU are written once for classifiers, causal LMs and diffusion UNets.

Each task turns user data into batches and gives three losses on a batch (the causal-LM task, which O3 shares,
lives in :mod:`serve_unlearn.causal_lm` and is re-exported here):

- ``forget_loss``: the model's ordinary loss on the forget data (its gradient defines saliency, and IAU ascends it);
- ``unlearn_loss``: the loss with swapped targets that SalUn descends (random labels; refusal or another answer;
  the concept remapped onto another prompt's prediction, with a stop-gradient target);
- ``retain_loss``: the ordinary loss on retain data, which keeps utility.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..causal_lm import REFUSALS, CausalLMTask
from ..data import index_batches, require_examples

__all__ = ["REFUSALS", "CausalLMTask", "ClassifierTask", "DiffusionTask", "UnlearnTask"]

Batch = Any


class UnlearnTask(Protocol):
    def batches(self, data: Any, batch_size: int, *, shuffle: bool, seed: int) -> list[Batch]: ...
    def batch_size_of(self, batch: Batch) -> int: ...
    def forget_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...
    def unlearn_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...
    def retain_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...


# -- classifiers -----------------------------------------------------------------------------------------------
@dataclass
class ClassifierTask:
    """Data: a pair ``(x, y)`` of tensors. SalUn's home setting: random labels on the forget set (y' != y)."""

    num_classes: int

    def batches(self, data, batch_size, *, shuffle=False, seed=0):
        x, y = data
        require_examples(len(y), "data")
        return [(x[idx], y[idx]) for idx in index_batches(len(y), batch_size, shuffle, seed)]

    def batch_size_of(self, batch):
        return len(batch[1])

    def forget_loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    retain_loss = forget_loss

    def unlearn_loss(self, model, batch):
        x, y = batch
        # uniform over the other classes: the paper's y' != y (the reference code may draw y' == y)
        shift = torch.randint(1, self.num_classes, y.shape, device=y.device)
        return F.cross_entropy(model(x), (y + shift) % self.num_classes)


# -- diffusion UNets -------------------------------------------------------------------------------------------
@dataclass
class DiffusionTask:
    """SalUn's concept forgetting for a diffusers ``UNet2DConditionModel``.

    Data: a dict of tensors ``latents`` [N, C, h, w] (VAE latents, already scaled), ``cond`` [N, L, D] (text
    embeddings of the concept to forget, or of the retain prompts) and, for forget data, ``target_cond`` (the
    embeddings of the prompt c' the concept is remapped onto). ``guidance`` > 0 with ``uncond`` [1, L, D] makes the
    saliency loss use the CFG-guided prediction, as the SD reference does (w = 7.5).
    """

    scheduler: Any
    guidance: float = 0.0
    uncond: torch.Tensor | None = None

    def batches(self, data, batch_size, *, shuffle=False, seed=0):
        n = data["latents"].shape[0]
        require_examples(n, "data")
        return [{k: v[idx] for k, v in data.items()} for idx in index_batches(n, batch_size, shuffle, seed)]

    def batch_size_of(self, batch):
        return batch["latents"].shape[0]

    def _noisy(self, batch):
        z0 = batch["latents"]
        noise = torch.randn_like(z0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (z0.shape[0],), device=z0.device)
        return self.scheduler.add_noise(z0, noise, t), noise, t

    def forget_loss(self, model, batch):
        zt, noise, t = self._noisy(batch)
        pred = model(zt, t, encoder_hidden_states=batch["cond"]).sample
        if self.guidance and self.uncond is not None:
            u = model(zt, t, encoder_hidden_states=self.uncond.expand_as(batch["cond"])).sample
            pred = (1 + self.guidance) * pred - self.guidance * u
        return F.mse_loss(pred, noise)

    def retain_loss(self, model, batch):
        zt, noise, t = self._noisy(batch)
        return F.mse_loss(model(zt, t, encoder_hidden_states=batch["cond"]).sample, noise)

    def unlearn_loss(self, model, batch):
        zt, _, t = self._noisy(batch)
        with torch.no_grad():
            target = model(zt, t, encoder_hidden_states=batch["target_cond"]).sample
        return F.mse_loss(model(zt, t, encoder_hidden_states=batch["cond"]).sample, target)
