"""``create_app(config)``: the service's FastAPI app, the control plane and/or object removal in one process.

The lifespan starts what the config asks for (training workers, a launched vLLM server, the publisher loop, the
eraser pipeline) and stops all of it on shutdown. ``/healthz`` is liveness, ``/readyz`` readiness (registry
reachable, workers up, every vLLM server on the published version, the eraser warmed), ``/metrics`` Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .auth import AdminAuth
from .config import ServeConfig
from .errors import install_error_handlers

logger = logging.getLogger(__name__)


class ControlPlane:
    """The forget-request side of the app: registry, queue, publisher, workers."""

    def __init__(self, config: ServeConfig, metrics_registry: CollectorRegistry):
        from ..adapters.gate import GateConfig
        from ..registry import ForgetQueue, ForgetRegistry
        from ..serving.vllm.config import VllmServeConfig
        from .metrics import ServiceMetrics
        from .publisher import Publisher
        from .supervisor import Supervisor

        self.config = config
        self.registry = ForgetRegistry(config.registry, database=config.registry_database)
        self.queue = ForgetQueue(self.registry, lease_ttl=config.worker.lease_ttl_s)
        self.metrics = ServiceMetrics(metrics_registry, self.queue)
        self.supervisor = Supervisor(config)
        self.vllm_config = VllmServeConfig.load(config.vllm.config)
        self.gate_config: GateConfig = self.vllm_config.gate
        servers = list(config.vllm.servers)
        if config.vllm.launch:
            servers.append(f"http://{self.vllm_config.host}:{self.vllm_config.port}")
        self.publisher = Publisher(self.registry, self.queue, servers, self.vllm_config, self.metrics,
                                   api_key=os.environ.get(config.vllm.api_key_env) or None,
                                   drain_timeout_s=config.vllm.drain_timeout_s)
        self._gate = None
        self._gate_generation: int | None = None
        self._task: asyncio.Task | None = None

    def gate(self):
        """The gate over the requests in force (rebuilt when the registry's generation moves)."""
        from ..adapters.served import load_gate

        generation = self.registry.generation
        if self._gate is None or generation != self._gate_generation:
            old, self._gate = self._gate, load_gate(self.registry, self.gate_config)
            self._gate_generation = generation
            if old is not None:
                old.close()
        return self._gate

    async def start(self) -> None:
        self.supervisor.start()
        if self.config.vllm.launch:
            await asyncio.to_thread(self.supervisor.wait_for_vllm)
        self._task = asyncio.get_running_loop().create_task(self._publish_loop())

    async def _publish_loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.publisher.step)
            except Exception:  # the loop must outlive a bad step; /readyz reports it
                logger.exception("publishing failed; retrying")
            await asyncio.sleep(self.config.publish_poll_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self.supervisor.stop)
        if self._gate is not None:
            self._gate.close()

    def readiness(self) -> dict[str, str]:
        checks: dict[str, str] = {}
        try:
            self.queue.counts()
            checks["registry"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["registry"] = f"unreachable: {exc}"
        if self.config.worker.processes:
            alive = self.supervisor.workers_alive()
            checks["workers"] = "ok" if alive else f"{alive}/{self.config.worker.processes} worker(s) running"
        checks.update(self.publisher.servers_health())
        return checks


def create_app(config: ServeConfig) -> FastAPI:
    metrics_registry = CollectorRegistry()
    control = ControlPlane(config, metrics_registry) if config.forgets else None
    eraser = None
    if config.eraser is not None:
        from .eraser import EraserService

        eraser = EraserService(config.eraser, metrics_registry)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        started = []
        try:
            for part in (control, eraser):
                if part is not None:
                    await part.start()
                    started.append(part)
            yield
        finally:
            for part in reversed(started):
                await part.stop()

    app = FastAPI(title="serve-unlearn", version="1", lifespan=lifespan,
                  description="Forget requests for a vLLM deployment, and object removal.")
    install_error_handlers(app)
    app.state.control = control
    app.state.eraser = eraser

    @app.get("/healthz", tags=["ops"])
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz():
        checks: dict[str, str] = {}
        if control is not None:
            checks.update(await asyncio.to_thread(control.readiness))
        if eraser is not None:
            ok, why = eraser.ready()
            checks["eraser"] = "ok" if ok else why
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["ops"])
    async def metrics():
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    if control is not None:
        from .forget_api import build_router

        auth = AdminAuth(config.admin_token_env)
        app.include_router(build_router(control.queue, control.publisher, config, auth, control.gate))

        @app.get("/", response_class=HTMLResponse, include_in_schema=False)
        async def page():
            return resources.files("serve_unlearn.service").joinpath("web/index.html").read_text()

    if eraser is not None:
        app.include_router(eraser.router)
    return app
