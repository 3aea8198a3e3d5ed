"""The causal-LM unlearning task: batches of prompt/completion records and their three losses.

Shared by SalUn/IAU weight patches (``patches``) and O3's unlearning LoRA (``adapters``), so it lives at the ground
floor. Its losses follow the ``patches.tasks.UnlearnTask`` protocol:

- ``forget_loss`` / ``retain_loss``: the completion's NLL (loss on the completion only);
- ``unlearn_loss``: the NLL of a swapped target: a refusal (:data:`REFUSALS`) or another forget record's answer.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .data import index_batches, require_examples

__all__ = ["REFUSALS", "CausalLMTask"]

# Ours, written for this project: what a causal LM says instead of a forgotten answer.
REFUSALS = (
    "I'm sorry, I don't know the answer to that.",
    "I don't have that information.",
    "I'm not able to answer that question.",
    "I can't help with that one, sorry.",
    "That is something I don't know.",
)


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
        require_examples(len(records), "data")
        out = []
        rng = random.Random(seed)
        for idx in index_batches(len(records), batch_size, shuffle, seed):
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
