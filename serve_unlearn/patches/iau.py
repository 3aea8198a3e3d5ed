"""IAU (Liu et al., 2025) as a patch: one update from gradients at the original weights, no Hessian.

g = ∇[mean retain loss − mean forget loss](θ*). Step rules: ``adam1`` is the reference code's single step of a
fresh Adam (bias-corrected moments are g and g², so Δ = −lr·g/(|g|+1e-8): a sign-like step of size lr on every
weight, a dense patch); ``sgd`` is Δ = −lr·g. ``mask_ratio`` keeps only the most salient weights (|Σ∇ forget|,
from the same backward passes), which makes the patch sparse (``iau-masked``). Runs in eval mode (the reference
left BatchNorm in train mode; we keep its statistics out of the edit).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..data import as_records, data_digest
from .config import IAUConfig
from .format import WeightPatch
from .saliency import accumulate_gradients, saliency_masks, select_parameters
from .salun import cast_all, snapshot
from .tasks import UnlearnTask

ADAM_EPS = 1e-8


def iau(model: nn.Module, task: UnlearnTask, forget: Any, retain: Any, config: IAUConfig | None = None, *,
        progress: bool = True, patch_dtype: torch.dtype | None = None,
        on_step: Callable[[str, int, int], None] | None = None, **meta: Any) -> WeightPatch:
    """Compute an IAU patch; ``model`` is left unchanged. ``patch_dtype`` as in :func:`salun`; ``on_step(
    "gradients", batch, batches)`` after each retain and forget batch."""
    config = config or IAUConfig()
    params = select_parameters(model, config.include, config.exclude)
    forget_batches = task.batches(forget, config.batch_size, seed=config.seed)
    retain_batches = task.batches(retain, config.batch_size, seed=config.seed)
    n_f = sum(task.batch_size_of(b) for b in forget_batches)
    n_r = sum(task.batch_size_of(b) for b in retain_batches)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
            torch.manual_seed(config.seed)
            g_r, g_f = _gradients(model, task, params, forget_batches, retain_batches, n_f, n_r, progress, on_step)
    finally:
        model.train(was_training)
    masks = (saliency_masks({n: g.abs() for n, g in g_f.items()}, config.mask_ratio, scope=config.scope)
             if config.mask_ratio else None)
    base = snapshot(params)
    edited = {}
    for n in params:
        g = g_r[n] - g_f[n]
        delta = -config.lr * (g / (g.abs() + ADAM_EPS) if config.step == "adam1" else g)
        if masks is not None:
            delta = delta * masks[n]
        edited[n] = (base[n].to(torch.float32) + delta).to(base[n].dtype)
    meta.setdefault("forget_digest", data_digest(as_records(forget)))
    meta.setdefault("retain_digest", data_digest(as_records(retain)))
    return WeightPatch.from_diff(
        cast_all(base, patch_dtype), cast_all(edited, patch_dtype),
        method="iau-masked" if masks is not None else "iau", hparams=config.model_dump(), seconds=f"{time.perf_counter() - start:.4f}", **meta,
    )


def _gradients(model, task, params, forget_batches, retain_batches, n_f, n_r, progress, on_step=None):
    """∇ mean retain loss and ∇ mean forget loss; batch weights turn per-batch means into set means."""
    total = len(retain_batches) + len(forget_batches)
    report = on_step or (lambda phase, step, total: None)
    g_r = accumulate_gradients(model, params, retain_batches, task.retain_loss,
                               lambda b: task.batch_size_of(b) / n_r, desc="iau retain", progress=progress,
                               on_batch=lambda i: report("gradients", i, total))
    g_f = accumulate_gradients(model, params, forget_batches, task.forget_loss,
                               lambda b: task.batch_size_of(b) / n_f, desc="iau forget", progress=progress,
                               on_batch=lambda i: report("gradients", len(retain_batches) + i, total))
    return g_r, g_f


def gradient_restriction_loss(loss: torch.Tensor, params, alpha: float = 0.005) -> torch.Tensor:
    """IAU's training-time regulariser: loss + α·Σ_P ||∇_P loss||₂ (per-tensor norms, double backprop).

    Use it when fine-tuning a model that may later receive deletion requests: small gradients keep IAU's
    first-order approximation accurate. Costs a second backward pass.
    """
    params = [p for p in params if p.requires_grad]
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return loss + alpha * sum(g.norm() for g in grads)
