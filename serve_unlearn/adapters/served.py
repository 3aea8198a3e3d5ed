"""What a server loads from a registry: the newest served adapter and a gate over every ready request.

Servers poll ``registry.generation`` (one cheap query) and call these again when it moves, so a new forget
request takes effect without a restart.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ArtifactError
from .gate import Gate, GateConfig
from .registry import ForgetRegistry


def served_adapter(registry: ForgetRegistry) -> Path | None:
    """The adapter folder to serve now (the newest ready request's ``served`` artifact); None without requests."""
    latest = registry.latest()
    if latest is None:
        return None
    try:
        return registry.artifact_path(latest, "served")
    except ArtifactError as exc:
        raise ArtifactError(f"request {latest.name!r} has no usable served adapter ({exc}); "
                            "register it again") from None


def load_gate(registry: ForgetRegistry, config: GateConfig | None = None, *,
              up_to_version: int | None = None) -> Gate:
    """A gate whose scorer runs every ready request's detector (those with version <= ``up_to_version``, when
    given: the requests inside a published bank) over one shared backbone."""
    from .detector import DetectorEnsemble

    ready = [r for r in registry.ready() if up_to_version is None or (r.version or 0) <= up_to_version]
    if not ready:
        return Gate(lambda texts: None, [], config)
    ensemble = DetectorEnsemble.load([registry.artifact_path(r, "detector") for r in ready])  # one backbone
    return Gate(ensemble.weights, [r.name for r in ready], config)
