"""Losses per model kind, so SalUn and IAU are written once for classifiers, causal LMs and diffusion UNets.

Each task turns user data into batches and gives three losses on a batch:

- ``forget_loss``: the model's ordinary loss on the forget data (its gradient defines saliency, and IAU ascends it);
- ``unlearn_loss``: the loss with swapped targets that SalUn descends (random labels; refusal or another answer;
  the concept remapped onto another prompt's prediction, with a stop-gradient target);
- ``retain_loss``: the ordinary loss on retain data, which keeps utility.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnlearnDataError

Batch = Any

# Ours, written for this project: what a causal LM says instead of a forgotten answer.
REFUSALS = (
    "I'm sorry, I don't know the answer to that.",
    "I don't have that information.",
    "I'm not able to answer that question.",
    "I can't help with that one, sorry.",
    "That is something I don't know.",
)


class UnlearnTask(Protocol):
    def batches(self, data: Any, batch_size: int, *, shuffle: bool, seed: int) -> list[Batch]: ...
    def batch_size_of(self, batch: Batch) -> int: ...
    def forget_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...
    def unlearn_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...
    def retain_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...


def _require(data_len: int, what: str) -> None:
    if data_len == 0:
        raise UnlearnDataError(f"the {what} set is empty: give at least one example")


def _chunks(n: int, size: int, shuffle: bool, seed: int) -> Iterator[list[int]]:
    order = list(range(n))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, n, size):
        yield order[i : i + size]


# -- classifiers -----------------------------------------------------------------------------------------------
@dataclass
class ClassifierTask:
    """Data: a pair ``(x, y)`` of tensors. SalUn's home setting: random labels on the forget set (y' != y)."""

    num_classes: int

    def batches(self, data, batch_size, *, shuffle=False, seed=0):
        x, y = data
        _require(len(y), "data")
        return [(x[idx], y[idx]) for idx in _chunks(len(y), batch_size, shuffle, seed)]

    def batch_size_of(self, batch):
        return len(batch[1])

    def forget_loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    retain_loss = forget_loss

    def unlearn_loss(self, model, batch):
        x, y = batch
        # uniform over the other classes: the paper's y' != y (the reference code may draw y' == y)
        shift = torch.randint(1, self.num_classes, y.shape, device=y.device)
        return F.cross_entropy(model(x), (y + shift) % self.num_classes)


# -- causal language models ------------------------------------------------------------------------------------
@dataclass
class CausalLMTask:
    """Data: records ``{"prompt", "completion"}`` (loss on the completion only) or ``{"text"}``.

    ``forget_target``: ``"refusal"`` answers forget prompts with one of :data:`REFUSALS`; ``"random-answer"`` with
    the completion of another forget record (the LM analogue of random labels).
    """

    tokenizer: Any
    forget_target: Literal["refusal", "random-answer"] = "refusal"
    max_length: int = 256
    use_chat_template: bool = True

    def _encode(self, rec: dict, completion: str | None = None) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        if "text" in rec and "prompt" not in rec:
            ids = tok(rec["text"], add_special_tokens=True)["input_ids"][: self.max_length]
            return ids, list(ids)
        completion = rec["completion"] if completion is None else completion
        if self.use_chat_template and getattr(tok, "chat_template", None):
            prompt = tok.apply_chat_template([{"role": "user", "content": rec["prompt"]}],
                                             tokenize=False, add_generation_prompt=True)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        else:
            p_ids = tok(rec["prompt"], add_special_tokens=True)["input_ids"]
        c_ids = tok(completion, add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            c_ids = c_ids + [tok.eos_token_id]
        ids = (p_ids + c_ids)[: self.max_length]
        labels = ([-100] * len(p_ids) + c_ids)[: self.max_length]
        return ids, labels

    def _collate(self, pairs: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(i) for i, _ in pairs)
        ids = torch.full((len(pairs), width), pad, dtype=torch.long)
        labels = torch.full((len(pairs), width), -100, dtype=torch.long)
        attn = torch.zeros((len(pairs), width), dtype=torch.long)
        for row, (i, l) in enumerate(pairs):
            ids[row, : len(i)] = torch.tensor(i)
            labels[row, : len(l)] = torch.tensor(l)
            attn[row, : len(i)] = 1
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}

    def batches(self, data, batch_size, *, shuffle=False, seed=0):
        records = list(data)
        _require(len(records), "data")
        out = []
        rng = random.Random(seed)
        for idx in _chunks(len(records), batch_size, shuffle, seed):
            recs = [records[i] for i in idx]
            swapped = []
            for i in idx:
                rec = records[i]
                if "prompt" not in rec:
                    swapped.append(rec.get("text", ""))
                elif self.forget_target == "refusal" or len(records) < 2:
                    swapped.append(rng.choice(REFUSALS))
                else:
                    j = rng.choice([k for k in range(len(records))
                                    if records[k].get("completion", rec["completion"]) != rec["completion"]] or [i])
                    swapped.append(records[j]["completion"])
            true = self._collate([self._encode(r) for r in recs])
            swap = self._collate([self._encode(r, c) if "prompt" in r else self._encode(r) for r, c in zip(recs, swapped)])
            out.append({"true": true, "swapped": swap})
        return out

    def batch_size_of(self, batch):
        return batch["true"]["input_ids"].shape[0]

    @staticmethod
    def _nll(model, enc):
        dev = next(model.parameters()).device
        return model(**{k: v.to(dev) for k, v in enc.items()}).loss

    def forget_loss(self, model, batch):
        return self._nll(model, batch["true"])

    retain_loss = forget_loss

    def unlearn_loss(self, model, batch):
        return self._nll(model, batch["swapped"])


# -- diffusion UNets -------------------------------------------------------------------------------------------
@dataclass
class DiffusionTask:
    """SalUn's concept forgetting for a diffusers ``UNet2DConditionModel``.

    Data: a dict of tensors ``latents`` [N, C, h, w] (VAE latents, already scaled), ``cond`` [N, L, D] (text
    embeddings of the concept to forget, or of the retain prompts) and, for forget data, ``target_cond`` (the
    embeddings of the prompt c' the concept is remapped onto). ``guidance`` > 0 with ``uncond`` [1, L, D] makes the
    saliency loss use the CFG-guided prediction, as the SD reference does (w = 7.5).
    """

    scheduler: Any
    guidance: float = 0.0
    uncond: torch.Tensor | None = None

    def batches(self, data, batch_size, *, shuffle=False, seed=0):
        n = data["latents"].shape[0]
        _require(n, "data")
        return [{k: v[idx] for k, v in data.items()} for idx in _chunks(n, batch_size, shuffle, seed)]

    def batch_size_of(self, batch):
        return batch["latents"].shape[0]

    def _noisy(self, batch):
        z0 = batch["latents"]
        noise = torch.randn_like(z0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (z0.shape[0],), device=z0.device)
        return self.scheduler.add_noise(z0, noise, t), noise, t

    def forget_loss(self, model, batch):
        zt, noise, t = self._noisy(batch)
        pred = model(zt, t, encoder_hidden_states=batch["cond"]).sample
        if self.guidance and self.uncond is not None:
            u = model(zt, t, encoder_hidden_states=self.uncond.expand_as(batch["cond"])).sample
            pred = (1 + self.guidance) * pred - self.guidance * u
        return F.mse_loss(pred, noise)

    def retain_loss(self, model, batch):
        zt, noise, t = self._noisy(batch)
        return F.mse_loss(model(zt, t, encoder_hidden_states=batch["cond"]).sample, noise)

    def unlearn_loss(self, model, batch):
        zt, _, t = self._noisy(batch)
        with torch.no_grad():
            target = model(zt, t, encoder_hidden_states=batch["target_cond"]).sample
        return F.mse_loss(model(zt, t, encoder_hidden_states=batch["cond"]).sample, target)
