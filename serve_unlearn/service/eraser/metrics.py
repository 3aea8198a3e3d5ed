"""The eraser's Prometheus metrics, registered in the app's shared registry (served at ``/metrics``)."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_WINDOW_S = 60.0


class EraserMetrics:
    """Latency, queue depth, batch sizes, outcomes by status, images produced and images per second."""

    def __init__(self, registry: CollectorRegistry):
        self.latency = Histogram(
            "serve_unlearn_eraser_request_seconds", "Time from arrival to answer of erase requests, by status.",
            ["status"], registry=registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300))
        self.requests = Counter("serve_unlearn_eraser_requests", "Erase requests answered, by HTTP status.",
                                ["status"], registry=registry)
        self.queue_depth = Gauge("serve_unlearn_eraser_queue_depth", "Erase requests waiting for the pipeline.",
                                 registry=registry)
        self.batch_size = Histogram("serve_unlearn_eraser_batch_size", "Requests per pipeline call.",
                                    registry=registry, buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64))
        self.images = Counter("serve_unlearn_eraser_images", "Images the pipeline produced.", registry=registry)
        rate = Gauge("serve_unlearn_eraser_images_per_second", f"Images produced per second over the last "
                     f"{_WINDOW_S:g} s.", registry=registry)
        rate.set_function(self._rate)
        self._done: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def images_done(self, n: int) -> None:
        self.images.inc(n)
        with self._lock:
            self._done.append((time.monotonic(), n))

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._done and self._done[0][0] < now - _WINDOW_S:
                self._done.popleft()
            return sum(n for _, n in self._done) / _WINDOW_S

    def answered(self, status: int, seconds: float) -> None:
        self.requests.labels(str(status)).inc()
        self.latency.labels(str(status)).observe(seconds)
