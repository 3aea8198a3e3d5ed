"""Reading what the CLI is given: forget/retain data files and model folders.

Data files: JSONL for language models (one ``{"prompt": ..., "completion": ...}`` or ``{"text": ...}`` per line,
other keys ignored) and ``.npz`` for classifiers (arrays ``x`` and ``y``). Model folders: an HF checkpoint, or a
*module folder* for plain torch classifiers (``model.safetensors`` + ``serve_unlearn_module.json`` naming the
class as ``"package.module:Class"`` and its keyword arguments): no pickle anywhere.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import UnlearnDataError

MODULE_FILE = "serve_unlearn_module.json"


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


def save_module_folder(model: nn.Module, folder: str | Path, *, cls: str, kwargs: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / MODULE_FILE).write_text(json.dumps({"class": cls, "kwargs": kwargs or {}}, indent=2, sort_keys=True))
    return folder


def load_module_folder(folder: str | Path) -> tuple[nn.Module, dict]:
    folder = Path(folder)
    spec = json.loads((folder / MODULE_FILE).read_text())
    module_name, _, cls_name = spec["class"].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    model = cls(**spec.get("kwargs", {}))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model, spec


def is_module_folder(folder: str | Path) -> bool:
    return (Path(folder) / MODULE_FILE).is_file()


def checkpoint_dtype(folder: str | Path) -> torch.dtype:
    """The dtype of the floating-point weights stored in an HF folder (what a patch for it must use)."""
    from safetensors import safe_open

    from .materialize import weight_shards

    with safe_open(str(weight_shards(Path(folder))[0]), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - a safetensors handle is not a dict
            sl = f.get_slice(key)
            dt = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(sl.get_dtype())
            if dt is not None:
                return dt
    return torch.float32
