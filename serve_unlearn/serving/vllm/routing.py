"""What the middleware routes to: one *published* bank version and the gate over the requests it contains.

A forget request becomes *ready* in the registry when training ends, but a server can route to it only after its
adapters are loaded into vLLM. So routing follows a separate pointer, the publication (registry meta key
``vllm.published``), written by whoever loaded the bank: the launcher at start, ``o3 forget --server`` after a
hot load. Every API-server process and every replica reads the same pointer from the shared registry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ...adapters.gate import Gate, GateConfig
from ...adapters.served import load_gate, served_adapter
from ...errors import RegistryError
from ...registry import ForgetRegistry
from .bank import AdapterBank

PUBLISHED_KEY = "vllm.published"


def publish(registry: ForgetRegistry, bank: AdapterBank | None) -> None:
    """Point every middleware at ``bank`` (None: no adapters, every prompt goes to the base model)."""
    value = None if bank is None else {"version": bank.version, "scales": list(bank.scales),
                                       "names": list(bank.names), "paths": [str(p) for p in bank.paths],
                                       "rank": bank.rank}
    registry.set_meta(PUBLISHED_KEY, json.dumps(value))


def published_bank(registry: ForgetRegistry) -> AdapterBank | None:
    raw = registry.get_meta(PUBLISHED_KEY)
    if raw is None:
        return None
    try:
        v = json.loads(raw)
        if v is None:
            return None
        return AdapterBank(int(v["version"]), tuple(v["scales"]), tuple(v["names"]),
                           tuple(Path(p) for p in v["paths"]), int(v["rank"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"the registry's {PUBLISHED_KEY!r} entry is corrupt ({exc}); re-publish with "
                            "`serve-unlearn vllm` or `serve-unlearn o3 forget --server`") from exc


@dataclass(frozen=True)
class Routing:
    bank: AdapterBank | None
    gate: Gate

    @property
    def version(self) -> int | None:
        return None if self.bank is None else self.bank.version


def load_routing(registry: ForgetRegistry, gate_config: GateConfig) -> Routing:
    """The published bank with a gate over exactly the requests it was built from (its version is the registry
    generation it was built at). Both the detectors and the adapter the bank serves are verified against their
    registered manifests first: a version whose artifacts changed on disk is not routed (ArtifactError)."""
    bank = published_bank(registry)
    if bank is None:
        return Routing(None, Gate(lambda texts: None, [], gate_config))
    served_adapter(registry, up_to_version=bank.version)
    return Routing(bank, load_gate(registry, gate_config, up_to_version=bank.version))
