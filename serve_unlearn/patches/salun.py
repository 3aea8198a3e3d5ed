"""SalUn (Fan et al., ICLR 2024) as a patch: only the salient weights move, and the patch carries exactly them.

Deviations from the reference code, on purpose: the mask is *hard* (gradients masked, no weight decay, optimizer
state masked, and the weights outside the mask restored after every step, so nothing outside it moves, which the
reference's weight decay broke until 2026); forget and retain batches are interleaved in one loop (GradDiff
style) rather than two sequential passes; random labels never equal the true label.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import SalUnConfig
from .fingerprint import data_digest
from .format import WeightPatch
from .saliency import accumulate_gradients, saliency_masks, select_parameters
from .tasks import UnlearnTask


def snapshot(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def restore(params: dict[str, nn.Parameter], saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])


def train_masked(model: nn.Module, params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor],
                 task: UnlearnTask, forget_batches: list, retain_batches: list, *, lr: float, epochs: int,
                 retain_weight: float, optimizer: str = "adam", momentum: float = 0.0, progress: bool = True) -> None:
    """Minimise unlearn_loss(forget) + α·retain_loss(retain), moving only the masked weights."""
    original = {n: p.detach().clone() for n, p in params.items()}
    trainable = [p for n, p in params.items() if bool(masks[n].any())]
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    opt = (torch.optim.Adam(trainable, lr=lr, weight_decay=0.0) if optimizer == "adam"
           else torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=0.0))
    retain_cycle = itertools.cycle(retain_batches) if retain_batches else None
    steps = epochs * len(forget_batches)
    try:
        with tqdm(total=steps, desc="salun", disable=not progress) as bar:
            for _ in range(epochs):
                for fb in forget_batches:
                    opt.zero_grad(set_to_none=True)
                    loss = task.unlearn_loss(model, fb)
                    if retain_cycle is not None and retain_weight:
                        loss = loss + retain_weight * task.retain_loss(model, next(retain_cycle))
                    loss.backward()
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
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
                    bar.update()
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(frozen[n])
        model.zero_grad(set_to_none=True)


def salun(model: nn.Module, task: UnlearnTask, forget: Any, retain: Any | None = None,
          config: SalUnConfig | None = None, *, keep_edits: bool = False, progress: bool = True,
          patch_dtype: torch.dtype | None = None, **meta: Any) -> WeightPatch:
    """Compute a SalUn patch for ``model`` (trained in place; restored to the base unless ``keep_edits``).

    The patch is in the dtype of the model's weights, so applying it reproduces the unlearned model bit for bit;
    ``patch_dtype`` makes it for the checkpoint's dtype instead (train in float32 on a bfloat16 checkpoint:
    weights outside the mask round-trip exactly, so the patch still touches only the mask).
    """
    config = config or SalUnConfig()
    params = select_parameters(model, config.include, config.exclude)
    forget_batches = task.batches(forget, config.batch_size, shuffle=True, seed=config.seed)
    retain_batches = task.batches(retain, config.batch_size, shuffle=True, seed=config.seed) if retain is not None else []
    torch.manual_seed(config.seed)
    was_training = model.training
    model.eval()  # no dropout; BatchNorm statistics are not part of the edit
    start = time.perf_counter()
    base = snapshot(params)
    try:
        grads = accumulate_gradients(model, params, forget_batches, task.forget_loss, desc="saliency",
                                     progress=progress)
        saliency = {n: g.abs_() for n, g in grads.items()}
        masks = saliency_masks(saliency, config.ratio, scope=config.scope, threshold=config.threshold)
        del saliency, grads
        train_masked(model, params, masks, task, forget_batches, retain_batches, lr=config.lr,
                     epochs=config.epochs, retain_weight=config.retain_weight, optimizer=config.optimizer,
                     momentum=config.momentum, progress=progress)
        edited = snapshot(params)
    finally:
        if not keep_edits:
            restore(params, base)
        model.train(was_training)
    meta.setdefault("forget_digest", data_digest(_records(forget)))
    if retain is not None:
        meta.setdefault("retain_digest", data_digest(_records(retain)))
    return WeightPatch.from_diff(
        cast_all(base, patch_dtype), cast_all(edited, patch_dtype), method="salun", hparams=config.model_dump(), seconds=f"{time.perf_counter() - start:.2f}",
        mask_ratio=str(config.ratio), **meta,
    )


def cast_all(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return tensors if dtype is None else {n: t.to(dtype) for n, t in tensors.items()}


def _records(data: Any):
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor):
        return list(data)
    if isinstance(data, dict):
        return [data[k] for k in sorted(data)]
    return list(data)
