"""The control plane's Prometheus metrics, in the app's own CollectorRegistry (``GET /metrics``).

Counts by status and the queue depth are read from the queue at scrape time, so every replica reports the
shared registry's truth; durations are observed when a filing reaches ``in_force``.
"""

from __future__ import annotations

from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from ..registry import ForgetQueue, Job

_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)


class QueueCollector:
    def __init__(self, queue: ForgetQueue):
        self.queue = queue

    def collect(self):
        counts = self.queue.counts()
        by_status = GaugeMetricFamily("serve_unlearn_forget_requests", "forget requests by status",
                                      labels=["status"])
        for status, n in counts.items():
            by_status.add_metric([status], n)
        yield by_status
        yield GaugeMetricFamily("serve_unlearn_queue_depth", "forget requests waiting for a worker",
                                value=counts["queued"])


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry, queue: ForgetQueue | None):
        self.hotload_failures = Counter("serve_unlearn_hotload_failures", "publications a server refused",
                                        registry=registry)
        self.training_seconds = Histogram("serve_unlearn_training_seconds", "claim to ready, per forget request",
                                          buckets=_BUCKETS, registry=registry)
        self.to_guard_seconds = Histogram("serve_unlearn_filing_to_guard_seconds",
                                          "filing to first enforcement (guarded)", buckets=_BUCKETS,
                                          registry=registry)
        self.to_in_force_seconds = Histogram("serve_unlearn_filing_to_in_force_seconds",
                                             "filing to in force on every server", buckets=_BUCKETS,
                                             registry=registry)
        if queue is not None:
            registry.register(QueueCollector(queue))

    def observe_in_force(self, job: Job) -> None:
        t = {k: datetime.fromisoformat(v) for k, v in job.timings.items() if isinstance(v, str)}
        in_force = t.get("in_force") or datetime.now(t["queued"].tzinfo)
        if "training" in t and "ready" in t:
            self.training_seconds.observe((t["ready"] - t["training"]).total_seconds())
        if "guarded" in t:
            self.to_guard_seconds.observe((t["guarded"] - t["queued"]).total_seconds())
        self.to_in_force_seconds.observe((in_force - t["queued"]).total_seconds())
