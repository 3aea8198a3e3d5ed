"""Early stopping for SalUn on a held-out slice of the user's own forget and retain data (never on evaluation data).

``holdout`` of each set is kept out of training. At every check (each epoch end, or every ``eval_every`` steps)
the mean ordinary loss of the held-out forget answers (``f``: rises as the model forgets) and of the held-out
retain answers (``r``: what must not move) are compared with the model before training (``f0``, ``r0``):

- ``r − r0 > stop_retain_increase``: collateral damage; training stops and the weights go back to the last
  check that was within it (the base itself when none was: the patch is then empty, and a warning says so);
- else the state is kept as the best so far, and training stops early once ``f − f0 ≥ stop_forget_increase``
  (forgotten enough: more steps would only cost retain quality).

Every check is recorded in the patch's metadata (``early_stopping``).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch
from torch import nn

from ..errors import UnlearnDataError

__all__ = ["HoldoutMonitor", "split_holdout"]

logger = logging.getLogger(__name__)


def _take(data: Any, idx: list[int]) -> Any:
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        sel = torch.tensor(idx, dtype=torch.long)
        return data[0][sel], data[1][sel]
    if isinstance(data, dict):
        sel = torch.tensor(idx, dtype=torch.long)
        return {k: v[sel] for k, v in data.items()}
    items = list(data)
    return [items[i] for i in idx]


def _length(data: Any) -> int:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], torch.Tensor):
        return len(data[1])
    if isinstance(data, dict):
        return next(iter(data.values())).shape[0]
    return len(list(data))


def split_holdout(data: Any, fraction: float, seed: int, what: str) -> tuple[Any, Any]:
    """(training part, held-out part) of records, an (x, y) pair or a dict of tensors; at least one of each."""
    n = _length(data)
    k = max(1, round(fraction * n))
    if n - k < 1:
        raise UnlearnDataError(f"the {what} set has {n} examples: too few to hold {fraction:.0%} out for early "
                               "stopping; give more data or set holdout: 0")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held, train = sorted(order[:k]), sorted(order[k:])
    return _take(data, train), _take(data, held)


class HoldoutMonitor:
    """Checks held-out losses during training and keeps the best acceptable weights (see the module doc)."""

    def __init__(self, task, forget_held: Any, retain_held: Any | None, *, batch_size: int,
                 stop_retain_increase: float, stop_forget_increase: float | None):
        self.task = task
        self.forget_batches = task.batches(forget_held, batch_size, shuffle=False, seed=0)
        self.retain_batches = (task.batches(retain_held, batch_size, shuffle=False, seed=0)
                               if retain_held is not None else [])
        self.stop_retain_increase = stop_retain_increase
        self.stop_forget_increase = stop_forget_increase
        self.f0 = self.r0 = None
        self.best: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, Any]] = []

    @torch.no_grad()
    def _mean(self, model: nn.Module, batches: list, fn) -> float:
        if not batches:
            return 0.0
        total = n = 0
        for b in batches:
            k = self.task.batch_size_of(b)
            total += float(fn(model, b)) * k
            n += k
        return total / n

    def losses(self, model: nn.Module) -> tuple[float, float]:
        return (self._mean(model, self.forget_batches, self.task.forget_loss),
                self._mean(model, self.retain_batches, self.task.retain_loss))

    def start(self, model: nn.Module) -> None:
        self.f0, self.r0 = self.losses(model)
        self.history.append({"step": 0, "forget": round(self.f0, 4), "retain": round(self.r0, 4)})

    def check(self, model: nn.Module, params: dict[str, nn.Parameter], step: int) -> bool:
        """Record a check; True means stop now."""
        f, r = self.losses(model)
        entry = {"step": step, "forget": round(f, 4), "retain": round(r, 4)}
        self.history.append(entry)
        if r - self.r0 > self.stop_retain_increase:
            entry["decision"] = "stop: retain loss rose too much; back to the last good check"
            return True
        self.best = {n: p.detach().clone() for n, p in params.items()}
        entry["decision"] = "keep"
        if self.stop_forget_increase is not None and f - self.f0 >= self.stop_forget_increase:
            entry["decision"] = "keep, stop: forgotten enough"
            return True
        return False

    def finish(self, params: dict[str, nn.Parameter], base: dict[str, torch.Tensor]) -> None:
        """Put the best acceptable weights (or the base, if no check was acceptable) into ``params``."""
        chosen = self.best if self.best is not None else base
        if self.best is None:
            logger.warning("early stopping: every check raised the held-out retain loss by more than %.3g, so the "
                           "patch is empty; lower lr, raise retain_weight, or raise stop_retain_increase",
                           self.stop_retain_increase)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(chosen[n])
