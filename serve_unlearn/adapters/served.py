"""What a server loads from a registry: the newest served adapter and a gate over every ready request.

Servers poll ``registry.generation`` (one cheap query) and call these again when it moves, so a new forget
request takes effect without a restart. Every artifact is checked against the file manifest its request was
registered with before it is read (``ForgetRegistry.verified_path``); a served concatenation rebuilt after a
retire is compared with a fresh build from those verified adapters before it is served.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from ..errors import ArtifactError
from ..registry import ForgetRegistry, ForgetRequest
from ..registry.integrity import folder_manifest
from .gate import Gate, GateConfig
from .orthogonal_lora import adapter_requests, concat_adapters

logger = logging.getLogger(__name__)


def _ready(registry: ForgetRegistry, up_to_version: int | None) -> list[ForgetRequest]:
    """The ready requests a server reading the registry at generation ``up_to_version`` (None: now) serves."""
    return [r for r in registry.ready() if up_to_version is None or (r.version or 0) <= up_to_version]


def served_adapter(registry: ForgetRegistry, *, up_to_version: int | None = None) -> Path | None:
    """The adapter folder to serve for the ready requests (those with version <= ``up_to_version``, when given:
    what a server read at one registry generation); None without requests.

    That is the newest request's ``served`` artifact, unless an earlier request was retired since it was built:
    in ``per-request`` mode the rank-concatenation of the remaining requests' own adapters is then built once
    under ``<registry>/served/`` (a retired request must stop unlearning anything). A ``cumulative`` adapter
    carries every earlier request through its warm start and cannot drop one: that is logged.
    """
    ready = _ready(registry, up_to_version)
    if not ready:
        return None
    latest = ready[-1]
    try:
        path = registry.verified_path(latest, "served")
    except ArtifactError as exc:
        raise ArtifactError(f"request {latest.name!r} has no usable served adapter ({exc}); "
                            "register it again") from None
    built_from = adapter_requests(path)
    wanted = [r.name for r in ready]
    if built_from is None or built_from == wanted:
        return path
    if latest.config.get("lora", {}).get("mode") == "cumulative":
        logger.warning("request(s) %s were retired, but the cumulative adapter of %r was warm-started from them and "
                       "still carries them; file the later requests again (mode per-request avoids this)",
                       sorted(set(built_from) - set(wanted)), latest.name)
        return path
    return _concatenation(registry, ready)


def _concatenation(registry: ForgetRegistry, ready: list[ForgetRequest]) -> Path:
    """The rank-concatenation of ``ready``'s own (verified) adapters, shared under ``<registry>/served/`` by every
    process; what is there is served only if it equals a fresh build, file for file, else it is replaced."""
    key = hashlib.sha256(",".join(r.id for r in ready).encode()).hexdigest()[:16]
    out = Path(registry.root) / "served" / key
    tmp = out.with_name(f".{key}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    concat_adapters([registry.verified_path(r, "adapter") for r in ready], tmp)
    fresh = folder_manifest(tmp, ".")
    if out.is_dir() and not out.is_symlink():
        try:
            if folder_manifest(out, ".") == fresh:
                shutil.rmtree(tmp, ignore_errors=True)
                return out
        except ArtifactError:
            pass
        logger.warning("served adapter %s differs from a fresh build of its requests' adapters: replaced", out)
        stale = out.with_name(f".{key}.{os.getpid()}.stale")
        out.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    elif out.exists() or out.is_symlink():
        out.unlink()
    try:
        tmp.rename(out)
    except OSError:  # another process put its build there first; it is checked on the next load
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("served adapter rebuilt without retired requests: %s (%s)", out, [r.name for r in ready])
    return out


def load_gate(registry: ForgetRegistry, config: GateConfig | None = None, *,
              up_to_version: int | None = None) -> Gate:
    """A gate whose scorer runs every ready request's detector (those with version <= ``up_to_version``, when
    given: the requests inside a published bank) over one shared backbone."""
    from .detector import DetectorEnsemble

    ready = _ready(registry, up_to_version)
    if not ready:
        return Gate(lambda texts: None, [], config)
    ensemble = DetectorEnsemble.load([registry.verified_path(r, "detector") for r in ready])  # one backbone
    config = config or GateConfig()
    check_reach([r.name for r in ready], ensemble.detectors, config)
    return Gate(ensemble.weights, [r.name for r in ready], config)


def check_reach(names: list[str], detectors: list, config: GateConfig) -> None:
    """ArtifactError for a detector that could never give a prompt the gate's full scale (a damaged or
    degenerate calibration): loading it would quietly open the gate for its request."""
    for name, detector in zip(names, detectors):
        reach = detector.calibration.max_weight
        if reach < config.policy.full_scale_weight:
            raise ArtifactError(
                f"the detector of request {name!r} can give at most w={reach:.3f}, below the gate policy's "
                f"full-scale weight {config.policy.full_scale_weight}: it could never route a prompt to the "
                "adapter; its calibration is damaged or was trained with a tiny zeta: register the request again")


def load_guard_gate(registry: ForgetRegistry, guards: list[tuple[str, str, dict[str, str]]],
                    config: GateConfig | None = None) -> Gate:
    """A gate over the detectors of filings not yet in force (``(name, path relative to the registry root,
    file manifest)`` each), every file checked against its manifest first: the interim refusal of what they
    flag while their adapters train."""
    from ..registry.integrity import verify_tree
    from .detector import DetectorEnsemble

    if not guards:
        return Gate(lambda texts: None, [], config)
    for name, rel, files in guards:
        verify_tree(Path(registry.root), rel, files, f"the guard of forget request {name!r}")
    ensemble = DetectorEnsemble.load([Path(registry.root) / rel for _, rel, _ in guards])
    config = config or GateConfig()
    check_reach([name for name, _, _ in guards], ensemble.detectors, config)
    return Gate(ensemble.weights, [name for name, _, _ in guards], config)
