"""Forget and retain data: reading the files, splitting them into batches, and the digest recorded with a result.

Files: JSONL for language models (one ``{"prompt": ..., "completion": ...}`` or ``{"text": ...}`` per line, other
keys ignored) and ``.npz`` for classifiers (arrays ``x`` and ``y``). No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UnlearnDataError
from .fingerprint import tensor_digest

__all__ = ["as_records", "data_digest", "index_batches", "load_data", "load_jsonl", "load_npz", "require_examples"]


def load_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UnlearnDataError(f"data file {str(path)!r} does not exist")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UnlearnDataError(f"{path}:{i}: not valid JSON ({exc})") from exc
        if not isinstance(rec, dict) or not ({"prompt", "completion"} <= rec.keys() or "text" in rec):
            raise UnlearnDataError(f'{path}:{i}: each line needs "prompt" and "completion", or "text"')
        records.append(rec)
    if not records:
        raise UnlearnDataError(f"{str(path)!r} has no records: the forget/retain set must not be empty")
    return records


def load_npz(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UnlearnDataError(f"data file {str(path)!r} does not exist")
    with np.load(path, allow_pickle=False) as z:
        if "x" not in z or "y" not in z:
            raise UnlearnDataError(f"{str(path)!r} must hold arrays 'x' (features) and 'y' (integer labels)")
        x, y = torch.from_numpy(z["x"]).float(), torch.from_numpy(z["y"]).long()
    if len(y) == 0 or len(x) != len(y):
        raise UnlearnDataError(f"{str(path)!r}: x has {len(x)} rows and y {len(y)}; both must be equal and non-zero")
    return x, y


def load_data(path: str | Path):
    return load_npz(path) if str(path).endswith(".npz") else load_jsonl(path)


def as_records(data: Any) -> list:
    """A data set as a list of records to digest: the tensors of an ``(x, y)`` pair, the values of a dict of
    tensors in key order, or the records of a list."""
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor):
        return list(data)
    if isinstance(data, dict):
        return [data[k] for k in sorted(data)]
    return list(data)


def data_digest(records: Iterable[object]) -> str:
    """Digest of a forget or retain set (any JSON-able records or tensors), recorded in a patch's header."""
    h = hashlib.sha256()
    for r in records:
        if isinstance(r, torch.Tensor):
            h.update(tensor_digest(r).encode())
        else:
            h.update(repr(r).encode())
        h.update(b"\x00")
    return h.hexdigest()


def require_examples(count: int, what: str) -> None:
    """UnlearnDataError for an empty ``what`` set."""
    if count == 0:
        raise UnlearnDataError(f"the {what} set is empty: give at least one example")


def index_batches(n: int, size: int, shuffle: bool, seed: int) -> Iterator[list[int]]:
    """Indices 0..n-1 in batches of ``size`` (the last may be shorter), shuffled with ``seed`` when asked."""
    order = list(range(n))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, n, size):
        yield order[i : i + size]
