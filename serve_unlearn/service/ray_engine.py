"""``serve-unlearn serve --engine ray``: the same app (``create_app``) on Ray Serve replicas, for object removal.

Each replica runs the whole app for the config's ``eraser:`` section with its own pipeline; Ray Serve routes
requests between replicas (``eraser.ray``: ``num_replicas`` or an ``autoscaling`` config, CPUs/GPUs per replica)
and batching inside a replica is Ray Serve's own ``@serve.batch`` (``max_batch_size``, ``batch_wait_ms``), grouped
by the same compatibility key as the embedded server. Every answer names its replica in ``X-Replica``.
``/metrics`` is per replica. The control plane (``registry``/``model``) is not replicated: run it embedded.

    serve-unlearn serve --config serve.yaml --engine ray --port 8000
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from ..errors import UnlearnConfigError
from .config import ServeConfig
from .eraser.batcher import deadline_error
from .eraser.requests import Job
from .errors import ApiError

logger = logging.getLogger(__name__)
APP_NAME = "serve-unlearn"


class RayServeBatcher:
    """The eraser's batcher inside a Ray Serve replica: ``@serve.batch`` collects requests, each collected batch
    runs as one pipeline call per compatibility key. Same interface as the embedded ``DynamicBatcher``."""

    def __init__(self, engine, config, metrics):
        self.engine, self.config, self.metrics = engine, config, metrics
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="eraser-pipeline")
        self._inflight = self._running = 0
        self._batched.set_max_batch_size(config.max_batch_size)
        self._batched.set_batch_wait_timeout_s(config.batch_wait_ms / 1000)

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def depth(self) -> int:
        return self._inflight - self._running

    async def submit(self, job: Job):
        loop = asyncio.get_running_loop()
        if self.depth >= self.config.max_queue:
            raise ApiError(429, f"the erase queue of this replica is full ({self.config.max_queue} waiting); retry "
                           "in 1 s", "RateLimitError", "queue_full", headers={"Retry-After": "1"})
        job.future = loop.create_future()  # cancelled at the deadline: a batch whose jobs all are stops early
        self._inflight += 1
        self.metrics.queue_depth.set(self.depth)
        try:
            result = await asyncio.wait_for(self._batched(job), max(0.0, job.deadline - loop.time()))
        except TimeoutError:
            raise deadline_error(self.config.timeout_s) from None
        finally:
            job.future.cancel()
            self._inflight -= 1
            self.metrics.queue_depth.set(self.depth)
        if isinstance(result, Exception):  # serve.batch hands results through as values
            raise result
        return result

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)  # set per config in __init__
    async def _batched(self, jobs: list[Job]) -> list:
        loop = asyncio.get_running_loop()
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.key, []).append(job)
        results: dict[int, tuple] = {}
        self._running += len(jobs)
        try:
            for group in groups.values():
                self.metrics.batch_size.observe(len(group))
                try:
                    out = await loop.run_in_executor(self._executor, self.engine.run_batch, group,
                                                     lambda g=group: all(j.future.done() for j in g))
                except Exception as exc:  # the group's callers get the error; the replica goes on
                    logger.exception("an erase batch of %d failed", len(group))
                    out = [exc] * len(group)
                else:
                    self.metrics.images_done(len(group))
                for job, result in zip(group, out):
                    results[id(job)] = result if isinstance(result, Exception) else (result, len(group))
        finally:
            self._running -= len(jobs)
        return [results[id(j)] for j in jobs]


@serve.ingress()
class EraserReplica:
    """One Ray Serve replica: ``create_app`` for the eraser config, batching with ``@serve.batch``."""

    def __init__(self, config: dict):
        self.config = ServeConfig.model_validate(config)

    def __serve_build_asgi_app__(self):
        from .app import create_app
        from .eraser import EraserService

        EraserService.batcher_factory = RayServeBatcher  # this replica's process only
        app = create_app(self.config)
        replica = serve.get_replica_context().replica_id.unique_id

        @app.middleware("http")
        async def name_the_replica(request, call_next):
            response = await call_next(request)
            response.headers["X-Replica"] = replica
            return response

        return app


def deployment_for(config: ServeConfig):
    """The bound Ray Serve application for ``config`` (its ``eraser.ray`` options applied)."""
    if config.eraser is None:
        raise UnlearnConfigError("--engine ray serves object removal: the config needs an `eraser:` section")
    if config.forgets:
        raise UnlearnConfigError("--engine ray replicates object removal only: run the control plane (`registry`, "
                                 "`model`) with the embedded engine, from a config without `eraser:`")
    rc = config.eraser.ray
    options = {"ray_actor_options": {"num_cpus": rc.num_cpus, "num_gpus": rc.num_gpus},
               "max_ongoing_requests": rc.max_ongoing_requests}
    if rc.autoscaling:
        options["autoscaling_config"] = rc.autoscaling
    else:
        options["num_replicas"] = rc.num_replicas
    return serve.deployment(EraserReplica, name="eraser").options(**options).bind(config.model_dump(mode="json"))


def run_on_ray(config: ServeConfig, host: str, port: int, *, blocking: bool = True):
    """Deploy the app on Ray Serve at http://host:port/ (a local Ray unless ``eraser.ray.ray_address``); returns the
    app's handle when not ``blocking``, else serves until interrupted and shuts Serve down."""
    import ray

    app = deployment_for(config)
    if not ray.is_initialized():
        ray.init(address=config.eraser.ray.ray_address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    logger.info("object removal on Ray Serve at http://%s:%d/", host, port)
    if not blocking:
        return handle
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return None
