"""Apply, revert and stack weight patches on live models and state dicts.

Apply is all or nothing: every tensor is checked (present, shape, dtype, base digest, no NaN/inf introduced)
before the first write, and a failure during the writes (or a result check after one) puts back what was
already written. Each apply returns an *undo patch* (the same positions, holding the base values, ``replace``
mode), so revert is simply applying the undo: bit-exact whatever the mode, and the undo can be saved beside a
checkpoint folder to revert it on disk later.

What is verified: a version-2 file's header and stored bytes were checked against their digests when it was
loaded (``format``), so the values are known before they are written. For data without that check (a version-1
file), and for every tensor with ``verify="full"``, the written tensor's digest is compared with the patched
digest the author recorded, and a mismatch puts the model back and raises :class:`PatchFormatError`.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Literal

import torch
from torch import nn

from ..errors import PatchFormatError, PatchMismatchError, PatchStateError
from ..fingerprint import tensor_digest
from ..kernels import pack_mask, unpack_mask
from .format import PatchEntry, WeightPatch, dtype_name
from .integrity import all_finite, check_finite

PatchLike = WeightPatch | str | os.PathLike
Target = nn.Module | MutableMapping[str, torch.Tensor]
Overlap = Literal["last", "error"]
OVERLAPS: tuple[Overlap, ...] = ("last", "error")
# True: base digests before writing, results of unverified data after; "full": every result after; False: neither
Verify = bool | Literal["full"]


class _UndoStore:
    """Undo entries of live applications, per tensor object, so a revert in the same process needs no file.

    Keyed by ``id(tensor)`` with a finalizer (tensors compare element-wise, so they cannot be dict keys).
    """

    def __init__(self) -> None:
        self._by_id: dict[int, dict[str, PatchEntry]] = {}

    def put(self, tensor: torch.Tensor, patch_id: str, entry: PatchEntry) -> None:
        key = id(tensor)
        if key not in self._by_id:
            self._by_id[key] = {}
            weakref.finalize(tensor, self._by_id.pop, key, None)
        self._by_id[key][patch_id] = entry

    def get(self, tensor: torch.Tensor, patch_id: str) -> PatchEntry | None:
        return self._by_id.get(id(tensor), {}).get(patch_id)

    def pop(self, tensor: torch.Tensor, patch_id: str) -> None:
        self._by_id.get(id(tensor), {}).pop(patch_id, None)


_UNDO = _UndoStore()


def as_patch(patch: PatchLike) -> WeightPatch:
    return patch if isinstance(patch, WeightPatch) else WeightPatch.load(patch)


def target_tensors(target: Target) -> dict[str, torch.Tensor]:
    """Name -> tensor, with HF/diffusers checkpoint key names for modules (parameters and buffers)."""
    if isinstance(target, nn.Module):
        return dict(target.state_dict(keep_vars=True))
    if isinstance(target, Mapping):
        return dict(target)
    raise TypeError(f"expected an nn.Module or a state dict, got {type(target).__name__}")


def _check_fits(name: str, entry: PatchEntry, tensors: Mapping[str, torch.Tensor], patch: WeightPatch) -> torch.Tensor:
    if name not in tensors:
        sample = ", ".join(list(tensors)[:3])
        raise PatchMismatchError(
            f"{patch.where!r}: patch tensor {name!r} is not in the model (key convention "
            f"{patch.metadata.get('key_convention')!r}; the model has e.g. {sample}): apply the patch to the model "
            "it was made for"
        )
    t = tensors[name]
    if tuple(t.shape) != entry.shape:
        raise PatchMismatchError(
            f"{patch.where!r}: tensor {name!r} has shape {tuple(t.shape)} but the patch was made for {entry.shape}: "
            "this is another model architecture"
        )
    if t.dtype != entry.dtype:
        raise PatchMismatchError(
            f"{patch.where!r}: tensor {name!r} is {dtype_name(t.dtype)} but the patch was made for "
            f"{dtype_name(entry.dtype)}: load the model with dtype={dtype_name(entry.dtype)}"
        )
    return t


def _check_base(name: str, tensor: torch.Tensor, patch: WeightPatch) -> None:
    entry = patch.entries[name]
    digest = tensor_digest(tensor)
    if digest != entry.base_digest:
        if digest == entry.patched_digest:
            raise PatchStateError(f"{patch.where!r}: tensor {name!r} already holds this patch's values: it is "
                                  "already applied")
        raise PatchMismatchError(
            f"{patch.where!r}: tensor {name!r} differs from the base this patch was made for (patch base "
            f"fingerprint {patch.fingerprint[:12]}): apply it to that base model, or recompute the patch on this one"
        )


def _check_finite(name: str, entry: PatchEntry, before: torch.Tensor, patch: WeightPatch) -> None:
    if patch.metadata.get("method") == "undo":
        return  # an undo puts back what the base held, finite or not
    check_finite(patch.where, name, entry.result_at(before, patch.mode), before)


def _verify_arg(verify: Verify) -> Verify:
    if verify not in (True, False, "full"):
        raise ValueError(f"verify must be True, False or 'full', got {verify!r}")
    return verify


def _checks_result(entry: PatchEntry, verify: Verify) -> bool:
    return entry.patched_digest is not None and (verify == "full" or (bool(verify) and not entry.checked))


def _write_checked(tensor: torch.Tensor, entry: PatchEntry, patch: WeightPatch, verify: Verify) -> bool:
    """Write one entry; where the result is checked and differs, put the whole tensor back (not only the edited
    positions: a faulty write may have strayed outside them) and return False."""
    if not _checks_result(entry, verify):
        entry.write_into(tensor.data, patch.mode)
        return True
    pristine = tensor.detach().clone()
    entry.write_into(tensor.data, patch.mode)
    if tensor_digest(tensor) == entry.patched_digest:
        return True
    tensor.data.copy_(pristine)
    return False


def _wrong_result(name: str, patch: WeightPatch) -> PatchFormatError:
    return PatchFormatError(
        f"{patch.where!r}: after the write, tensor {name!r} did not hold the values the patch's author made (its "
        "digest differs from the recorded patched_sha256): the patch data is damaged, and the model was put back "
        "to its base. Copy the patch again or recreate it"
    )


def _undo_entry(entry: PatchEntry, before: torch.Tensor) -> PatchEntry:
    return PatchEntry(entry.shape, entry.dtype, entry.form, before, base_digest=None,
                      patched_digest=entry.base_digest, mask=entry.mask)


def apply_to_tensor(name: str, tensor: torch.Tensor, patch: WeightPatch, *, verify: Verify = True) -> None:
    """Verify and patch one tensor in place, keeping no undo: for loaders that stream a checkpoint once.

    The same checks as :func:`apply_patch` for this tensor (base digest, no NaN/inf introduced, the result where
    the data was not verified when loaded); when one fails the tensor is left as it was (put back bit for bit
    where the check comes after the write) and the error raised. The values the write replaces are read only
    where a check needs them (``add`` mode, or NaN/inf among the new values): a loader patches a private copy of
    each streamed tensor, which an error in the write itself (out of memory) leaves for the loader to discard.
    """
    verify = _verify_arg(verify)
    entry = patch.entries[name]
    _check_fits(name, entry, {name: tensor}, patch)
    if verify:
        _check_base(name, tensor, patch)
    before = None
    if patch.mode == "add" or not all_finite(entry.values):
        before = entry.read_from(tensor)
        _check_finite(name, entry, before, patch)
    try:
        ok = _write_checked(tensor, entry, patch, verify)
    except BaseException:
        if before is not None:
            _undo_entry(entry, before).write_into(tensor, "replace")
        raise
    if not ok:
        raise _wrong_result(name, patch)


def _unique_storage(names: Sequence[str], tensors: Mapping[str, torch.Tensor], patch: WeightPatch) -> list[str]:
    """Tied weights appear under two names; write them once (and refuse two different edits of one tensor)."""
    seen: dict[tuple[int, int], str] = {}
    keep = []
    for name in names:
        t = tensors[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            first = seen[key]
            a, b = patch.entries[first], patch.entries[name]
            if a.patched_digest != b.patched_digest or a.base_digest != b.base_digest:
                raise PatchMismatchError(f"{patch.where!r}: {first!r} and {name!r} are one tied tensor but the patch "
                                         "edits them differently")
            continue
        seen[key] = name
        keep.append(name)
    return keep


def apply_patch(target: Target, patch: PatchLike, *, verify: Verify = True) -> WeightPatch:
    """Apply ``patch`` to a module or state dict in place and return its undo patch.

    Raises :class:`PatchMismatchError` (naming the first tensor that differs) if the model is not the base the
    patch was made for, :class:`PatchStateError` if it is already patched, and :class:`PatchFormatError` if the
    file is damaged, would write NaN/inf where the base has none, or (data not verified at load, or
    ``verify="full"``) a written tensor differs from the author's result; in every case the model is unchanged.
    ``verify=False`` skips the base and result digests (the file itself is still verified when loaded).
    """
    return _apply(target, patch, verify=verify, record=True)


def _apply(target: Target, patch: PatchLike, *, verify: Verify, record: bool) -> WeightPatch:
    verify = _verify_arg(verify)
    patch = as_patch(patch)
    tensors = target_tensors(target)
    names = patch.tensor_names
    for name in names:
        t = _check_fits(name, patch.entries[name], tensors, patch)
        if verify:
            _check_base(name, t, patch)
    names = _unique_storage(names, tensors, patch)
    # what each write replaces (the undo), read and checked for every tensor before the first write
    undo: dict[str, PatchEntry] = {}
    for name in names:
        entry = patch.entries[name]
        before = entry.read_from(tensors[name])
        _check_finite(name, entry, before, patch)
        undo[name] = _undo_entry(entry, before)
    written: list[str] = []
    try:
        for name in names:
            entry, t = patch.entries[name], tensors[name]
            written.append(name)  # first: a write that fails half-way is put back too
            if not _write_checked(t, entry, patch, verify):
                written.pop()  # already put back whole
                raise _wrong_result(name, patch)
    except BaseException:
        for name in reversed(written):
            undo[name].write_into(tensors[name].data, "replace")
        raise
    for name in names:
        undo[name].base_digest = patch.entries[name].patched_digest or tensor_digest(tensors[name])
    undo_patch = WeightPatch(undo, "replace", {"method": "undo", "undoes": patch.patch_id,
                                                 "key_convention": patch.metadata.get("key_convention", "state_dict")})
    if record:
        for name in names:
            _UNDO.put(tensors[name], patch.patch_id, undo[name])
    return undo_patch


def revert_patch(target: Target, patch: PatchLike, *, undo: PatchLike | None = None) -> None:
    """Restore the base values bit-exactly.

    Uses the undo recorded when the patch was applied in this process, or ``undo`` (the undo patch returned by
    :func:`apply_patch`, or one saved beside a materialized checkpoint).
    """
    patch = as_patch(patch)
    tensors = target_tensors(target)
    if undo is not None:
        undo_patch = as_patch(undo)
        if undo_patch.metadata.get("undoes") not in (None, patch.patch_id):
            raise PatchStateError(f"the undo given belongs to patch {undo_patch.metadata.get('undoes')}, "
                                  f"not to {patch.patch_id}")
    else:
        entries = {}
        for name in _unique_storage(
            [n for n in patch.tensor_names if n in tensors], tensors, patch
        ):
            saved = _UNDO.get(tensors[name], patch.patch_id)
            if saved is None:
                if tensor_digest(tensors[name]) == patch.entries[name].base_digest:
                    raise PatchStateError(f"patch {patch.patch_id} is not applied (tensor {name!r} holds the base values)")
                raise PatchStateError(
                    f"no record of patch {patch.patch_id} being applied to tensor {name!r} in this process: "
                    "pass undo= (the undo patch apply_patch returned, or the one saved beside the checkpoint)"
                )
            entries[name] = saved
        undo_patch = WeightPatch(entries, "replace", {"method": "undo", "undoes": patch.patch_id})
    try:
        _apply(target, undo_patch, verify=True, record=False)
    except PatchStateError as exc:
        raise PatchStateError(f"patch {patch.patch_id} is not applied (the model already holds the base values)") from exc
    except PatchMismatchError as exc:
        raise PatchStateError(
            f"cannot revert patch {patch.patch_id}: the model is not in the state the patch left it in ({exc}); "
            "revert patches applied later first"
        ) from exc
    for name in undo_patch.tensor_names:
        if name in tensors:
            _UNDO.pop(tensors[name], patch.patch_id)


def stack_patches(patches: Sequence[PatchLike], overlap: Overlap = "last") -> WeightPatch:
    """Combine patches made against the same base into one, in order.

    Rule for elements edited by several patches: ``replace`` patches, ``overlap="last"`` keeps the value of the
    last patch in the list (``"error"`` refuses any overlap); ``add`` patches sum their deltas. Patches must agree
    on the mode and on the base digest of every tensor they share.
    """
    if overlap not in OVERLAPS:  # checked first: a single patch must not let a bad value through
        raise ValueError(f"overlap must be 'last' or 'error', got {overlap!r}")
    patches = [as_patch(p) for p in patches]
    if not patches:
        raise ValueError("stack_patches needs at least one patch")
    if len(patches) == 1:
        return patches[0]
    source = " + ".join(p.where for p in patches)
    modes = {p.mode for p in patches}
    if len(modes) != 1:
        raise PatchMismatchError(f"cannot stack patches of different modes {sorted(modes)}; stack them separately")
    mode = modes.pop()
    names = sorted({n for p in patches for n in p.entries})
    entries: dict[str, PatchEntry] = {}
    for name in names:
        parts = [p.entries[name] for p in patches if name in p.entries]
        if len(parts) == 1:
            entries[name] = parts[0]
            continue
        first = parts[0]
        for e in parts[1:]:
            if e.base_digest != first.base_digest or e.shape != first.shape or e.dtype != first.dtype:
                raise PatchMismatchError(f"patches disagree on the base of tensor {name!r}: they were made for "
                                         "different models; a patch made on a patched model needs materialize first")
        n = first.numel
        covered = torch.zeros(n, dtype=torch.bool)
        acc = torch.zeros(n, dtype=first.values.dtype if mode == "replace" else torch.float32)
        for e in parts:
            m = unpack_mask(e.mask, n) if e.form == "mask" else torch.ones(n, dtype=torch.bool)
            if overlap == "error" and bool((covered & m).any()):
                raise PatchMismatchError(f"patches overlap on tensor {name!r} and overlap='error' was asked")
            vals = e.values.reshape(-1)
            if mode == "replace":
                acc[m] = vals
            else:
                acc[m] += vals.to(torch.float32)
            covered |= m
        if bool(covered.all()):
            entries[name] = PatchEntry(first.shape, first.dtype, "dense", acc.reshape(first.shape), first.base_digest,
                                       checked=all(e.checked for e in parts))
        else:
            entries[name] = PatchEntry(first.shape, first.dtype, "mask", acc[covered].contiguous(), first.base_digest,
                                       mask=pack_mask(covered), checked=all(e.checked for e in parts))
    keys = {p.metadata.get("key_convention") for p in patches}
    meta = {"method": "stack", "overlap": overlap, "key_convention": keys.pop() if len(keys) == 1 else "mixed",
            "components": [{"patch_id": p.patch_id, "method": p.metadata.get("method")} for p in patches]}
    return WeightPatch(entries, mode, meta, source=source, verified=all(p.verified for p in patches))
