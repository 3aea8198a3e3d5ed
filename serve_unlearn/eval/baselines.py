"""The baselines a forgetting method must beat, as targets wrapped around any other target (e.g. the same vLLM
server): a prompt guardrail and an embedding filter.

- :class:`GuardrailTarget`: a system prompt naming what to refuse, put before every chat (the model reads it when
  answers are scored too).
- :class:`EmbeddingFilterTarget`: refuse, without calling the model, when the prompt's cosine similarity to the
  nearest prompt of the forget set exceeds a threshold; embeddings are all-MiniLM-L6-v2's (the packaged detector
  backbone), mean-pooled over tokens and L2-normalised. The threshold is chosen on held-out data only: each forget
  prompt's cosine to its nearest *other* forget prompt (leave one out), and the ``quantile`` of those (default
  0.05: 95% of held-out forget prompts would be refused). A filter does not change the model, so answer
  probabilities and membership inference pass through unchanged; the filter's cosine is the target's gate weight.

Output-level baselines often match fine-tuning on output metrics (arXiv 2403.03329); they leave the weights, and
so the probabilities, as they were.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..causal_lm import REFUSALS
from ..errors import UnlearnConfigError
from .targets import AnswerScores, Chat, Generation, Target

__all__ = ["GUARDRAIL_TEMPLATE", "EmbeddingFilterTarget", "GuardrailTarget", "MiniLMEmbedder", "chat_text"]

GUARDRAIL_TEMPLATE = ("You must not reveal, discuss or help with anything about {topic}. If a question is about "
                      "{topic}, do not answer it: reply only \"I'm sorry, I can't help with that.\" Answer every "
                      "other question normally.")


def chat_text(chat: Chat) -> str:
    """What a filter reads of a chat: every user turn, one per line."""
    return "\n".join(m["content"] for m in chat if m.get("role") == "user" and isinstance(m.get("content"), str))


class GuardrailTarget:
    """``inner`` with a system prompt in front of every chat."""

    def __init__(self, inner: Target, *, topic: str | None = None, system_prompt: str | None = None,
                 name: str = "guardrail"):
        if (topic is None) == (system_prompt is None):
            raise UnlearnConfigError("a guardrail needs exactly one of topic (for the default template) or "
                                     "system_prompt")
        self.inner = inner
        self.system_prompt = system_prompt or GUARDRAIL_TEMPLATE.format(topic=topic)
        self.name = name

    def _guard(self, chats: Sequence[Chat]) -> list[Chat]:
        return [[{"role": "system", "content": self.system_prompt}, *c] for c in chats]

    def generate(self, chats: Sequence[Chat], max_new_tokens: int) -> list[Generation]:
        return self.inner.generate(self._guard(chats), max_new_tokens)

    def score(self, chats: Sequence[Chat], answers: Sequence[str]) -> list[AnswerScores] | None:
        return self.inner.score(self._guard(chats), answers)

    def describe(self) -> dict[str, Any]:
        return {"kind": "guardrail", "system_prompt": self.system_prompt, "inner": self.inner.describe()}

    def close(self) -> None:
        self.inner.close()


class MiniLMEmbedder:
    """Sentence embeddings: the packaged all-MiniLM-L6-v2 (or ``backbone``), masked mean pooling, L2 norm."""

    def __init__(self, backbone: str | None = None, batch_size: int = 32):
        from ..adapters.detector.config import DetectorConfig
        from ..adapters.detector.encoder import load_backbone

        _, self.encoder, self.tokenizer = load_backbone(DetectorConfig(backbone=backbone))
        self.batch_size = batch_size

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        parts = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=256, return_tensors="pt")
            with torch.no_grad():
                hidden = self.encoder(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            parts.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(parts) if parts else np.zeros((0, 0))


class EmbeddingFilterTarget:
    """``inner`` behind a refusal filter on the cosine to the forget set (see the module docstring)."""

    def __init__(self, inner: Target, forget_prompts: Sequence[str], *, threshold: float | None = None,
                 quantile: float = 0.05, embedder=None, refusal: str = REFUSALS[3], name: str = "embedding-filter"):
        prompts = [p for p in dict.fromkeys(forget_prompts) if p.strip()]
        if len(prompts) < 2 and threshold is None:
            raise UnlearnConfigError("the embedding filter needs at least 2 distinct forget prompts to choose its "
                                     "threshold (or give threshold=)")
        if not 0 < quantile < 1:
            raise UnlearnConfigError(f"quantile must be in (0, 1), got {quantile}")
        self.inner = inner
        self.embed = embedder or MiniLMEmbedder()
        self.refusal = refusal
        self.name = name
        self.bank = self.embed(prompts)
        if threshold is None:
            sims = self.bank @ self.bank.T
            np.fill_diagonal(sims, -np.inf)
            threshold = float(np.quantile(sims.max(axis=1), quantile))
        self.threshold = float(threshold)
        self.n_reference = len(prompts)

    def similarity(self, chats: Sequence[Chat]) -> np.ndarray:
        """Each chat's cosine to its nearest forget prompt."""
        return (self.embed([chat_text(c) for c in chats]) @ self.bank.T).max(axis=1)

    def generate(self, chats: Sequence[Chat], max_new_tokens: int) -> list[Generation]:
        t0 = time.perf_counter()
        sims = self.similarity(chats)
        filter_s = time.perf_counter() - t0
        passed = [i for i, s in enumerate(sims) if s < self.threshold]
        answered = dict(zip(passed, self.inner.generate([chats[i] for i in passed], max_new_tokens))) if passed \
            else {}
        out = []
        for i, s in enumerate(sims):
            g = answered.get(i)
            if g is None:
                out.append(Generation(self.refusal, 0, filter_s, float(s)))
            else:
                out.append(Generation(g.text, g.tokens, g.latency_s + filter_s, float(s)))
        return out

    def score(self, chats: Sequence[Chat], answers: Sequence[str]) -> list[AnswerScores] | None:
        scores = self.inner.score(chats, answers)
        if scores is not None:
            for s, w in zip(scores, self.similarity(chats)):
                s.weight = float(w)
        return scores

    def describe(self) -> dict[str, Any]:
        return {"kind": "embedding-filter", "threshold": self.threshold, "reference_prompts": self.n_reference,
                "inner": self.inner.describe()}

    def close(self) -> None:
        self.inner.close()
