"""SalUn (Fan et al., ICLR 2024) as a patch: only the salient weights move, and the patch carries exactly them.

Forget and retain losses are chosen in the config (``forget_loss``: swap, ga, npo, simnpo; ``retain_loss``: nll,
kl; ``objectives``), and ``holdout`` turns on early stopping on a held-out slice of the forget and retain data
(``early_stop``).

Deviations from the reference code, on purpose: the mask is *hard* (gradients masked, no weight decay, optimizer
state masked, and the weights outside the mask restored after every step, so nothing outside it moves, which the
reference's weight decay broke until 2026); forget and retain batches are interleaved in one loop (GradDiff
style) rather than two sequential passes; random labels never equal the true label.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import as_records, data_digest
from .config import SalUnConfig
from .early_stop import HoldoutMonitor, split_holdout
from .format import WeightPatch
from .objectives import Objective
from .saliency import accumulate_gradients, saliency_masks, select_parameters
from .tasks import UnlearnTask


def snapshot(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def restore(params: dict[str, nn.Parameter], saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])


def retain_groups(n_forget: int, retain_batches: list) -> list[list]:
    """Spread the retain batches over the forget steps: one full retain pass per epoch (as the reference's
    retain pass), interleaved; cycled when there are fewer retain batches than forget steps."""
    if not retain_batches:
        return [[] for _ in range(n_forget)]
    r = len(retain_batches)
    if r < n_forget:
        return [[retain_batches[i % r]] for i in range(n_forget)]
    groups: list[list] = [[] for _ in range(n_forget)]
    for j, batch in enumerate(retain_batches):
        groups[j * n_forget // r].append(batch)
    return groups


def train_masked(model: nn.Module, params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor],
                 task: UnlearnTask, epoch_batches: Callable[[int], tuple[list, list]], *, lr: float, epochs: int,
                 retain_weight: float, optimizer: str = "adam", momentum: float = 0.0, progress: bool = True,
                 objective: Objective | None = None, monitor: HoldoutMonitor | None = None,
                 eval_every: int = 0, on_step: Callable[[int, int], None] | None = None) -> None:
    """Minimise forget(forget) + α·mean retain(retain), moving only the masked weights.

    ``epoch_batches(epoch)`` returns that epoch's (forget batches, retain batches), so each epoch can reshuffle.
    ``objective`` gives the two losses (default: the task's swapped-target loss and its retain loss); ``monitor``
    is checked every ``eval_every`` steps (0: each epoch end) and may stop training, leaving its best weights.
    ``on_step(step, total)`` after each step (total: steps of every epoch, if none stops early).
    """
    forget_fn = objective.forget if objective is not None else task.unlearn_loss
    retain_fn = objective.retain if objective is not None else task.retain_loss
    original = {n: p.detach().clone() for n, p in params.items()}
    trainable = [p for n, p in params.items() if bool(masks[n].any())]
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    opt = (torch.optim.Adam(trainable, lr=lr, weight_decay=0.0) if optimizer == "adam"
           else torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=0.0))
    step, stop = 0, False
    if monitor is not None:
        monitor.start(model)
    try:
        bar = tqdm(total=epochs, desc="salun epochs", disable=not progress)
        for epoch in range(epochs):
            forget_batches, retain_batches = epoch_batches(epoch)
            for fb, group in zip(forget_batches, retain_groups(len(forget_batches), retain_batches)):
                opt.zero_grad(set_to_none=True)
                loss = forget_fn(model, fb)
                loss.backward()
                for rb in group if retain_weight else []:  # one backward each: bounded activation memory
                    (retain_weight / len(group) * retain_fn(model, rb)).backward()
                with torch.no_grad():
                    for n, p in params.items():
                        if p.grad is not None:
                            p.grad.mul_(masks[n])
                opt.step()
                with torch.no_grad():  # the hard mask: whatever the optimizer did outside it is undone
                    for n, p in params.items():
                        p.copy_(torch.where(masks[n], p, original[n]))
                        for state in opt.state.get(p, {}).values():
                            if isinstance(state, torch.Tensor) and state.shape == p.shape:
                                state.mul_(masks[n])
                bar.set_postfix(forget_loss=f"{float(loss.detach()):.3f}")
                step += 1
                if on_step is not None:
                    on_step(step, epochs * len(forget_batches))
                if monitor is not None and eval_every and step % eval_every == 0:
                    stop = monitor.check(model, params, step)
                    if stop:
                        break
            if monitor is not None and not eval_every and not stop:
                stop = monitor.check(model, params, step)
            bar.update()
            if stop:
                break
        bar.close()
        if monitor is not None:
            monitor.finish(params, original)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(frozen[n])
        model.zero_grad(set_to_none=True)


def salun(model: nn.Module, task: UnlearnTask, forget: Any, retain: Any | None = None,
          config: SalUnConfig | None = None, *, keep_edits: bool = False, progress: bool = True,
          patch_dtype: torch.dtype | None = None, on_step: Callable[[str, int, int], None] | None = None,
          **meta: Any) -> WeightPatch:
    """Compute a SalUn patch for ``model`` (trained in place; restored to the base unless ``keep_edits``).

    The patch is in the dtype of the model's weights, so applying it reproduces the unlearned model bit for bit;
    ``patch_dtype`` makes it for the checkpoint's dtype instead (train in float32 on a bfloat16 checkpoint:
    weights outside the mask round-trip exactly, so the patch still touches only the mask).
    ``on_step(phase, step, total)`` reports progress (phases ``saliency``, then ``training``); an exception it
    raises stops the work, with the model restored.
    """
    config = config or SalUnConfig()
    params = select_parameters(model, config.include, config.exclude)
    meta.setdefault("forget_digest", data_digest(as_records(forget)))
    if retain is not None:
        meta.setdefault("retain_digest", data_digest(as_records(retain)))
    forget_held = retain_held = None
    if config.holdout:
        forget, forget_held = split_holdout(forget, config.holdout, config.seed, "forget")
        if retain is not None:
            retain, retain_held = split_holdout(retain, config.holdout, config.seed, "retain")
    forget_batches = task.batches(forget, config.batch_size, shuffle=True, seed=config.seed)
    retain_size = config.retain_batch_size or config.batch_size

    def epoch_batches(epoch: int) -> tuple[list, list]:
        seed = config.seed + epoch
        fb = forget_batches if epoch == 0 else task.batches(forget, config.batch_size, shuffle=True, seed=seed)
        rb = task.batches(retain, retain_size, shuffle=True, seed=seed) if retain is not None else []
        return fb, rb

    was_training = model.training
    model.eval()  # no dropout; BatchNorm statistics are not part of the edit
    start = time.perf_counter()
    base = snapshot(params)
    monitor = None
    if forget_held is not None:
        monitor = HoldoutMonitor(task, forget_held, retain_held, batch_size=config.retain_batch_size or
                                 config.batch_size, stop_retain_increase=config.stop_retain_increase,
                                 stop_forget_increase=config.stop_forget_increase)
    try:
        with torch.random.fork_rng(devices=[]):  # our seeding must not reset the caller's random state
            torch.manual_seed(config.seed)
            edited = _salun_edit(model, task, params, forget_batches, epoch_batches, config, progress, base,
                                 keep_edits, monitor, on_step)
    finally:
        model.train(was_training)
    if monitor is not None:
        meta.setdefault("early_stopping", json.dumps(monitor.history))  # header values are strings
    return WeightPatch.from_diff(
        cast_all(base, patch_dtype), cast_all(edited, patch_dtype), method="salun", hparams=config.model_dump(),
        seconds=f"{time.perf_counter() - start:.4f}", mask_ratio=str(config.ratio), **meta,
    )


def _salun_edit(model, task, params, forget_batches, epoch_batches, config, progress, base, keep_edits, monitor,
                on_step=None):
    """Saliency, mask, masked training; returns the edited parameters (the model restored unless keep_edits)."""
    objective = None
    report = on_step or (lambda phase, step, total: None)
    try:
        grads = accumulate_gradients(model, params, forget_batches, task.forget_loss, desc="saliency",
                                     progress=progress,
                                     on_batch=lambda i: report("saliency", i, len(forget_batches)))
        saliency = {n: g.abs_() for n, g in grads.items()}
        if config.saliency_retain_weight:
            for sal in saliency.values():
                sal.div_(len(forget_batches))  # mean gradients, comparable with the retain ones
            # contrastive saliency: weights the forget data leans on *and the retain data does not*
            retain_batches = epoch_batches(0)[1]
            if retain_batches:
                r = accumulate_gradients(model, params, retain_batches, task.retain_loss, desc="retain saliency",
                                         progress=progress)
                for n, sal in saliency.items():
                    sal.sub_(r[n].abs_().div_(len(retain_batches)), alpha=config.saliency_retain_weight)
                del r
        masks = saliency_masks(saliency, config.ratio, scope=config.scope, threshold=config.threshold)
        del grads, saliency
        objective = Objective(task, model, forget_loss=config.forget_loss, retain_loss=config.retain_loss,
                              npo_beta=config.npo_beta, simnpo_beta=config.simnpo_beta,
                              simnpo_gamma=config.simnpo_gamma)
        train_masked(model, params, masks, task, epoch_batches, lr=config.lr, epochs=config.epochs,
                     retain_weight=config.retain_weight, optimizer=config.optimizer, momentum=config.momentum,
                     progress=progress, objective=objective, monitor=monitor, eval_every=config.eval_every,
                     on_step=lambda step, total: report("training", step, total))
        return snapshot(params)
    finally:
        if objective is not None:
            objective.close()
        if not keep_edits:
            restore(params, base)


def cast_all(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return tensors if dtype is None else {n: t.to(dtype) for n, t in tensors.items()}
