"""Write a patched copy of an HF / diffusers checkpoint folder, for servers that cannot load patches.

Shards keep their names and the index stays valid; files that are not weight shards are copied unchanged. The
undo patch is saved inside the new folder (``.serve_unlearn/``), so ``serve-unlearn patch revert`` can turn it
back into the base bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import PatchMismatchError
from .apply import Overlap, PatchLike, apply_patch, stack_patches
from .format import WeightPatch

UNDO_DIR = ".serve_unlearn"


def weight_shards(folder: Path) -> list[Path]:
    """The safetensors shards of a checkpoint folder (index order when there is an index)."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        names = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
        return [folder / n for n in names]
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors weights in {str(folder)!r}: is this an HF checkpoint folder?")
    return shards


def patch_folder_in_place(folder: Path, patch: WeightPatch) -> WeightPatch:
    """Apply ``patch`` to the shards of ``folder`` (each shard rewritten atomically); returns the undo patch."""
    shards = weight_shards(folder)
    owner: dict[str, Path] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - a safetensors handle is not a dict
                owner[key] = shard
    missing = [n for n in patch.tensor_names if n not in owner]
    if missing:
        raise PatchMismatchError(
            f"patch tensor {missing[0]!r} is not in the checkpoint {str(folder)!r} "
            f"({len(missing)} missing): apply the patch to the model it was made for"
        )
    # verify every touched shard before rewriting any of them: all or nothing across shards
    loaded = {}
    for shard in sorted({owner[n] for n in patch.tensor_names}):
        with safe_open(str(shard), framework="pt") as f:
            meta = f.metadata()
        loaded[shard] = (load_file(str(shard)), meta)
    undo_entries = {}
    for shard, (tensors, _) in loaded.items():
        part = WeightPatch({n: e for n, e in patch.entries.items() if owner[n] == shard}, patch.mode, patch.metadata,
                           source=patch.source, verified=patch.verified)
        undo_entries.update(apply_patch(tensors, part).entries)
    for shard, (tensors, meta) in loaded.items():
        tmp = shard.with_name(f".tmp-{shard.name}")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, shard)
    return WeightPatch(undo_entries, "replace", {"method": "undo", "undoes": patch.patch_id,
                                                 "key_convention": patch.metadata.get("key_convention")})


def undo_path(folder: Path, patch: WeightPatch) -> Path:
    return folder / UNDO_DIR / f"undo-{patch.patch_id}.safetensors"


def materialize(
    base_dir: str | os.PathLike,
    patches: Sequence[PatchLike] | PatchLike,
    out_dir: str | os.PathLike,
    *,
    subfolder: str | None = None,
    overlap: Overlap = "last",
) -> Path:
    """Copy ``base_dir`` to ``out_dir`` with the (stacked) patches applied to its weights.

    ``subfolder`` selects the component of a diffusers pipeline folder (e.g. ``"unet"``). The base folder is
    never modified; ``out_dir`` appears only when complete.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{str(out_dir)!r} exists: choose a new output folder")
    if not isinstance(patches, (list, tuple)):
        patches = [patches]
    patch = stack_patches(list(patches), overlap=overlap)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base_dir, tmp, ignore=shutil.ignore_patterns(UNDO_DIR))
    try:
        target = tmp / subfolder if subfolder else tmp
        undo = patch_folder_in_place(target, patch)
        undo.save(undo_path(target, patch))
        (target / UNDO_DIR / "applied.json").write_text(json.dumps(
            [{"patch_id": patch.patch_id, **{k: v for k, v in patch.metadata.items() if isinstance(v, str)}}],
            indent=2, sort_keys=True))
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
