"""The weight-patch file: how a SalUn or IAU edit travels from the machine that computed it to a server.

One safetensors file. For each edited tensor ``P`` either

- ``P::mask`` (uint8, bit-packed little-endian over the row-major flatten, ceil(n/8) bytes) and ``P::values``
  (the nnz new values, or deltas in ``add`` mode, in increasing flat order), or
- ``P::dense`` (the whole new tensor, or the whole delta), chosen where that is not larger than the mask form.

The header (``__metadata__``, string -> string, nested values JSON-encoded) carries the format name and version,
the mode, the method and its hyperparameters, the key convention, the base fingerprint, the digests of the forget
and retain data, the creation time, and per tensor: shape, dtype, form, nnz, the digest of the base tensor and of
the patched tensor. That is enough to verify the base before touching it and to recognise a model already patched.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import PatchFormatError, PatchMismatchError
from ..fingerprint import base_fingerprint, tensor_digest
from ..kernels import masked_apply_, masked_gather, pack_mask, popcount

FORMAT_NAME = "serve-unlearn-patch"
FORMAT_VERSION = 1
Mode = Literal["replace", "add"]
Form = Literal["mask", "dense"]
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
# header keys that are JSON-encoded (the rest are plain strings)
_JSON_KEYS = ("hparams", "tensors", "extra", "components")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise PatchFormatError(f"unsupported dtype {name!r} in patch header; supported: {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass
class PatchEntry:
    """The edit of one tensor. ``values`` is 1-D (mask form) or has the tensor's shape (dense form)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    form: Form
    values: torch.Tensor
    base_digest: str
    patched_digest: str | None = None  # None where it cannot be known without the base (stacked patches)
    mask: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nnz(self) -> int:
        return self.values.numel() if self.form == "mask" else self.numel

    @property
    def nbytes(self) -> int:
        extra = self.mask.numel() if self.mask is not None else 0
        return self.values.numel() * self.values.element_size() + extra

    def write_into(self, tensor: torch.Tensor, mode: Mode) -> None:
        """Apply this entry to ``tensor`` in place (checks are the caller's job)."""
        with torch.no_grad():
            if self.form == "mask":
                masked_apply_(tensor, self.mask, self.values, mode)
            elif mode == "replace":
                tensor.copy_(self.values)
            else:
                tensor.copy_((tensor.to(torch.float32) + self.values.to(torch.float32)).to(tensor.dtype))

    def read_from(self, tensor: torch.Tensor) -> torch.Tensor:
        """The current values of ``tensor`` at the positions this entry writes (what an undo must restore)."""
        if self.form == "mask":
            return masked_gather(tensor, self.mask).clone()
        return tensor.detach().clone()

    def header(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
            "form": self.form,
            "nnz": self.nnz,
            "base_sha256": self.base_digest,
            "patched_sha256": self.patched_digest,
        }


def _choose_form(numel: int, nnz: int, itemsize: int) -> Form:
    mask_bytes = (numel + 7) // 8 + nnz * itemsize
    return "dense" if numel * itemsize <= mask_bytes else "mask"


def _bits_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise 'not bit-identical' (NaN-safe, -0.0 vs 0.0 counts as a change)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.contiguous().view(ints) != b.contiguous().view(ints)


