"""Model folders the patch methods read: an HF checkpoint, or a *module folder* for plain torch classifiers
(``model.safetensors`` + ``serve_unlearn_module.json`` naming the class as ``"package.module:Class"`` and its
keyword arguments): no pickle anywhere. (Forget/retain data files are read by :mod:`serve_unlearn.data`.)

A module folder names code in a data file, and loading it imports that module and calls the class: a downloaded
folder could otherwise run any importable callable. So, like transformers' ``trust_remote_code``, only allowed
classes are imported: serve-unlearn's own (``TRUSTED_CLASSES``), those the caller lists (``trusted_classes``,
CLI ``--trusted-class``), or anything with ``trust_module_code=True`` (CLI ``--trust-module-code``). A class not
allowed is refused before its module is imported; an allowed name must still be an ``nn.Module`` subclass.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from importlib import import_module
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ModuleFolderError, UntrustedCodeError

MODULE_FILE = "serve_unlearn_module.json"
# classes shipped with serve-unlearn, trusted like transformers trusts its own model classes
TRUSTED_CLASSES = frozenset({"serve_unlearn.testing.tiny_models:TinyMLP"})
_CLASS_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def class_path(cls: type) -> str:
    """``"package.module:Class"``, the way a module folder names ``cls``."""
    return f"{cls.__module__}:{cls.__qualname__}"


def save_module_folder(model: nn.Module, folder: str | Path, *, cls: str, kwargs: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / MODULE_FILE).write_text(json.dumps({"class": cls, "kwargs": kwargs or {}}, indent=2, sort_keys=True))
    return folder


def read_module_spec(folder: str | Path) -> dict:
    """The folder's ``serve_unlearn_module.json``, checked (nothing imported)."""
    path = Path(folder) / MODULE_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModuleFolderError(f"{str(path)!r} cannot be read as JSON ({exc})") from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("class"), str) or not _CLASS_PATH.fullmatch(spec["class"]):
        raise ModuleFolderError(f"{str(path)!r} must hold {{\"class\": \"package.module:Class\", \"kwargs\": {{...}}}}")
    spec.setdefault("kwargs", {})
    if not isinstance(spec["kwargs"], dict):
        raise ModuleFolderError(f"{str(path)!r}: \"kwargs\" must be a JSON object")
    if "num_classes" in spec and type(spec["num_classes"]) is not int:
        raise ModuleFolderError(f"{str(path)!r}: \"num_classes\" must be an integer")
    return spec


def load_module_folder(folder: str | Path, *, trusted_classes: Iterable[str | type] = (),
                       trust_module_code: bool = False) -> tuple[nn.Module, dict]:
    """Build the folder's model and load its weights; returns ``(model, spec)``.

    ``trusted_classes``: class paths (``"package.module:Class"``) or classes the folder may name, on top of
    ``TRUSTED_CLASSES``; a class given as an object is used as it is, without importing anything.
    ``trust_module_code=True`` allows any class (its module is imported: only for folders you trust).
    Raises :class:`UntrustedCodeError` for a class not allowed (its module is not imported) or not an
    ``nn.Module``, and :class:`ModuleFolderError` for a malformed folder.
    """
    folder = Path(folder)
    spec = read_module_spec(folder)
    name = spec["class"]
    given = {c if isinstance(c, str) else class_path(c): c for c in trusted_classes}
    if not (trust_module_code or name in TRUSTED_CLASSES or name in given):
        raise UntrustedCodeError(
            f"{str(folder / MODULE_FILE)!r} names the class {name!r}, which is not allowed: loading it would import "
            "and run code named by a data file. If you trust this folder, allow that class (Python: "
            f"trusted_classes=[{name!r}]; CLI: --trusted-class {name}) or any class (trust_module_code=True; CLI: "
            "--trust-module-code)"
        )
    cls = given.get(name)
    if not isinstance(cls, type):
        module_name, _, cls_name = name.partition(":")
        try:
            cls = getattr(import_module(module_name), cls_name)
        except (ImportError, AttributeError) as exc:
            raise ModuleFolderError(f"{str(folder)!r}: the class {name!r} cannot be imported ({exc})") from exc
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise UntrustedCodeError(f"{str(folder / MODULE_FILE)!r} names {name!r}, which is not an nn.Module class: "
                                 "a module folder can only name a model class")
    try:
        model = cls(**spec["kwargs"])
    except (TypeError, ValueError) as exc:
        raise ModuleFolderError(f"{str(folder)!r}: cannot build {name!r} from its kwargs ({exc})") from exc
    try:
        state = load_file(str(folder / "model.safetensors"))
    except Exception as exc:  # safetensors raises its own error type for missing, truncated or corrupt files
        raise ModuleFolderError(f"{str(folder)!r}: model.safetensors cannot be read ({exc})") from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModuleFolderError(f"{str(folder)!r}: the weights do not fit {name!r} ({exc})") from exc
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
