"""The O3 gate: how strongly a prompt gets the unlearning LoRA.

For each prompt, every forget request's detector gives a calibrated weight w_t in (0, 1); the gate takes
w = max_t w_t (O3's rule) and maps it to the LoRA scale with a monotone policy. Scoring is batched. On a detector
error or timeout the gate fails *closed* by default (the prompt gets the full unlearning scale: forgetting is the
promise being kept), or open (scale 0) when configured; every decision is logged and counted.
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from ..config import StrictConfig as _Strict
from ..errors import GateInputError

logger = logging.getLogger("serve_unlearn.gate")

Prompt = str | Sequence[dict[str, Any]]
# scorer(texts) -> (T, n) calibrated weights, one row per forget request
Scorer = Callable[[list[str]], np.ndarray]


class GatePolicy(_Strict):
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

    def scale(self, w: np.ndarray | float) -> np.ndarray:
        w = np.asarray(w, dtype=np.float64)
        if self.kind == "threshold":
            s = (w >= self.threshold).astype(np.float64)
        elif self.kind == "ramp":
            s = np.clip((w - self.low) / (self.high - self.low), 0.0, 1.0)
        else:
            s = np.where(w >= 0.32, 1.0, np.where(w > 0.2, np.minimum(10.0 * w * w, 1.0), 0.0))
        return s * self.max_scale


class GateConfig(_Strict):
    policy: GatePolicy = GatePolicy()
    fail_closed: bool = True
    timeout_s: float | None = Field(10.0, gt=0)
    batch_size: int = Field(32, ge=1)
    max_chars: int = Field(2000, ge=16)  # longer prompts are scored on their last max_chars characters


@dataclass(frozen=True)
class GateDecision:
    weight: float                 # max over requests of the calibrated weight (nan when scoring failed)
    scale: float                  # LoRA scale to apply; 0 = the base model
    request: str | None           # the request with the largest weight
    weights: dict[str, float] = field(default_factory=dict)
    error: str | None = None      # why the gate failed closed/open for this prompt


# Chat markup of common templates: the detectors are trained on bare questions, so score the last user turn.
_USER_TURNS = (
    re.compile(r"<\|im_start\|>user\s*\n(.*?)<\|im_end\|>", re.DOTALL),                       # ChatML (SmolLM2, Qwen)
    re.compile(r"<\|start_header_id\|>user<\|end_header_id\|>\s*(.*?)<\|eot_id\|>", re.DOTALL),  # Llama 3
    re.compile(r"\[INST\](.*?)\[/INST\]", re.DOTALL),                                           # Llama 2 / Mistral
)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if content is None:
        return ""
    raise GateInputError(f"message content must be a string or a list of content parts, got {type(content).__name__}")


def gate_text(prompt: Prompt, max_chars: int = 2000) -> str:
    """The text a detector scores for one prompt: a chat's last user turn, or a raw prompt (its last user turn
    when it holds rendered chat markup). Anything else raises GateInputError."""
    if isinstance(prompt, str):
        text = prompt
        for pattern in _USER_TURNS:
            turns = pattern.findall(prompt)
            if turns:
                text = turns[-1]
                break
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
        users = [m for m in prompt if m.get("role") == "user"]
        text = _content_text((users or list(prompt))[-1].get("content"))
    else:
        raise GateInputError(
            f"a prompt must be a string or a non-empty list of chat messages ({{'role', 'content'}} dicts); "
            f"got {type(prompt).__name__}")
    return text.strip()[-max_chars:]


class Gate:
    """Decides per prompt, in batches, with fail-closed error handling, logging and counters.

    Concurrent callers (a server's request threads) are batched together: one worker scores everything queued
    since its last call in one pass, so under load the detector runs at its batched cost per prompt (a third of
    the single-prompt cost on MiniLM at 8 prompts) instead of one queued pass per request, and an idle gate adds
    no waiting at all.
    """

    def __init__(self, scorer: Scorer, request_names: Sequence[str], config: GateConfig | None = None):
        self.scorer = scorer
        self.request_names = list(request_names)
        self.config = config or GateConfig()
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="o3-gate")
        self._queue: list[tuple[list[str], concurrent.futures.Future]] = []
        self._draining = False

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

    def _submit(self, texts: list[str]) -> concurrent.futures.Future:
        """Queue ``texts`` for the worker; the future gets their (requests, len(texts)) weights."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._queue.append((texts, future))
            start = not self._draining
            self._draining = True
        if start:
            self._pool.submit(self._drain)
        return future

    def _drain(self) -> None:
        """Score everything queued, in one pass per round, until the queue is empty."""
        while True:
            with self._lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._draining = False
                    return
            try:
                w = self._score([t for texts, _ in batch for t in texts])
            except Exception as exc:  # noqa: BLE001 - handed to every caller of this round
                for _, future in batch:
                    future.set_exception(exc)
                continue
            start = 0
            for texts, future in batch:
                future.set_result(w[:, start:start + len(texts)])
                start += len(texts)

    def _score(self, texts: list[str]) -> np.ndarray:
        bs = self.config.batch_size
        parts = [np.asarray(self.scorer(texts[i:i + bs]), dtype=np.float64) for i in range(0, len(texts), bs)]
        w = np.concatenate(parts, axis=1) if parts else np.zeros((len(self.request_names), 0))
        if w.shape != (len(self.request_names), len(texts)) or not np.all(np.isfinite(w)):
            raise RuntimeError(f"scorer returned shape {w.shape} (or non-finite values); expected "
                               f"{(len(self.request_names), len(texts))}")
        return w

    def decide(self, prompts: Sequence[Prompt]) -> list[GateDecision]:
        """One decision per prompt. A prompt that is not text raises GateInputError (a caller's error, not a
        detector failure); scoring errors and timeouts fail closed/open as configured."""
        if isinstance(prompts, str | dict):
            raise GateInputError("decide() takes a list of prompts; wrap a single prompt in a list")
        texts = [gate_text(p, self.config.max_chars) for p in prompts]
        if not texts:
            return []
        if not self.request_names:
            self._count(decisions=len(texts), base=len(texts))
            return [GateDecision(weight=0.0, scale=0.0, request=None) for _ in texts]
        future = self._submit(texts)
        try:
            w = future.result(timeout=self.config.timeout_s)
        except concurrent.futures.TimeoutError:
            self._count(timeouts=len(texts))
            return self.fail(len(texts), f"detector timed out after {self.config.timeout_s}s")
        except Exception as exc:  # noqa: BLE001 - any detector failure must fail closed, not crash serving
            return self.fail(len(texts), f"detector raised {type(exc).__name__}: {exc}")
        best = w.max(axis=0)
        arg = w.argmax(axis=0)
        scales = self.config.policy.scale(best)
        decisions = []
        for j in range(len(texts)):
            d = GateDecision(weight=float(best[j]), scale=float(scales[j]), request=self.request_names[arg[j]],
                             weights={n: float(w[t, j]) for t, n in enumerate(self.request_names)})
            decisions.append(d)
            logger.info("gate w=%.4f scale=%.3f request=%s", d.weight, d.scale, d.request)
        applied = int(np.count_nonzero(scales))
        self._count(decisions=len(texts), applied=applied, base=len(texts) - applied)
        return decisions
