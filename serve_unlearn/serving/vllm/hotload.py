"""Put the registry's ready requests in force on a running vLLM server, without a restart or a dropped request.

Order: build the new version's bank → load every bucket into vLLM (``/v1/load_lora_adapter``; all or nothing) →
publish it (each middleware switches its routing within its poll interval) → wait until the middlewares route to
it and no request is in flight on the old version → unload the old version's adapters. New names per version mean
a request in flight keeps the adapter it started with, and no KV cache entry is reused across versions.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from ...adapters.served import served_adapter
from ...errors import ServerError
from ...registry import ForgetRegistry
from .bank import AdapterBank, build_bank
from .config import VllmServeConfig
from .contract import ADMIN_HEADER, ADMIN_TOKEN_ENV, STATUS_PATH, bank_dir
from .routing import publish, published_bank

logger = logging.getLogger(__name__)


@dataclass
class HotLoadReport:
    version: int
    load_s: float                   # loading the bank into vLLM
    switch_s: float                 # publish -> every polled middleware routes to it and the old version drained
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)


def call_server(url: str, method: str = "GET", payload: dict | None = None, api_key: str | None = None,
          timeout: float = 60.0) -> tuple[int, str]:
    """One request to the server, with vLLM's API key (when set) and the serve-unlearn admin token."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    if api_key:
        req.add_header("authorization", f"Bearer {api_key}")
    token = os.environ.get(ADMIN_TOKEN_ENV)
    if token:
        req.add_header(ADMIN_HEADER, token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        raise ServerError(f"cannot reach the vLLM server at {url}: {exc}") from exc


def load_into_server(registry: ForgetRegistry, server: str, config: VllmServeConfig | None = None, *,
                     api_key: str | None = None, drain_timeout_s: float = 60.0) -> HotLoadReport:
    """Load, publish and switch to what the registry serves now (its generation) on ``server``
    (e.g. http://host:8000)."""
    return load_into_servers(registry, [server], config, api_key=api_key, drain_timeout_s=drain_timeout_s)


def load_into_servers(registry: ForgetRegistry, servers: list[str], config: VllmServeConfig | None = None, *,
                      api_key: str | None = None, drain_timeout_s: float = 60.0) -> HotLoadReport:
    """Put the registry's generation in force on every server of a deployment, all or nothing: the bank is
    loaded into each server first; if one refuses, what was loaded is unloaded everywhere and nothing is
    published (ServerError). Then one publication switches every middleware, and the old version is unloaded
    from each server once it drained. With no ready request left, the publication routes to the base model."""
    config = config or VllmServeConfig()
    servers = [s.rstrip("/") for s in servers]
    generation = registry.generation  # bank names carry it: a retire changes what is served, too
    adapter = served_adapter(registry, up_to_version=generation)
    old = published_bank(registry)
    if old is not None and old.version == generation:
        return HotLoadReport(generation, 0.0, 0.0)
    bank = None if adapter is None else build_bank(adapter, bank_dir(registry), generation, config.bank.scales)
    t0 = time.perf_counter()
    loaded: dict[str, list[str]] = {s: [] for s in servers}
    for server in servers:
        for name, path in zip(bank.names, bank.paths) if bank else ():
            status, text = call_server(f"{server}/v1/load_lora_adapter", "POST",
                                 {"lora_name": name, "lora_path": str(path)}, api_key)
            if status != 200:
                for done_server, names in loaded.items():
                    _unload(done_server, names, api_key)
                hint = (f" Set ${ADMIN_TOKEN_ENV} here to the server's admin token." if status in (401, 403) else
                        " Start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (serve-unlearn vllm does) and "
                        "--enable-lora with --max-lora-rank >= the adapter's rank.")
                raise ServerError(f"{server} refused to load adapter {name!r} (HTTP {status}: "
                                  f"{text.strip()[:300]}); nothing was switched on any server." + hint)
            loaded[server].append(name)
    load_s = time.perf_counter() - t0
    publish(registry, bank)
    t1 = time.perf_counter()
    for server in servers:
        _wait_for_switch(server, generation if bank else None, old, api_key, drain_timeout_s)
    switch_s = time.perf_counter() - t1
    unloaded = [n for server in servers for n in _unload(server, list(old.names) if old else [], api_key)]
    logger.info("version %s in force on %s (load %.2fs, switch %.2fs)", generation, servers, load_s, switch_s)
    return HotLoadReport(generation, load_s, switch_s, [n for names in loaded.values() for n in names], unloaded)


def _wait_for_switch(server: str, version: int | None, old: AdapterBank | None, api_key: str | None,
                     timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status, text = call_server(f"{server}{STATUS_PATH}", api_key=api_key)
        if status == 200:
            s = json.loads(text)
            drained = old is None or not s.get("inflight", {}).get(str(old.version))
            if s.get("version") == version and drained:
                return
        elif status in (401, 403):
            raise ServerError(f"{server} refused the status page (HTTP {status}); set ${ADMIN_TOKEN_ENV} here to "
                              "the server's admin token")
        elif status == 404:
            raise ServerError(f"{server} has no serve-unlearn middleware ({STATUS_PATH} is 404); launch it with "
                              "`serve-unlearn vllm` or --middleware serve_unlearn.serving.vllm.O3Middleware")
        if time.monotonic() > deadline:
            logger.warning("version %s: the middleware of %s did not confirm the switch within %.0fs; unloading "
                           "the old version anyway", version, server, timeout_s)
            return
        time.sleep(0.2)


def _unload(server: str, names: list[str], api_key: str | None) -> list[str]:
    done = []
    for name in names:
        status, text = call_server(f"{server}/v1/unload_lora_adapter", "POST", {"lora_name": name}, api_key)
        if status == 200:
            done.append(name)
        else:
            logger.warning("could not unload %s (HTTP %s: %s)", name, status, text.strip()[:200])
    return done
