"""Hyperparameters of the patch-producing methods, validated (pydantic) so a typo fails before any training."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..config import StrictConfig


class SalUnConfig(StrictConfig):
    """SalUn: saliency mask on the forget loss, then target-swapping training confined to the mask.

    Defaults (lr 1e-5, batch 8) suit language models; small classifiers need a larger lr (e.g. 3e-4 with Adam).
    """

    ratio: float = Field(0.5, gt=0.0, le=1.0, description="fraction of selected weights in the mask")
    scope: Literal["global", "per_tensor"] = "global"
    threshold: Literal["kthvalue", "histogram"] = "kthvalue"
    saliency_retain_weight: float = Field(0.0, ge=0.0, description="λ of a contrastive saliency |∇forget| − "
                                          "λ·|∇retain| (mean gradients): prefer weights the retain data does not "
                                          "use; 0 is SalUn's own")
    include: list[str] = Field(default_factory=list, description="regexes over parameter names (empty: all)")
    exclude: list[str] = Field(default_factory=list)
    lr: float = Field(1e-5, gt=0.0)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(8, ge=1)
    retain_batch_size: int | None = Field(None, ge=1, description="default: batch_size; one retain pass per epoch")
    retain_weight: float = Field(1.0, ge=0.0, description="α: weight of the retain loss")
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="SGD momentum (masked like the gradients)")
    forget_target: Literal["refusal", "random-answer"] = Field(
        "refusal", description="causal LMs only: what forget prompts are trained to answer (forget_loss 'swap')")
    forget_loss: Literal["swap", "ga", "npo", "simnpo"] = Field(
        "swap", description="swap: the swapped target (refusal, random label); ga; npo; simnpo (objectives.py)")
    retain_loss: Literal["nll", "kl"] = Field("nll", description="nll, or kl: KL to the base model's outputs")
    npo_beta: float = Field(0.1, gt=0.0)
    simnpo_beta: float = Field(2.5, gt=0.0)
    simnpo_gamma: float = Field(0.0, ge=0.0)
    holdout: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of forget and retain data held out for "
                           "early stopping (0: off; early_stop.py)")
    eval_every: int = Field(0, ge=0, description="steps between early-stopping checks (0: each epoch end)")
    stop_retain_increase: float = Field(0.05, ge=0.0, description="held-out retain loss rise (nats) that stops "
                                        "training and goes back to the last check within it")
    stop_forget_increase: float | None = Field(None, gt=0.0, description="held-out forget loss rise that is "
                                               "enough (stop early); None: train all epochs")
    seed: int = 0


class IAUConfig(StrictConfig):
    """IAU: one update from g = ∇[mean retain loss − mean forget loss] at the original weights."""

    lr: float = Field(1e-3, gt=0.0)
    step: Literal["adam1", "sgd"] = "adam1"
    mask_ratio: float | None = Field(None, gt=0.0, le=1.0, description="set for iau-masked (sparse patch)")
    scope: Literal["global", "per_tensor"] = "global"
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    batch_size: int = Field(32, ge=1)
    seed: int = 0
