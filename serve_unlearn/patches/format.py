"""The weight-patch file: how a SalUn or IAU edit travels from the machine that computed it to a server.

One safetensors file. For each edited tensor ``P`` either

- ``P::mask`` (uint8, bit-packed little-endian over the row-major flatten, ceil(n/8) bytes) and ``P::values``
  (the nnz new values, or deltas in ``add`` mode, in increasing flat order), or
- ``P::dense`` (the whole new tensor, or the whole delta), chosen where that is not larger than the mask form.

The header (``__metadata__``, string -> string, nested values JSON-encoded) carries the format name and version,
the mode, the method and its hyperparameters, the key convention, the base fingerprint, the digests of the forget
and retain data, the creation time, and per tensor: shape, dtype, form, nnz, the digest of the base tensor, of the
patched tensor and (version 2) of the stored payload; plus (version 2) a digest of the whole header. Loading
checks every byte against those digests (``integrity``), so what reaches a model is what the author wrote; the
base digest is checked before touching a tensor, and the patched digest recognises a model already patched.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
import warnings
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
from .integrity import (
    HEADER_DIGEST_KEY,
    PAYLOAD_DIGEST_KEY,
    UnverifiedPatchWarning,
    check_canonical_header,
    check_finite,
    damaged,
    header_digest,
    is_hex_digest,
    payload_digest,
)

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "READ_VERSIONS", "PatchEntry", "UnverifiedPatchWarning", "WeightPatch",
           "dtype_name"]

FORMAT_NAME = "serve-unlearn-patch"
FORMAT_VERSION = 2  # written; version 1 (no header or payload digests) is still read, as unverified
READ_VERSIONS = (1, 2)
Mode = Literal["replace", "add"]
Form = Literal["mask", "dense"]
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
# header keys that are JSON-encoded (the rest are plain strings)
_JSON_KEYS = ("hparams", "tensors", "extra", "components")
# header keys a file must carry (a renamed key is a missing key: never a skipped check)
_REQUIRED = {1: ("format", "format_version", "mode", "base_fingerprint", "tensors"),
             2: ("format", "format_version", HEADER_DIGEST_KEY, "mode", "method", "key_convention",
                 "base_fingerprint", "created_at", "tensors")}
_ENTRY_KEYS = ("shape", "dtype", "form", "nnz", "base_sha256", "patched_sha256")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
    # False for data read from a version-1 file (no payload digest): apply then checks the result after writing
    checked: bool = True

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
            return masked_gather(tensor, self.mask)
        return tensor.detach().clone()

    def result_at(self, before: torch.Tensor, mode: Mode) -> torch.Tensor:
        """The values this entry leaves at its positions, given what they held (``before``, as ``read_from``)."""
        if mode == "replace":
            return self.values
        values = self.values.to(before.device).reshape(before.shape)
        return (before.to(torch.float32) + values.to(torch.float32)).to(before.dtype)

    def stored(self) -> list[torch.Tensor]:
        """The tensors a file holds for this entry, in payload-digest order: (mask, values) or (dense,)."""
        return [self.mask, self.values] if self.form == "mask" else [self.values]

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
    source: str | None = None  # the file it was loaded from (named in errors)
    format_version: int | None = None  # of that file; None for a patch made in this process
    # every header entry and stored byte was checked against a digest (or the patch was made in this process);
    # False for a version-1 file, and for anything stacked from one
    verified: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("replace", "add"):
            raise PatchFormatError(f"{self.where!r}: mode must be 'replace' or 'add', got {self.mode!r}")
        self.metadata = dict(self.metadata)
        self.metadata.setdefault("created_at", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
        self.metadata["mode"] = self.mode
        self.metadata["base_fingerprint"] = self.fingerprint

    # -- identity -------------------------------------------------------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        return sorted(self.entries)

    @property
    def where(self) -> str:
        """The file this patch came from, for messages ("patch (in memory)" for one made in this process)."""
        return self.source or "patch (in memory)"

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
            check_finite(f"WeightPatch.from_diff(method={method!r})", name, result, old)
            entry.patched_digest = tensor_digest(result)
            entries[name] = entry
        meta.setdefault("key_convention", "state_dict")
        return cls(entries, mode, {"method": method, **meta})

    # -- files ----------------------------------------------------------------------------------------------
    def header(self) -> dict[str, str]:
        """The file header (format version 2): per-tensor payload digests, then a digest of the whole header."""
        meta = dict(self.metadata)
        meta.pop(HEADER_DIGEST_KEY, None)
        meta.setdefault("method", "unknown")
        if meta.get("key_convention") is None:
            meta["key_convention"] = "state_dict"
        tensors = {}
        for name in self.tensor_names:
            e = self.entries[name]
            info = e.header()
            info[PAYLOAD_DIGEST_KEY] = payload_digest(name, self.mode, info, e.stored())
            tensors[name] = info
        meta.update(format=FORMAT_NAME, format_version=str(FORMAT_VERSION), tensors=tensors)
        raw = {k: (json.dumps(v, sort_keys=True) if k in _JSON_KEYS or not isinstance(v, str) else v)
               for k, v in meta.items()}
        raw[HEADER_DIGEST_KEY] = header_digest(raw)
        return raw

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file + rename), so a crash never leaves a half-written patch."""
        if not (self.verified and all(e.checked for e in self.entries.values())):
            raise PatchFormatError(
                f"{self.where!r} was read from a version-1 file, whose bytes carry no digests: saving it as version "
                "2 would vouch for bytes nobody checked. Apply it to its base model (each result is checked there "
                "against the author's digest) and make a new patch with WeightPatch.from_diff"
            )
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        for name, e in self.entries.items():
            keys = (f"{name}::mask", f"{name}::values") if e.form == "mask" else (f"{name}::dense",)
            tensors.update(zip(keys, (t.contiguous() for t in e.stored())))
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
        """Read and verify a patch file: every header entry and every stored byte against its digest (version 2).

        Raises :class:`PatchFormatError` naming the file and what is wrong; a version-1 file loads with an
        :class:`UnverifiedPatchWarning` (its results are checked after each write instead).
        """
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise PatchFormatError(f"patch file {where!r} does not exist")
        try:
            with safe_open(where, framework="pt") as f:
                raw = f.metadata() or {}
                # copies: a tensor mapped from the file would follow later writes to it, after it was verified
                tensors = {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118 - a safetensors handle is not a dict
        except Exception as exc:  # safetensors raises several types for truncated/corrupt files
            raise PatchFormatError(
                f"{where!r} is not a readable safetensors file ({exc}); it may be truncated or corrupt: "
                "copy it again or recreate the patch"
            ) from exc
        patch = cls._from_parts(raw, tensors, where)
        if patch.format_version != 1:
            check_canonical_header(where, raw)
        return patch

    @classmethod
    def _from_parts(cls, raw: Mapping[str, str], tensors: Mapping[str, torch.Tensor], where: str) -> WeightPatch:
        if raw.get("format") != FORMAT_NAME:
            raise PatchFormatError(f"{where!r} is not a serve-unlearn patch (header format={raw.get('format')!r})")
        version = raw.get("format_version")
        if version not in [str(v) for v in READ_VERSIONS]:
            raise PatchFormatError(
                f"{where!r} has patch format version {version!r}; this serve-unlearn reads versions "
                f"{', '.join(map(str, READ_VERSIONS))}: upgrade serve-unlearn or recreate the patch"
            )
        version = int(version)
        if version >= 2 and raw.get(HEADER_DIGEST_KEY) != header_digest(raw):
            raise damaged(where, f"the header does not match its digest ({HEADER_DIGEST_KEY})")
        if version == 1 and HEADER_DIGEST_KEY in raw:
            raise damaged(where, "a version-1 header carries a version-2 header digest")
        missing = [k for k in _REQUIRED[version] if k not in raw]
        if missing:
            raise damaged(where, f"the header lacks the required key {missing[0]!r}")
        meta: dict[str, Any] = {}
        try:
            for k, v in raw.items():
                meta[k] = json.loads(v) if k in _JSON_KEYS else v
        except json.JSONDecodeError as exc:
            raise PatchFormatError(f"{where!r} has a damaged header ({exc}); recreate the patch") from exc
        table = meta.pop("tensors")
        for k in ("format", "format_version", HEADER_DIGEST_KEY):
            meta.pop(k, None)
        mode = meta["mode"]
        if mode not in ("replace", "add"):
            raise damaged(where, f"the header has an unknown mode {mode!r}")
        if not isinstance(table, dict):
            raise damaged(where, "the tensor table is not a JSON object")
        entries = {name: _entry_from(where, version, mode, name, info, tensors) for name, info in table.items()}
        stored = {f"{n}::{part}" for n, e in entries.items() for part in (("mask", "values") if e.form == "mask"
                                                                            else ("dense",))}
        unexpected = sorted(set(tensors) - stored)
        if unexpected:
            raise damaged(where, f"it holds tensor data no header entry names ({unexpected[0]!r})")
        patch = cls(entries, mode, meta, source=where, format_version=version, verified=version >= 2)
        if meta["base_fingerprint"] != patch.fingerprint:
            raise PatchFormatError(f"{where!r}: header fingerprint does not match its tensor table; recreate the patch")
        if version == 1:
            warnings.warn(
                f"{where!r} is a version-1 patch: its header and stored bytes carry no digests and cannot be verified "
                "before use (each result is checked against the patched digest after it is written). Recreate it "
                "with this serve-unlearn to get a verified version-2 file", UnverifiedPatchWarning, stacklevel=3)
        return patch


def _entry_from(where: str, version: int, mode: str, name: str, info: Any,
                tensors: Mapping[str, torch.Tensor]) -> PatchEntry:
    """One tensor's entry from its header record and stored data, every field checked (and the payload digest)."""
    if not isinstance(info, dict):
        raise damaged(where, f"the header entry of {name!r} is not a JSON object")
    required = _ENTRY_KEYS + ((PAYLOAD_DIGEST_KEY,) if version >= 2 else ())
    missing = [k for k in required if k not in info and not (version == 1 and k == "patched_sha256")]
    if missing:
        raise damaged(where, f"the header entry of {name!r} lacks {missing[0]!r}")
    if version >= 2 and set(info) - set(required):
        raise damaged(where, f"the header entry of {name!r} has unknown fields {sorted(set(info) - set(required))}")
    shape, form, nnz = info["shape"], info["form"], info["nnz"]
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise damaged(where, f"the header entry of {name!r} has a bad shape {shape!r}")
    if info["dtype"] not in _DTYPES:
        raise damaged(where, f"the header entry of {name!r} has an unsupported dtype {info['dtype']!r} "
                             f"(supported: {sorted(_DTYPES)})")
    if form not in ("mask", "dense"):
        raise damaged(where, f"unknown form {form!r} for {name!r}")
    entry = PatchEntry(tuple(shape), _DTYPES[info["dtype"]], form, torch.empty(0), info["base_sha256"],
                       info.get("patched_sha256"), checked=version >= 2)
    if type(nnz) is not int or not 0 <= nnz <= entry.numel or (form == "dense" and nnz != entry.numel):
        raise damaged(where, f"the header entry of {name!r} has a bad nnz {nnz!r} for {entry.numel} elements")
    if not is_hex_digest(entry.base_digest) or not (entry.patched_digest is None
                                                    or is_hex_digest(entry.patched_digest)):
        raise damaged(where, f"the header entry of {name!r} has a malformed digest")
    value_dtype = entry.dtype if mode == "replace" else torch.float32
    if form == "mask":
        mask, values = tensors.get(f"{name}::mask"), tensors.get(f"{name}::values")
        if mask is None or values is None:
            raise PatchFormatError(f"{where!r}: tensor data for {name!r} is missing; recreate the patch")
        n = entry.numel
        if mask.dtype != torch.uint8 or mask.dim() != 1 or mask.numel() != (n + 7) // 8:
            raise PatchFormatError(
                f"{where!r}: mask of {name!r} has {mask.numel()} {dtype_name(mask.dtype)} entries, "
                f"expected {(n + 7) // 8} uint8; the file is damaged: recreate the patch"
            )
        if n % 8 and int(mask[-1]) >> (n % 8):
            raise damaged(where, f"the mask of {name!r} has bits set past the tensor's last element")
        bits = popcount(mask)
        if bits != nnz or values.dim() != 1 or values.numel() != nnz or values.dtype != value_dtype:
            raise PatchFormatError(
                f"{where!r}: {name!r} declares {nnz} {dtype_name(value_dtype)} values but carries "
                f"{values.numel()} {dtype_name(values.dtype)} values for {bits} mask bits; the file is damaged: "
                "recreate the patch"
            )
        entry.mask, entry.values = mask, values
    else:
        dense = tensors.get(f"{name}::dense")
        if dense is None or tuple(dense.shape) != entry.shape or dense.dtype != value_dtype:
            raise PatchFormatError(f"{where!r}: dense data for {name!r} is missing or has the wrong shape or dtype; "
                                   "the file is damaged: recreate the patch")
        entry.values = dense
    if version >= 2 and info[PAYLOAD_DIGEST_KEY] != payload_digest(name, mode, info, entry.stored()):
        raise damaged(where, f"the stored data of tensor {name!r} does not match its digest ({PAYLOAD_DIGEST_KEY})")
    return entry
