"""The O3 gate: how strongly a prompt gets the unlearning LoRA.

For each prompt, every forget request's detector gives a calibrated weight w_t in (0, 1) to every window of the
prompt's text (``gate_text``: all of it, normalised); the gate takes w = max over requests and windows (O3's rule)
and maps it to the LoRA scale with a monotone policy. Scoring is batched. On a detector
error or timeout the gate fails *closed* by default (the prompt gets the full unlearning scale: forgetting is the
promise being kept), or open (scale 0) when configured; every decision is logged and counted.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from ..config import StrictConfig
from ..errors import GateInputError
from .gate_text import Prompt, prompt_segments, score_windows

logger = logging.getLogger("serve_unlearn.gate")

# scorer(texts) -> (T, n) calibrated weights, one row per forget request
Scorer = Callable[[list[str]], np.ndarray]


class GatePolicy(StrictConfig):
    """w (max calibrated weight) -> LoRA scale; every kind is monotone non-decreasing in w.

    - ``threshold``: ``max_scale`` when w >= ``threshold``, else 0 (the hard gate).
    - ``ramp``: 0 up to ``low``, linear to ``max_scale`` at ``high``, flat above.
    - ``tofu``: the reference code's TOFU map: 1 for w >= 0.32, 10·w² for 0.2 < w < 0.32, else 0 (×``max_scale``),
      with 10·w² capped at 1 (the reference's overshoots to 1.024 just below 0.32, so it was not monotone).
    """

    kind: Literal["threshold", "ramp", "tofu"] = "ramp"
    threshold: float = Field(0.5, gt=0, lt=1)
    low: float = Field(0.3, ge=0, lt=1)
    high: float = Field(0.6, gt=0, le=1)
    max_scale: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self):
        if self.kind == "ramp" and not self.low < self.high:
            raise ValueError(f"ramp needs low < high; got low={self.low}, high={self.high}")
        return self

    @property
    def full_scale_weight(self) -> float:
        """The weight from which a prompt gets ``max_scale``."""
        return {"threshold": self.threshold, "ramp": self.high, "tofu": 0.32}[self.kind]

    def scale(self, w: np.ndarray | float) -> np.ndarray:
        w = np.asarray(w, dtype=np.float64)
        if self.kind == "threshold":
            s = (w >= self.threshold).astype(np.float64)
        elif self.kind == "ramp":
            s = np.clip((w - self.low) / (self.high - self.low), 0.0, 1.0)
        else:
            s = np.where(w >= 0.32, 1.0, np.where(w > 0.2, np.minimum(10.0 * w * w, 1.0), 0.0))
        return s * self.max_scale


class GateConfig(StrictConfig):
    policy: GatePolicy = GatePolicy()
    fail_closed: bool = True
    timeout_s: float | None = Field(10.0, gt=0)   # a prompt not scored by then fails closed (its work is dropped)
    batch_size: int = Field(32, ge=1)             # windows per detector pass, shared fairly by waiting callers
    # segments longer than this are scored in windows of whole sentences of at most this many characters
    window_chars: int = Field(256, ge=32, le=4096)
    # a prompt with more windows than this is not scored: it fails closed (or open) as a whole
    max_windows: int = Field(512, ge=1)
    cache_size: int = Field(4096, ge=0)           # scored windows remembered (system prompts repeat)


@dataclass(frozen=True)
class GateDecision:
    weight: float                 # max over requests and windows of the calibrated weight (nan when scoring failed)
    scale: float                  # LoRA scale to apply; 0 = the base model
    request: str | None           # the request with the largest weight
    weights: dict[str, float] = field(default_factory=dict)
    error: str | None = None      # why the gate failed closed/open for this prompt
    windows: int = 0              # texts scored for this prompt


class _Job:
    """One caller's windows in the scoring queue; ``done`` counts the windows scored so far."""

    __slots__ = ("done", "future", "texts", "weights")

    def __init__(self, texts: list[str], n_requests: int):
        self.texts = texts
        self.weights = np.empty((n_requests, len(texts)))
        self.done = 0
        self.future: concurrent.futures.Future = concurrent.futures.Future()


class Gate:
    """Decides per prompt, in batches, with fail-closed error handling, logging and counters.

    Concurrent callers (a server's request threads) share the detector: one worker scores batches taken from every
    waiting caller in turn (round robin, ``batch_size`` windows per pass), so a caller with a long list of prompts
    cannot hold a one-prompt caller past its deadline, and a caller whose deadline passed is dropped from the queue
    (its remaining windows are never scored). An idle gate adds no waiting. Windows seen before are answered from
    a cache (the gate of one published version never changes its answers).
    """

    def __init__(self, scorer: Scorer, request_names: Sequence[str], config: GateConfig | None = None):
        self.scorer = scorer
        self.request_names = list(request_names)
        self.config = config or GateConfig()
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="o3-gate")
        self._jobs: list[_Job] = []
        self._draining = False
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _count(self, **inc: int) -> None:
        with self._lock:
            self.counters.update(inc)

    def fail(self, n: int, reason: str) -> list[GateDecision]:
        """Decisions for ``n`` prompts that could not be scored: full scale when failing closed, else 0."""
        scale = self.config.policy.max_scale if self.config.fail_closed else 0.0
        self._count(errors=n, **{"failed_closed" if self.config.fail_closed else "failed_open": n})
        logger.error("gate %s for %d prompt(s): %s", "failed closed" if self.config.fail_closed else "failed open",
                     n, reason)
        return [GateDecision(weight=float("nan"), scale=scale, request=None, error=reason) for _ in range(n)]

    # -- the scoring queue ------------------------------------------------------------------------------------
    def _submit(self, texts: list[str]) -> _Job:
        job = _Job(texts, len(self.request_names))
        with self._lock:
            self._jobs.append(job)
            start = not self._draining
            self._draining = True
        if start:
            self._pool.submit(self._drain)
        return job

    def _next_batch(self) -> list[tuple[_Job, int, int]]:
        """Up to ``batch_size`` windows, taken in turn from every live job (called with the lock held)."""
        self._jobs = [j for j in self._jobs if not j.future.done()]  # done = cancelled by a caller past its deadline
        batch, room, jobs = [], self.config.batch_size, list(self._jobs)
        while room and jobs:
            share = max(1, room // len(jobs))
            for job in list(jobs):
                taken = sum(n for j, _, n in batch if j is job)
                start = job.done + taken
                n = min(share, room, len(job.texts) - start)
                if n <= 0:
                    jobs.remove(job)
                    continue
                batch.append((job, start, n))
                room -= n
                if start + n == len(job.texts):
                    jobs.remove(job)
                if not room:
                    break
        return batch

    def _drain(self) -> None:
        while True:
            with self._lock:
                batch = self._next_batch()
                if not batch:
                    self._draining = False
                    return
            texts = [t for job, start, n in batch for t in job.texts[start:start + n]]
            try:
                w = self._score(texts)
            except Exception as exc:  # noqa: BLE001 - handed to every caller in this pass
                for job, _, _ in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            offset = 0
            for job, start, n in batch:
                job.weights[:, start:start + n] = w[:, offset:offset + n]
                offset += n
                job.done = max(job.done, start + n)
                if job.done == len(job.texts) and not job.future.done():
                    job.future.set_result(job.weights)

    def _score(self, texts: list[str]) -> np.ndarray:
        w = np.asarray(self.scorer(texts), dtype=np.float64)
        if w.shape != (len(self.request_names), len(texts)) or not np.all(np.isfinite(w)):
            raise RuntimeError(f"scorer returned shape {w.shape} (or non-finite values); expected "
                               f"{(len(self.request_names), len(texts))}")
        return w

    def _weights(self, texts: list[str]) -> np.ndarray:
        """(requests, len(texts)) weights: cached ones at once, the rest through the queue within the timeout."""
        out = np.empty((len(self.request_names), len(texts)))
        missing: dict[str, list[int]] = {}
        with self._lock:
            for i, t in enumerate(texts):
                hit = self._cache.get(t)
                if hit is None:
                    missing.setdefault(t, []).append(i)
                else:
                    self._cache.move_to_end(t)
                    out[:, i] = hit
        if missing:
            job = self._submit(list(missing))
            try:
                w = job.future.result(timeout=self.config.timeout_s)
            except concurrent.futures.TimeoutError:
                job.future.cancel()  # the worker drops what is left of it
                raise
            with self._lock:
                for j, (t, idx) in enumerate(missing.items()):
                    out[:, idx] = w[:, j:j + 1]
                    if self.config.cache_size:
                        self._cache[t] = w[:, j].copy()
                while len(self._cache) > self.config.cache_size:
                    self._cache.popitem(last=False)
        return out

    def decide(self, prompts: Sequence[Prompt]) -> list[GateDecision]:
        """One decision per prompt, the maximum over its windows. A prompt that is not text raises GateInputError
        (a caller's error, not a detector failure); scoring errors, timeouts and prompts with more than
        ``max_windows`` windows fail closed/open as configured."""
        if isinstance(prompts, str | dict):
            raise GateInputError("decide() takes a list of prompts; wrap a single prompt in a list")
        per_prompt = [score_windows(prompt_segments(p), self.config.window_chars) for p in prompts]
        if not per_prompt:
            return []
        if not self.request_names:
            self._count(decisions=len(per_prompt), base=len(per_prompt))
            return [GateDecision(weight=0.0, scale=0.0, request=None, windows=len(w)) for w in per_prompt]
        too_long = [len(w) > self.config.max_windows for w in per_prompt]
        texts = [t for w, long in zip(per_prompt, too_long) if not long for t in w]
        try:
            w = self._weights(texts) if texts else np.zeros((len(self.request_names), 0))
        except concurrent.futures.TimeoutError:
            self._count(timeouts=len(per_prompt))
            return self.fail(len(per_prompt), f"detector timed out after {self.config.timeout_s}s")
        except Exception as exc:  # noqa: BLE001 - any detector failure must fail closed, not crash serving
            return self.fail(len(per_prompt), f"detector raised {type(exc).__name__}: {exc}")
        decisions, start, applied = [], 0, 0
        for wins, long in zip(per_prompt, too_long):
            if long:
                decisions += self.fail(1, f"{len(wins)} windows to score, more than max_windows="
                                          f"{self.config.max_windows}")
                continue
            # an empty prompt (no text at all) reads as nothing the detectors know
            per_request = w[:, start:start + len(wins)].max(axis=1) if wins else np.zeros(len(self.request_names))
            start += len(wins)
            best = int(per_request.argmax())
            weight = float(per_request[best])
            scale = float(self.config.policy.scale(weight))
            applied += scale > 0
            decisions.append(GateDecision(weight=weight, scale=scale, request=self.request_names[best],
                                          weights={n: float(per_request[t]) for t, n in enumerate(self.request_names)},
                                          windows=len(wins)))
            logger.debug("gate w=%.4f scale=%.3f request=%s windows=%d", weight, scale, self.request_names[best],
                        len(wins))
        scored = sum(not long for long in too_long)
        self._count(decisions=scored, applied=applied, base=scored - applied)
        return decisions
