"""Evaluation sets: forget, retain and holdout questions with their gold answers, read from JSONL or TOFU JSON.

A record is one JSON object:

- ``question`` (or ``prompt``): the question asked, as one user turn;
- ``answer``: the gold answer, a string or a list of accepted answers; or ``answers`` (a list of accepted answer
  keywords, the format of ``examples/data/o3``) with ``completion`` (the reference answer sentence);
- optional ``paraphrased_question`` (string or list): the same question reworded, asked too;
- optional ``paraphrased_answer`` (TOFU): the gold answer reworded, the truth ratio's denominator;
- optional ``perturbed_answer`` (string or list; TOFU): wrong answers of the same form, the truth ratio's numerator.

Files: JSON lines (``.jsonl``, TOFU's own files), or one JSON array (``.json``: a TOFU split saved as an array, or
``{"data": [...]}``). Every problem is an :class:`~serve_unlearn.errors.EvalDataError` naming the file, the line
and what to change.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EvalDataError

__all__ = ["EvalItem", "EvalSet", "eval_set_from_records", "load_eval_set"]


@dataclass(frozen=True)
class EvalItem:
    """One question. ``answers``: what counts as correct (any of them, by normalised containment); ``reference``:
    the gold answer text that ROUGE-L and the answer probability are computed against."""

    question: str
    answers: tuple[str, ...]
    reference: str
    paraphrased_questions: tuple[str, ...] = ()
    paraphrased_answer: str | None = None
    perturbed_answers: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvalSet:
    name: str
    items: tuple[EvalItem, ...]
    source: str = ""
    digest: str = field(default="")

    def __post_init__(self):
        if not self.items:
            raise EvalDataError(f"the {self.name} set ({self.source or 'records'}) is empty; give at least one "
                                "question with an answer")
        if not self.digest:
            object.__setattr__(self, "digest", items_digest(self.items))

    def __len__(self) -> int:
        return len(self.items)


def items_digest(items: Sequence[EvalItem]) -> str:
    """sha256 over the canonical JSON of the items as parsed (field order and whitespace of the file do not
    count; what is evaluated does)."""
    text = json.dumps([asdict(it) for it in items], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _strings(value: Any, where: str, key: str, *, required: bool) -> tuple[str, ...]:
    if value is None:
        if required:
            raise EvalDataError(f"{where}: field {key!r} is missing")
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise EvalDataError(f"{where}: field {key!r} must be a string or a list of strings, got "
                            f"{type(value).__name__}")
    values = [v.strip() for v in values if v.strip()]
    if required and not values:
        raise EvalDataError(f"{where}: field {key!r} is empty; give the gold answer")
    return tuple(values)


def parse_record(obj: Any, where: str) -> EvalItem:
    """One record (see the module docstring); EvalDataError naming ``where`` when it does not fit."""
    if not isinstance(obj, dict):
        raise EvalDataError(f"{where}: expected a JSON object with 'question' and 'answer', got {type(obj).__name__}")
    question = obj.get("question", obj.get("prompt"))
    if not isinstance(question, str) or not question.strip():
        raise EvalDataError(f"{where}: needs a non-empty 'question' (or 'prompt') string; keys are {sorted(obj)}")
    if "answer" in obj:
        answers = _strings(obj["answer"], where, "answer", required=True)
        reference = obj["completion"].strip() if isinstance(obj.get("completion"), str) else answers[0]
    elif "answers" in obj:
        answers = _strings(obj["answers"], where, "answers", required=True)
        completion = obj.get("completion")
        reference = completion.strip() if isinstance(completion, str) and completion.strip() else answers[0]
    else:
        raise EvalDataError(f"{where}: needs an 'answer' (a string or a list) or 'answers' (a list of keywords); "
                            f"keys are {sorted(obj)}")
    paraphrased_answer = _strings(obj.get("paraphrased_answer"), where, "paraphrased_answer", required=False)
    return EvalItem(question=question.strip(), answers=answers, reference=reference,
                    paraphrased_questions=_strings(obj.get("paraphrased_question"), where, "paraphrased_question",
                                                   required=False),
                    paraphrased_answer=paraphrased_answer[0] if paraphrased_answer else None,
                    perturbed_answers=_strings(obj.get("perturbed_answer"), where, "perturbed_answer",
                                               required=False))


def eval_set_from_records(name: str, records: Sequence[Any], source: str = "records") -> EvalSet:
    """An :class:`EvalSet` from records already in memory (e.g. a forget request's probes)."""
    if isinstance(records, (str, bytes, dict)) or not isinstance(records, Sequence):
        raise EvalDataError(f"the {name} probes must be a list of records, got {type(records).__name__}")
    return EvalSet(name, tuple(parse_record(r, f"{source}[{i}]") for i, r in enumerate(records)), source)


def load_eval_set(path: str | Path, name: str | None = None) -> EvalSet:
    """Read a JSONL or JSON evaluation file (see the module docstring)."""
    path = Path(path)
    name = name or path.stem
    if not path.is_file():
        raise EvalDataError(f"the {name} file {str(path)!r} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EvalDataError(f"{path}: not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
                            "save the file as UTF-8") from None
    stripped = text.lstrip()
    if stripped.startswith("[") or path.suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            if stripped.startswith("["):
                raise EvalDataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
            doc = None  # a .json file of JSON lines (TOFU's files on the hub are JSON lines named .json)
        if isinstance(doc, dict) and isinstance(doc.get("data"), list):
            doc = doc["data"]
        if isinstance(doc, list):
            return EvalSet(name, tuple(parse_record(r, f"{path}[{i}]") for i, r in enumerate(doc)), str(path))
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalDataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); one JSON object per line") from None
        items.append(parse_record(obj, f"{path}:{lineno}"))
    return EvalSet(name, tuple(items), str(path))
