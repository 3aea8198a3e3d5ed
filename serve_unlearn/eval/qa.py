"""Keyword-scored QA accuracy: did the model still say the fact after unlearning?

Items are JSON lines ``{"prompt": question, "completion": answer sentence, "answers": [keyword, ...]}``.
An answer counts as correct when any keyword occurs in the lowercased generated text. The same
``chat_prompt`` / ``is_correct`` pair serves transformers (``qa_accuracy``) and vLLM evaluations, so both
see exactly the same prompt string and the same scoring.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def load_qa(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a QA JSONL file; raise ValueError naming the line of the first bad record. Blank lines are skipped."""
    items: list[dict[str, Any]] = []
    path = Path(path)
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")  # noqa: TRY004
            for key in ("prompt", "completion"):
                if not isinstance(obj.get(key), str) or not obj[key].strip():
                    raise ValueError(f"{where}: field {key!r} must be a non-empty string")
            answers = obj.get("answers")
            if (not isinstance(answers, list) or not answers
                    or not all(isinstance(a, str) and a.strip() for a in answers)):
                raise ValueError(f"{where}: field 'answers' must be a non-empty list of non-empty strings")
            obj["answers"] = [a.strip().lower() for a in answers]
            items.append(obj)
    if not items:
        raise ValueError(f"{path}: no QA items")
    return items


def is_correct(text: str, answers: Iterable[str]) -> bool:
    """True when any accepted keyword (case-insensitive) occurs in the generated text."""
    low = text.lower()
    return any(a.strip().lower() in low for a in answers if a.strip())


def chat_prompt(tokenizer, question: str) -> str:
    """The templated prompt text (one user turn plus the assistant header). Feed this string to vLLM to get
    the same prompt ``qa_accuracy`` uses; it already holds the special tokens, so do not add them again."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def qa_accuracy(model, tokenizer, items: Sequence[dict[str, Any]], max_new_tokens: int = 32,
                batch_size: int = 16) -> tuple[float, list[str]]:
    """Greedy chat-template generation for each item; returns (fraction correct, generated answers).

    Batches are left-padded so every prompt ends where generation starts. The tokenizer's padding side is
    restored afterwards.
    """
    import torch

    if not items:
        raise ValueError("qa_accuracy needs at least one item")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    old_pad = tokenizer.pad_token
    was_training = model.training
    outputs: list[str] = []
    try:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.eval()
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            prompts = [chat_prompt(tokenizer, it["prompt"]) for it in batch]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                                     temperature=None, top_p=None, top_k=None)
            new = out[:, enc["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
        if old_pad is None:
            tokenizer.pad_token = None
        model.train(was_training)
    correct = sum(is_correct(text, it["answers"]) for text, it in zip(outputs, items))
    return correct / len(items), [t.strip() for t in outputs]
