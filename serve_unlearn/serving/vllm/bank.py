"""The scaled adapter bank: soft O3 weights on a vLLM that only knows whole adapters.

vLLM folds ``lora_alpha / r`` into the LoRA at load and has no per-request scale, so a scale s is served as its
own adapter: a folder whose ``adapter_config.json`` sets ``lora_alpha = s·α`` and whose weights file is a symlink
to the one adapter (the weights are shared on disk, never copied). The gate's scale is mapped to a bucket; scale 0
is the base model (no LoRA at all). Names carry the registry generation (``o3-v{generation}-s{scale}``), so a new or
retired forget request gets new names: vLLM caches KV by adapter, and reusing a name for new weights would serve
stale prefixes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ...adapters.orthogonal_lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter

NAME_PREFIX = "o3-"


@dataclass(frozen=True)
class AdapterBank:
    version: int
    scales: tuple[float, ...]          # ascending, all > 0
    names: tuple[str, ...]             # one per scale
    paths: tuple[Path, ...]
    rank: int

    def bucket(self, scale: float, rounding: Literal["floor", "nearest"] = "nearest") -> str | None:
        """The adapter name for a gate scale, or None for the base model.

        ``floor`` never applies more unlearning than asked (kind to utility); ``nearest`` minimises |s − ŝ|.
        A scale above the largest bucket gets the largest.
        """
        if not scale > 0:
            return None
        if rounding == "floor":
            below = [i for i, s in enumerate(self.scales) if s <= scale + 1e-9]
            return self.names[below[-1]] if below else None
        # nearest, with 0 (the base model) as a candidate too
        candidates = [(abs(scale), None)] + [(abs(scale - s), n) for s, n in zip(self.scales, self.names)]
        return min(candidates, key=lambda c: c[0])[1]

    def lora_modules(self) -> list[str]:
        """``--lora-modules`` arguments: ``name=path`` for each bucket."""
        return [f"{n}={p}" for n, p in zip(self.names, self.paths)]


def bank_name(version: int, scale: float) -> str:
    return f"{NAME_PREFIX}v{version}-s{round(scale * 100):03d}"


def build_bank(adapter_dir: str | Path, out_dir: str | Path, version: int,
               scales: Sequence[float] = (0.25, 0.5, 0.75, 1.0), *, write: bool = True) -> AdapterBank:
    """Write (or re-use) the scaled copies of ``adapter_dir`` under ``out_dir/v{version}/``; ``write=False`` only
    computes names and paths (for ``--dry-run``)."""
    scales = tuple(sorted({float(s) for s in scales}))
    if not scales or any(not (s > 0 and math.isfinite(s)) for s in scales):
        raise ValueError(f"bank scales must be positive and finite, got {scales}")
    cfg, _ = read_adapter(adapter_dir)  # validates the adapter once, here, not inside vLLM
    weights = (Path(adapter_dir) / ADAPTER_WEIGHTS).resolve()
    root = Path(out_dir) / f"v{version}"
    names, paths = [], []
    for s in scales:
        name = bank_name(version, s)
        folder = root / name
        if write:
            # written from scratch: a file someone left in a bank folder (vLLM also reads .bin, .pt and
            # new_embeddings files) never reaches vLLM
            if folder.is_symlink() or folder.is_file():
                folder.unlink()
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            os.symlink(weights, folder / ADAPTER_WEIGHTS)
            (folder / ADAPTER_CONFIG).write_text(json.dumps(dict(cfg, lora_alpha=float(cfg["lora_alpha"]) * s),
                                                            indent=2))
        names.append(name)
        paths.append(folder)
    return AdapterBank(version, scales, tuple(names), tuple(paths), int(cfg["r"]))


def max_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank``."""
    for allowed in (1, 8, 16, 32, 64, 128, 256, 320, 512):  # vllm.config.lora.MaxLoRARanks
        if rank <= allowed:
            return allowed
    raise ValueError(f"adapter rank {rank} exceeds vLLM's largest --max-lora-rank (512); retire old requests")
