"""The evidence policy of forget requests: what their probes must show before they are put in force. Its own module,
importing pydantic only, so configs that hold it (the service's ``evidence:``) load without torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..config import StrictConfig

__all__ = ["VerificationPolicy"]


class VerificationPolicy(StrictConfig):
    """What evidence a forget request needs before it is put in force, and what happens when it falls short."""

    max_forget_accuracy: float = Field(
        0.25, ge=0, le=1, description="the candidate's accuracy on the forget probes must be at most this "
        "(0.25: at most one forget probe in four still answered)")
    max_retain_drop: float = Field(
        0.10, ge=0, le=1, description="base accuracy minus candidate accuracy on the retain probes must be at most "
        "this (0.10: ten points; with ten retain probes one changed answer is ten points)")
    min_forget_probes: int = Field(1, ge=1, description="fewer forget probes than this is a shortfall")
    min_retain_probes: int = Field(1, ge=1, description="fewer retain probes than this is a shortfall")
    on_shortfall: Literal["refuse", "flag"] = Field(
        "refuse", description="refuse: do not put the request in force; flag: put it in force, flagged")
    max_new_tokens: int = Field(32, ge=1, description="greedy tokens per probe answer")
    batch_size: int = Field(16, ge=1)
    probabilities: bool = Field(True, description="also record the gold answers' length-normalised probability")
    n_boot: int = Field(1000, ge=10, description="bootstrap resamples per interval")
