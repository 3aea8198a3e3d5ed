"""Model folders the patch methods read: an HF checkpoint, or a *module folder* for plain torch classifiers
(``model.safetensors`` + ``serve_unlearn_module.json`` naming the class as ``"package.module:Class"`` and its
keyword arguments): no pickle anywhere. (Forget/retain data files are read by :mod:`serve_unlearn.data`.)
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

MODULE_FILE = "serve_unlearn_module.json"


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
