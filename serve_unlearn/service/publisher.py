"""Putting filings in force, and out of force, on every server of the deployment.

Workers only train; the publisher (a thread of the API process) moves ``ready`` filings to ``in_force`` with the
existing hot-load path (bank, load on every server, publish, switch, drain, unload), all or nothing across
servers: when one server refuses, nothing is switched anywhere, the filings of that attempt are taken out of the
registry again and marked ``failed`` with the reason. Retiring takes the request out of the registry and puts
the remaining ones in force the same way. SalUn/IAU filings are weight patches, applied and reverted live on
every server and reconciled with each server on every poll (``patch_jobs.LivePatches``). One publication at a
time per registry (a lock file beside the registry), so two API replicas never interleave their switches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading

from ..errors import ConflictError, ServerError, ServeUnlearnError
from ..registry import ForgetQueue, ForgetRegistry, Job
from ..serving.vllm.config import VllmServeConfig
from ..serving.vllm.contract import STATUS_PATH
from ..serving.vllm.hotload import call_server, load_into_servers
from ..serving.vllm.routing import published_bank
from .metrics import ServiceMetrics
from .patch_jobs import PATCH_METHODS, LivePatches

logger = logging.getLogger(__name__)


def publication_lock(registry: ForgetRegistry):
    """Held while one process changes what the servers route to (every replica sharing the registry)."""
    return registry.exclusive("publish")


class Publisher:
    def __init__(self, registry: ForgetRegistry, queue: ForgetQueue, servers: list[str],
                 vllm_config: VllmServeConfig, metrics: ServiceMetrics, *, api_key: str | None = None,
                 drain_timeout_s: float = 60.0):
        self.metrics = metrics
        self.registry, self.queue, self.servers = registry, queue, list(servers)
        self.vllm_config, self.api_key, self.drain_timeout_s = vllm_config, api_key, drain_timeout_s
        self.last_error: str | None = None
        self._local = threading.Lock()
        self.patches = LivePatches(registry, queue, self.servers, api_key=api_key)

    def _load(self) -> None:
        if self.servers:
            report = load_into_servers(self.registry, self.servers, self.vllm_config, api_key=self.api_key,
                                       drain_timeout_s=self.drain_timeout_s)
            logger.info("generation %s in force on %d server(s)", report.version, len(self.servers))

    def step(self) -> list[str]:
        """Put every ready filing in force (and keep the in-force patches on every server); the ids moved to
        ``in_force``."""
        ready = self.queue.list("ready")
        moved = []
        if any(j.method not in PATCH_METHODS for j in ready) or self._behind():
            moved += self._step_o3()
        if any(j.method in PATCH_METHODS for j in ready) or (self.servers and (
                self.patches.dirty or self.patches.errors or self.patches.in_force())):
            moved += self._step_patches()
        return moved

    def _step_patches(self) -> list[str]:
        moved = []
        with self._local, publication_lock(self.registry):
            if self.servers:
                self.patches.reconcile()
            for job in [j for j in self.queue.list("ready") if j.method in PATCH_METHODS]:
                try:
                    if self.servers:
                        self.patches.put_in_force(job)
                except ServeUnlearnError as exc:
                    self.metrics.hotload_failures.inc()
                    self.queue.move(job.id, "failed", expect=("ready",), error=f"not put in force: {exc}")
                    continue
                if self.queue.move(job.id, "in_force", expect=("ready",)):
                    moved.append(job.id)
                    self.metrics.observe_in_force(self.queue.get(job.id))
                else:
                    self.patches.dirty = True  # retired meanwhile: the next reconcile reverts it
        return moved

    def _step_o3(self) -> list[str]:
        with self._local, publication_lock(self.registry):
            ready = [j for j in self.queue.list("ready") if j.method not in PATCH_METHODS]
            try:
                self._load()
            except ServerError as exc:
                self.last_error = str(exc)
                for job in ready:
                    self._take_out(job, f"not put in force: {exc}")
                self.metrics.hotload_failures.inc()
                return []
            self.last_error = None
            moved = [j.id for j in ready if self.queue.move(j.id, "in_force", expect=("ready",))]
            for job_id in moved:
                self.metrics.observe_in_force(self.queue.get(job_id))
            return moved

    def _behind(self) -> bool:
        """The servers route an older generation than the registry's (a retire whose switch failed)."""
        if not self.servers:
            return False
        bank = published_bank(self.registry)
        return (bank.version if bank else None) != (self.registry.generation if self.registry.ready() else None)

    def _take_out(self, job: Job, error: str) -> None:
        request_id = job.result.get("request_id")
        if request_id:
            with contextlib.suppress(ServeUnlearnError):
                self.registry.retire(request_id)
        self.queue.move(job.id, "failed", expect=("ready",), result={"guard": None}, error=error)

    def retire(self, job_id: str) -> Job:
        """Take a filing out of force everywhere (its record stays); a queued or training one stops."""
        job = self.queue.get(job_id)
        if job.status in ("retired", "failed"):
            raise ConflictError(f"forget request {job.name!r} is already {job.status}")
        if job.method in PATCH_METHODS:
            return self._retire_patch(job)
        with self._local, publication_lock(self.registry):
            job = self.queue.get(job_id)
            if job.status in ("ready", "in_force"):
                request_id = job.result.get("request_id")
                if request_id and self.registry.get(request_id).status == "ready":
                    self.registry.retire(request_id)
                self._load()  # a ServerError here: the registry has it retired; step() retries the switch
            if not self.queue.move(job_id, "retired", expect=("queued", "training", "guarded", "ready",
                                                              "in_force"), result={"guard": None}):
                raise ConflictError(f"forget request {job.name!r} changed status meanwhile; try again")
        return self.queue.get(job_id)

    def _retire_patch(self, job: Job) -> Job:
        """Out of the registry's in-force patches, then reverted on every server (ServerError naming those that
        did not take the revert: the record says retired, and every poll retries them)."""
        with self._local, publication_lock(self.registry):
            if not self.queue.move(job.id, "retired", expect=("queued", "training", "guarded", "ready", "in_force"),
                                   result={"guard": None}):
                raise ConflictError(f"forget request {job.name!r} changed status meanwhile; try again")
            if self.servers:
                self.patches.reconcile()
            if self.patches.errors:
                raise ServerError(f"forget request {job.name!r} is retired, but its patch is not yet reverted on "
                                  f"every server ({'; '.join(f'{s}: {e}' for s, e in self.patches.errors.items())}); "
                                  "the service retries on every poll")
        return self.queue.get(job.id)

    def servers_health(self) -> dict[str, str]:
        """Per server: ``ok``, or why it is not ready (unreachable, no middleware, not on the published version)."""
        bank = published_bank(self.registry)
        want = bank.version if bank else None
        out = {}
        for server in self.servers:
            try:
                status, text = call_server(f"{server.rstrip('/')}{STATUS_PATH}", api_key=self.api_key, timeout=3)
            except ServerError as exc:
                out[server] = str(exc)
                continue
            if status != 200:
                out[server] = f"status page answered HTTP {status}"
                continue
            version = json.loads(text).get("version")
            out[server] = "ok" if version == want else f"routes version {version}, published is {want}"
            if out[server] == "ok" and server.rstrip("/") in self.patches.errors:
                out[server] = f"patches: {self.patches.errors[server.rstrip('/')]}"
        if self.last_error:
            out["publication"] = self.last_error
        return out
