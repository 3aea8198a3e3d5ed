"""The middleware's Prometheus metrics, served by vLLM's own ``/metrics``.

They live in prometheus-client's default registry, which vLLM's ``/metrics`` serves with one API server; with
several (``--api-server-count``), vLLM sets ``PROMETHEUS_MULTIPROC_DIR`` before the API-server processes start and
serves the merged files, so every metric here is multi-process safe (gauges say how processes combine).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DECISIONS = Counter(
    "serve_unlearn_gate_decisions", "Gated requests by outcome: base, adapter, failed_closed, failed_open, "
    "refused (a route or name the gate does not serve), unavailable (no usable registry: 503), invalid (4xx).",
    ["outcome", "route"])
MANAGEMENT = Counter("serve_unlearn_management_requests", "Admin-only routes by result (allowed, forbidden).",
                     ["result"])
WEIGHT = Histogram("serve_unlearn_gate_weight", "Gate weight of scored requests (max over forget requests and "
                   "windows).", buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0))
LATENCY = Histogram("serve_unlearn_gate_latency_seconds", "Time the gate added before a request reached vLLM.",
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
INFLIGHT = Gauge("serve_unlearn_requests_in_flight", "Gated requests in flight, by bank version.", ["version"],
                 multiprocess_mode="livesum")
GENERATION = Gauge("serve_unlearn_routed_generation", "Registry generation of the bank this process routes to "
                   "(-1: none).", multiprocess_mode="livemax")
IN_FORCE = Gauge("serve_unlearn_requests_in_force", "Forget requests whose detectors this process runs.",
                 multiprocess_mode="livemax")
REGISTRY_UP = Gauge("serve_unlearn_registry_up", "1 when this process has a usable registry and routing, else 0 "
                    "(gated requests get 503).", multiprocess_mode="livemin")
SWITCHES = Counter("serve_unlearn_hotload_switches", "Switches of the routing to a newly published version.")
SWITCH_FAILURES = Counter("serve_unlearn_hotload_failures", "Published versions that failed to load or verify "
                          "(the previous version stays routed).")