@dataclass
class WeightPatch:
    """A set of tensor edits against one base model, with the header that identifies it.

    >>> patch = WeightPatch.from_diff(base.state_dict(), unlearned.state_dict(), method="salun")
    >>> patch.save("forget-x.patch.safetensors")
    >>> serve_unlearn.apply_patch(model, "forget-x.patch.safetensors")
    """

    entries: dict[str, PatchEntry]
    mode: Mode = "replace"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("replace", "add"):
            raise PatchFormatError(f"mode must be 'replace' or 'add', got {self.mode!r}")
        self.metadata = dict(self.metadata)
        self.metadata.setdefault("created_at", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
        self.metadata["mode"] = self.mode
        self.metadata["base_fingerprint"] = self.fingerprint

    # -- identity -------------------------------------------------------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        return sorted(self.entries)

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the base tensors this patch expects."""
        return base_fingerprint({n: e.base_digest for n, e in self.entries.items()})

    @property
    def patch_id(self) -> str:
        """Short stable id: the base fingerprint and the result, so equal edits get equal ids."""
        import hashlib

        h = hashlib.sha256(self.fingerprint.encode() + self.mode.encode())
        for name in self.tensor_names:
            e = self.entries[name]
            h.update(name.encode())
            h.update(str(e.patched_digest).encode())
            if e.patched_digest is None:
                h.update(tensor_digest(e.values).encode())
                if e.mask is not None:
                    h.update(tensor_digest(e.mask).encode())
        return h.hexdigest()[:16]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor payload (masks + values); the header adds a few KiB."""
        return sum(e.nbytes for e in self.entries.values())

    def density(self, name: str) -> float:
        e = self.entries[name]
        return e.nnz / max(e.numel, 1)

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_diff(
        cls,
        base_state_dict: Mapping[str, torch.Tensor],
        edited_state_dict: Mapping[str, torch.Tensor],
        method: str = "diff",
        mode: Mode = "replace",
        **meta: Any,
    ) -> WeightPatch:
        """Patch that turns ``base_state_dict`` into ``edited_state_dict`` (only tensors that differ are stored).

        Works on any two state dicts with the same key convention, so an unlearned checkpoint made by another
        tool becomes a patch too. ``replace`` reproduces the edited tensors bit for bit; ``add`` stores float32
        deltas (composable, rounds once when applied to low-precision weights).
        """
        unknown = sorted(set(edited_state_dict) - set(base_state_dict))
        if unknown:
            raise PatchMismatchError(
                f"edited state dict has tensors the base lacks (first: {unknown[0]!r}); "
                "both must use the same key names"
            )
        entries: dict[str, PatchEntry] = {}
        for name, new in edited_state_dict.items():
            old = base_state_dict[name]
            if tuple(old.shape) != tuple(new.shape) or old.dtype != new.dtype:
                raise PatchMismatchError(
                    f"tensor {name!r}: base is {tuple(old.shape)} {dtype_name(old.dtype)}, edited is "
                    f"{tuple(new.shape)} {dtype_name(new.dtype)}; a patch edits values, not shapes or dtypes"
                )
            if not old.is_floating_point():
                continue  # integer buffers (position ids, step counters) are never edited
            old, new = old.detach().cpu(), new.detach().cpu()
            changed = _bits_differ(old, new)
            nnz = int(changed.sum())
            if nnz == 0:
                continue
            entry_dtype = old.dtype if mode == "replace" else torch.float32
            form = _choose_form(old.numel(), nnz, torch.empty(0, dtype=entry_dtype).element_size())
            if mode == "replace":
                full = new
            else:
                full = new.to(torch.float32) - old.to(torch.float32)
            if form == "dense":
                entry = PatchEntry(tuple(old.shape), old.dtype, "dense", full.contiguous().clone(), tensor_digest(old))
            else:
                mask = pack_mask(changed)
                entry = PatchEntry(
                    tuple(old.shape), old.dtype, "mask", full.reshape(-1)[changed.reshape(-1)].contiguous(),
                    tensor_digest(old), mask=mask,
                )
            result = old.clone()
            entry.write_into(result, mode)
            entry.patched_digest = tensor_digest(result)
            entries[name] = entry
        meta.setdefault("key_convention", "state_dict")
        return cls(entries, mode, {"method": method, **meta})

    # -- files ----------------------------------------------------------------------------------------------
    def header(self) -> dict[str, str]:
        meta = dict(self.metadata)
        meta.update(format=FORMAT_NAME, format_version=str(FORMAT_VERSION),
                    tensors={n: self.entries[n].header() for n in self.tensor_names})
        return {k: (json.dumps(v, sort_keys=True) if k in _JSON_KEYS or not isinstance(v, str) else v)
                for k, v in meta.items()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + rename), so a crash never leaves a half-written patch."""
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        for name, e in self.entries.items():
            if e.form == "mask":
                tensors[f"{name}::mask"] = e.mask.contiguous()
                tensors[f"{name}::values"] = e.values.contiguous()
            else:
                tensors[f"{name}::dense"] = e.values.contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=self.header())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> WeightPatch:
        path = Path(path)
        if not path.is_file():
            raise PatchFormatError(f"patch file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safetensors handle is not a dict
        except Exception as exc:  # safetensors raises several types for truncated/corrupt files
            raise PatchFormatError(
                f"{str(path)!r} is not a readable safetensors file ({exc}); it may be truncated or corrupt: "
                "copy it again or recreate the patch"
            ) from exc
        return cls._from_parts(raw, tensors, str(path))

    @classmethod
    def _from_parts(cls, raw: Mapping[str, str], tensors: Mapping[str, torch.Tensor], where: str) -> WeightPatch:
        if raw.get("format") != FORMAT_NAME:
            raise PatchFormatError(f"{where!r} is not a serve-unlearn patch (header format={raw.get('format')!r})")
        if raw.get("format_version") != str(FORMAT_VERSION):
            raise PatchFormatError(
                f"{where!r} has patch format version {raw.get('format_version')!r}; this serve-unlearn reads "
                f"version {FORMAT_VERSION}: upgrade serve-unlearn or recreate the patch"
            )
        meta: dict[str, Any] = {}
        try:
            for k, v in raw.items():
                meta[k] = json.loads(v) if k in _JSON_KEYS else v
            table = meta.pop("tensors")
        except (KeyError, json.JSONDecodeError) as exc:
            raise PatchFormatError(f"{where!r} has a damaged header ({exc}); recreate the patch") from exc
        for k in ("format", "format_version"):
            meta.pop(k, None)
        mode = meta.get("mode", "replace")
        entries = {}
        for name, info in table.items():
            try:
                shape = tuple(int(s) for s in info["shape"])
                dtype = _dtype_from_name(info["dtype"])
                form, nnz = info["form"], int(info["nnz"])
                entry = PatchEntry(shape, dtype, form, torch.empty(0), info["base_sha256"], info.get("patched_sha256"))
            except (KeyError, TypeError, ValueError) as exc:
                raise PatchFormatError(f"{where!r}: header entry for {name!r} is damaged ({exc})") from exc
            value_dtype = dtype if mode == "replace" else torch.float32
            if form == "mask":
                mask, values = tensors.get(f"{name}::mask"), tensors.get(f"{name}::values")
                if mask is None or values is None:
                    raise PatchFormatError(f"{where!r}: tensor data for {name!r} is missing; recreate the patch")
                if mask.dtype != torch.uint8 or mask.numel() != (entry.numel + 7) // 8:
                    raise PatchFormatError(
                        f"{where!r}: mask of {name!r} has {mask.numel()} {dtype_name(mask.dtype)} entries, "
                        f"expected {(entry.numel + 7) // 8} uint8"
                    )
                if popcount(mask) != nnz or values.numel() != nnz or values.dtype != value_dtype:
                    raise PatchFormatError(
                        f"{where!r}: {name!r} declares {nnz} {dtype_name(value_dtype)} values but carries "
                        f"{values.numel()} {dtype_name(values.dtype)} values for {popcount(mask)} mask bits"
                    )
                entry.mask, entry.values = mask, values
            elif form == "dense":
                dense = tensors.get(f"{name}::dense")
                if dense is None or tuple(dense.shape) != shape or dense.dtype != value_dtype:
                    raise PatchFormatError(f"{where!r}: dense data for {name!r} is missing or has the wrong shape")
                entry.values = dense
            else:
                raise PatchFormatError(f"{where!r}: unknown form {form!r} for {name!r}")
            entries[name] = entry
        patch = cls(entries, mode, meta)
        if meta.get("base_fingerprint") and meta["base_fingerprint"] != patch.fingerprint:
            raise PatchFormatError(f"{where!r}: header fingerprint does not match its tensor table; recreate the patch")
        return patch
