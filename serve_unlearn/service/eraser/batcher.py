"""Dynamic batching for the embedded server: a bounded queue in front of one pipeline thread.

The oldest waiting job opens a batch; jobs with the same ``batch_key`` join it, up to ``max_batch_size``, for at
most ``batch_wait_ms`` after the opener arrived (jobs that arrive while a batch runs are batched at once). Jobs of
other keys wait for a later batch, in arrival order. A full queue answers 429 with ``Retry-After``; a job past its
deadline answers 504, leaves the queue, and a running batch whose callers have all gone stops at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import ApiError
from .metrics import EraserMetrics
from .requests import Job

logger = logging.getLogger(__name__)

RunBatch = Callable[[list[Job], Callable[[], bool]], list[np.ndarray]]


def deadline_error(timeout_s: float) -> ApiError:
    return ApiError(504, f"the erase did not finish within this server's {timeout_s:g} s deadline; retry later or with "
                    "fewer steps or pixels", "GatewayTimeout", "deadline_exceeded")


class DynamicBatcher:
    """Bounded queue + batching loop; ``submit`` returns the job's (h, w, 3) uint8 result and the batch size."""

    def __init__(self, run_batch: RunBatch, *, max_batch_size: int, batch_wait_ms: float, max_queue: int,
                 timeout_s: float, metrics: EraserMetrics):
        self._run_batch = run_batch
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_ms / 1000
        self.max_queue, self.timeout_s = max_queue, timeout_s
        self.metrics = metrics
        self._pending: deque[Job] = deque()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="eraser-pipeline")
        self._task: asyncio.Task | None = None
        self._batch_seconds = 0.0  # moving average of one pipeline call, for Retry-After
        self.running = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(ApiError(503, "the server is shutting down", "ServiceUnavailable",
                                                  "shutting_down"))
        self._pending.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    @property
    def depth(self) -> int:
        return len(self._pending)

    def retry_after(self) -> int:
        """Seconds until the queue has likely room again (at least 1)."""
        batches = math.ceil((len(self._pending) + 1) / self.max_batch_size) + (1 if self.running else 0)
        return max(1, math.ceil(batches * (self._batch_seconds or 1.0)))

    async def submit(self, job: Job) -> tuple[np.ndarray, int]:
        loop = asyncio.get_running_loop()
        if len(self._pending) >= self.max_queue:
            retry = self.retry_after()
            raise ApiError(429, f"the erase queue is full ({self.max_queue} waiting); retry in {retry} s",
                           "RateLimitError", "queue_full", headers={"Retry-After": str(retry)})
        job.future = loop.create_future()
        job.enqueued = loop.time()
        self._pending.append(job)
        self.metrics.queue_depth.set(len(self._pending))
        self._wake.set()
        try:
            return await asyncio.wait_for(job.future, max(0.0, job.deadline - loop.time()))
        except TimeoutError:
            raise deadline_error(self.timeout_s) from None
        finally:
            if job in self._pending:  # expired while waiting: its slot is freed now
                self._pending.remove(job)
                self.metrics.queue_depth.set(len(self._pending))

    def _take_batch(self, now: float) -> tuple[list[Job], float]:
        """The batch the oldest job opens, and how long it may still wait for companions (0: run now)."""
        first = self._pending[0]
        batch = [j for j in self._pending if j.key == first.key][: self.max_batch_size]
        remaining = first.enqueued + self.batch_wait_s - now
        return batch, (0.0 if len(batch) >= self.max_batch_size else max(0.0, remaining))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            batch, wait = self._take_batch(loop.time())
            if wait > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue  # re-read the queue: companions arrived, the opener expired, or the wait is over
            for job in batch:
                self._pending.remove(job)
            self.metrics.queue_depth.set(len(self._pending))
            live = [j for j in batch if not j.future.done()]
            if live:
                await self._run(live, loop)

    async def _run(self, jobs: list[Job], loop: asyncio.AbstractEventLoop) -> None:
        start = time.perf_counter()
        self.running = len(jobs)
        self.metrics.batch_size.observe(len(jobs))
        try:
            results = await loop.run_in_executor(self._executor, self._run_batch, jobs,
                                                 lambda: all(j.future.done() for j in jobs))
        except Exception as exc:  # one bad batch must not stop the loop; its callers get the error
            logger.exception("an erase batch of %d failed", len(jobs))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        finally:
            self.running = 0
            took = time.perf_counter() - start
            self._batch_seconds = took if not self._batch_seconds else 0.7 * self._batch_seconds + 0.3 * took
        self.metrics.images_done(len(jobs))
        for job, result in zip(jobs, results):
            if not job.future.done():
                job.future.set_result((result, len(jobs)))
