"""What ``--model-loader-extra-config`` tells the ``serve_unlearn`` load format, parsed without importing vLLM.

Our keys (``contract.PATCHES_KEY``, ``OVERLAP_KEY``, ``INNER_FORMAT_KEY``) are taken out and checked here, before
any patch file is read; every other key is passed on to vLLM's default loader as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...errors import UnlearnConfigError
from ...patches.apply import OVERLAPS, Overlap
from .contract import INNER_FORMAT_KEY, OVERLAP_KEY, PATCHES_KEY

__all__ = ["LoaderConfig", "parse_loader_config"]


@dataclass(frozen=True)
class LoaderConfig:
    patches: list[str]                 # patch files, stacked in order (empty: the base weights)
    overlap: Overlap = "last"          # how stacked ``replace`` patches resolve an element several edit
    inner_load_format: str = "safetensors"  # what vLLM's default loader reads
    rest: dict[str, Any] = field(default_factory=dict)  # passed to vLLM's default loader


def parse_loader_config(extra: Mapping[str, Any] | None) -> LoaderConfig:
    """Split ``--model-loader-extra-config`` into ours and vLLM's; UnlearnConfigError naming the key when one of
    ours has a value the loader cannot use."""
    rest = dict(extra or {})
    paths = rest.pop(PATCHES_KEY, [])
    overlap = rest.pop(OVERLAP_KEY, "last")
    inner_format = rest.pop(INNER_FORMAT_KEY, "safetensors")
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise UnlearnConfigError(
            f"--model-loader-extra-config {PATCHES_KEY!r} must be a list of patch file paths, got {paths!r}"
        )
    if overlap not in OVERLAPS:
        raise UnlearnConfigError(
            f"--model-loader-extra-config {OVERLAP_KEY!r} must be one of {', '.join(map(repr, OVERLAPS))}, got "
            f"{overlap!r}"
        )
    return LoaderConfig(list(paths), overlap, inner_format, rest)
