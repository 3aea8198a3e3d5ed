"""``vllm serve --middleware serve_unlearn.serving.vllm.O3Middleware``: every route gated, managed or refused.

Pure ASGI (no ``BaseHTTPMiddleware``), so streamed responses stream. The running app's routes are put in classes
(``routes``): a *gated* route's JSON body is read whole (bounded), every text the model will read is scored by the
gate (off the event loop), and ``model`` is rewritten to the bank adapter for the applied scale, or left on the
base model; responses carry ``x-serve-unlearn-weight``, ``-scale``, ``-adapter`` and ``-generation``. *Admin*
routes (adapter and engine management, the status page) need the admin token; unknown routes that take a body
are refused. Every decision is counted in vLLM's ``/metrics`` and written to the audit log.

Faults fail closed: a body the gate cannot read (token ids, embeddings, a stored earlier response) or a detector
error or timeout routes to the full-scale adapter; without a usable registry gated requests get 503 (the process
keeps retrying, and never creates a registry); a newly published version that fails to load is not routed (the
previous one stays); malformed bodies get 4xx from here, never 5xx.

Settings: ``$SERVE_UNLEARN_REGISTRY`` (the registry folder, required) and ``$SERVE_UNLEARN_CONFIG`` (a YAML
``VllmServeConfig``, optional); tests pass ``registry``, ``config`` and ``routing`` directly.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import time
import uuid

from ...adapters.gate import GateDecision
from ...registry import ForgetRegistry
from . import metrics
from .asgi import BodyTooLarge, error_body, header, read_body, replay, respond_json, route_path, with_body
from .audit import AuditLog
from .bank import NAME_PREFIX
from .config import VllmServeConfig
from .contract import ADMIN_HEADER, CONFIG_ENV, PATCHES_PATH, REGISTRY_ENV, SERVED_MODELS_ENV, STATUS_PATH
from .guard import GUARD_HEADER, Guards, refusal
from .request_text import Unscorable, request_segments
from .routes import RouteClass, RouteTable
from .routing import Routing, load_routing, published_bank

logger = logging.getLogger("serve_unlearn.middleware")
# SageMaker's routes copy an adapter name from these headers into the body after this middleware has routed it
_ADAPTER_HEADERS = (b"x-amzn-sagemaker-adapter",)


def _log_to_stderr() -> None:
    """vLLM configures only its own loggers: give serve-unlearn's a handler in the API server, so the route
    table, version switches and (by default) the audit lines reach the server log."""
    package = logging.getLogger("serve_unlearn")
    if not package.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("(APIServer pid=%(process)d) %(levelname)s %(asctime)s [%(name)s] "
                                               "%(message)s", "%m-%d %H:%M:%S"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)


class O3Middleware:
    def __init__(self, app, registry: ForgetRegistry | None = None, config: VllmServeConfig | None = None,
                 routing: Routing | None = None):
        _log_to_stderr()
        self.app = app
        self.config = config or VllmServeConfig.load(os.environ.get(CONFIG_ENV))
        token = os.environ.get(self.config.admin_token_env) or ""
        self.admin_token = token.encode() if token else None
        self.registry = registry
        self.routing = routing
        self.error: str | None = None
        self.alert: str | None = None  # the last published version that could not be loaded
        self.table: RouteTable | None = None
        self._inflight: dict[int | None, int] = {}
        self.audit = AuditLog(self.config.audit)
        self.guards = Guards(self.config.guard, self.config.gate)
        self.models = self._model_names()
        self._next_poll = 0.0 if routing is None else math.inf  # a routing given by the caller is kept
        self._reload_task: asyncio.Task | None = None
        self._poller: asyncio.Task | None = None
        if self.config.gate_threads:
            import torch

            torch.set_num_threads(self.config.gate_threads)
        if routing is None:
            self._load_initial()
        self._publish_state()

    def _model_names(self) -> set[str] | None:
        """The model names a non-admin client may name; None when the served names are not known."""
        served = json.loads(os.environ.get(SERVED_MODELS_ENV) or "[]")
        if self.config.served_model_name:
            served.append(self.config.served_model_name)
        return {*served, *self.config.allowed_models} if served else None

    # -- registry and version switching -----------------------------------------------------------------------
    def _open_registry(self) -> ForgetRegistry:
        if self.registry is None:
            root = os.environ.get(REGISTRY_ENV)
            if not root:
                raise ValueError(f"set {REGISTRY_ENV} to the forget-request registry folder")
            self.registry = ForgetRegistry(root, create=False, database=self.config.registry_database)
        return self.registry

    def _load_initial(self) -> None:
        try:
            self.routing = load_routing(self._open_registry(), self.config.gate)
            self.guards.refresh(self.registry)
            self.error = None
            logger.info("serve-unlearn middleware: routing to bank version %s", self.routing.version)
        except Exception as exc:  # noqa: BLE001 - the server must come up and report, not crash
            self.error = f"{type(exc).__name__}: {exc}"
            logger.error("serve-unlearn middleware cannot load its registry (gated requests get 503 until it "
                         "can): %s", self.error)

    def _publish_state(self) -> None:
        routing = self.routing
        metrics.REGISTRY_UP.set(0 if routing is None else 1)
        metrics.GENERATION.set(-1 if routing is None or routing.version is None else routing.version)
        metrics.IN_FORCE.set(0 if routing is None else len(routing.gate.request_names))

    def _start_poller(self) -> None:
        """Poll the registry every ``poll_interval_s`` in the server's event loop, traffic or not, so a new guard
        or version is loaded before the next request that needs it (without lifespan, requests trigger polls)."""
        if self._poller is None and math.isfinite(self._next_poll):
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s or 0.05)
            if self._reload_task is None:
                try:
                    await self._reload()
                except Exception:
                    logger.exception("serve-unlearn: polling the registry failed")

    async def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self._poller is not None or self._reload_task is not None or now < self._next_poll:
            return
        self._next_poll = now + self.config.poll_interval_s
        self._reload_task = asyncio.get_running_loop().create_task(self._reload())
        self._reload_task.add_done_callback(self._reload_done)

    def _reload_done(self, _task: asyncio.Task) -> None:
        self._reload_task = None

    async def _reload(self) -> None:
        loop = asyncio.get_running_loop()
        if self.routing is None:
            await loop.run_in_executor(None, self._load_initial)
            self._publish_state()
            return
        try:
            bank = await loop.run_in_executor(None, published_bank, self._open_registry())
            await loop.run_in_executor(None, self.guards.refresh, self.registry)
        except Exception as exc:  # noqa: BLE001
            logger.error("serve-unlearn: cannot read the published version: %s", exc)
            return
        if (bank.version if bank else None) == self.routing.version:
            return
        try:
            routing = await loop.run_in_executor(None, load_routing, self.registry, self.config.gate)
        except Exception as exc:  # noqa: BLE001 - keep serving the old version
            self.alert = f"version {bank.version if bank else None}: {type(exc).__name__}: {exc}"
            logger.error("serve-unlearn: loading the new version failed, keeping version %s: %s",
                         self.routing.version, exc)
            metrics.SWITCH_FAILURES.inc()
            return
        old, self.routing, self.alert = self.routing, routing, None
        logger.info("serve-unlearn: switched routing from version %s to %s", old.version, routing.version)
        old.gate.close()
        metrics.SWITCHES.inc()
        self._publish_state()

    # -- who is asking ----------------------------------------------------------------------------------------
    def _presented_token(self, scope) -> bytes | None:
        presented = header(scope, ADMIN_HEADER.encode())
        auth = header(scope, b"authorization") or b""
        if not presented and auth[:7].lower() == b"bearer ":
            presented = auth[7:].strip()
        return presented or None

    def _is_admin(self, scope) -> bool:
        presented = self._presented_token(scope)
        return bool(self.admin_token and presented) and hmac.compare_digest(presented, self.admin_token)

    async def _forbid(self, scope, send, what: str) -> None:
        status = 403 if self._presented_token(scope) else 401
        await respond_json(send, status, error_body(
            status, f"{what} needs the serve-unlearn admin token (header {ADMIN_HEADER}, or Authorization: "
            f"Bearer); operators set it in ${self.config.admin_token_env} of the server",
            "PermissionDenied" if status == 403 else "Unauthorized"))

    def status(self) -> dict:
        routing = self.routing
        return {"version": routing.version if routing else None, "error": self.error, "alert": self.alert,
                "requests": list(routing.gate.request_names) if routing else [],
                "guards": self.guards.names, "guard_error": self.guards.error,
                "gate": dict(routing.gate.counters) if routing else {},
                "inflight": {str(k): v for k, v in self._inflight.items() if v},
                "routes": self.table.by_class() if self.table else None}

    # -- ASGI -------------------------------------------------------------------------------------------------
    def _routes(self, scope) -> RouteTable | None:
        """The table of the app's routes, built on first use and again if the app gains routes (vLLM adds some
        after it constructs its middleware)."""
        app = scope.get("app")
        routes = getattr(app, "routes", None)
        if app is not None and (self.table is None or len(self.table.routes) != len(routes or ())):
            self.table = RouteTable.of_app(scope["app"], open_routes=self.config.open_routes,
                                           admin_routes=self.config.admin_routes)
            logger.info("serve-unlearn route table: %s", json.dumps(self.table.by_class()))
        return self.table

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind == "lifespan":
            self._routes(scope)
            self._start_poller()
            return await self.app(scope, receive, send)
        if kind not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        await self._maybe_reload()  # any request (status polls too) may notice a new published version
        table = self._routes(scope)
        if route_path(scope) == STATUS_PATH and kind == "http":
            if not self._is_admin(scope):
                return await self._forbid(scope, send, "the status page")
            return await respond_json(send, 200, self.status())
        if route_path(scope) == PATCHES_PATH and kind == "http":  # live weight patches (live_patch)
            if not self._is_admin(scope):
                return await self._forbid(scope, send, "live patches")
            from .live_patch import handle

            return await handle(scope, receive, send)
        template, route_class = table.match(scope) if table else (None, RouteClass.REFUSED)
        if kind == "websocket":  # streaming sessions (e.g. realtime audio) cannot be gated
            if route_class in (None, RouteClass.OPEN) or (route_class == RouteClass.ADMIN and self._is_admin(scope)):
                return await self.app(scope, receive, send)
            metrics.DECISIONS.labels("refused", template or "?").inc()
            return await send({"type": "websocket.close", "code": 1008})
        if route_class is None or route_class == RouteClass.OPEN:
            return await self.app(scope, receive, send)
        if route_class == RouteClass.ADMIN:
            allowed = self._is_admin(scope)
            metrics.MANAGEMENT.labels("allowed" if allowed else "forbidden").inc()
            if not allowed:
                return await self._forbid(scope, send, f"{scope.get('method')} {template}")
            return await self.app(scope, receive, send)
        if route_class == RouteClass.MODELS:
            if self._is_admin(scope):
                return await self.app(scope, receive, send)
            return await self.app(scope, receive, _hide_adapters(send))
        if route_class == RouteClass.REFUSED:
            return await self._answer(send, template, "refused", 403, "PermissionDenied",
                f"{scope.get('method')} {template} is not gated by serve-unlearn, so it is closed while forget "
                "requests are served; operators can open it with open_routes or admin_routes in the serve-unlearn "
                "config")
        return await self._gate(scope, receive, send, template)

    async def _answer(self, send, template: str, outcome: str, status: int, kind: str, message: str) -> None:
        """Answer a gated or classified request here (it never reaches vLLM), counted under ``outcome``."""
        metrics.DECISIONS.labels(outcome, template).inc()
        await respond_json(send, status, error_body(status, message, kind))

    async def _invalid(self, send, template: str, status: int, message: str) -> None:
        await self._answer(send, template, "invalid", status, "BadRequestError", message)

    async def _gate(self, scope, receive, send, template: str) -> None:
        t0 = time.perf_counter()
        encoding = (header(scope, b"content-encoding") or b"identity").strip().lower()
        if encoding not in (b"identity", b""):
            return await self._invalid(send, template, 415, "compressed request bodies are not accepted; send "
                                       "plain JSON")
        declared = header(scope, b"content-length")
        limit = self.config.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._invalid(send, template, 413, f"the request body is larger than {limit} bytes")
        try:
            body = await read_body(receive, limit)
        except BodyTooLarge:
            return await self._invalid(send, template, 413, f"the request body is larger than {limit} bytes")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return await self._invalid(send, template, 400, f"the request body is not valid JSON "
                                       f"({type(exc).__name__}); send a JSON object")
        if not isinstance(data, dict):
            return await self._invalid(send, template, 400, "the request body must be a JSON object")
        model = data.get("model")
        if isinstance(model, str) and model.startswith(NAME_PREFIX):
            if not self._is_admin(scope):
                return await self._answer(send, template, "refused", 403, "PermissionDenied",
                                          f"model {model!r} is a serve-unlearn adapter; name the base model and the "
                                          "gate routes the request (operators: send the admin token)")
            return await self.app(with_body(scope, body), replay(body, receive), send)
        if self.models is not None and model is not None and model not in self.models and not self._is_admin(scope):
            return await self._answer(send, template, "refused", 404, "NotFoundError",
                                      f"model {str(model)[:200]!r} is not served here; name one of "
                                      f"{sorted(self.models)}")
        routing = self.routing
        if routing is None:
            if self.config.gate.fail_closed:
                return await self._answer(send, template, "unavailable", 503, "ServiceUnavailable",
                                          f"serve-unlearn cannot gate requests: {self.error}")
            metrics.DECISIONS.labels("failed_open", template).inc()
            return await self.app(with_body(scope, body, _ADAPTER_HEADERS), replay(body, receive), send)
        texts: list[str] = []
        try:
            texts = request_segments(data)
            if not texts:
                raise Unscorable("no text to score")
            guarded = await asyncio.get_running_loop().run_in_executor(
                None, self.guards.flagged, texts, frozenset(routing.gate.request_names))
            if guarded is not None:
                return await self._refuse(send, template, data, guarded)
            (decision,) = await asyncio.get_running_loop().run_in_executor(None, routing.gate.decide, [texts])
        except Unscorable as exc:
            (decision,) = routing.gate.fail(1, str(exc))
        return await self._forward(scope, receive, send, template, data, routing, decision, texts, t0)

    async def _refuse(self, send, template: str, data: dict, request: str) -> None:
        """A flagged prompt of a filing not yet in force: the refusal, in the route's format (guard.py)."""
        metrics.DECISIONS.labels("guarded", template).inc()
        status, content_type, body = refusal(template, data, self.config.guard.refusal)
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
            (GUARD_HEADER, request.encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _forward(self, scope, receive, send, template: str, data: dict, routing: Routing,
                       decision: GateDecision, texts: list[str], t0: float) -> None:
        adapter = routing.bank.bucket(decision.scale, self.config.bank.rounding) if routing.bank else None
        if adapter is not None:
            data["model"] = adapter
        if decision.error is not None:
            outcome = "failed_closed" if decision.scale > 0 else "failed_open"
        else:
            outcome = "adapter" if adapter else "base"
        latency = time.perf_counter() - t0
        metrics.DECISIONS.labels(outcome, template).inc()
        metrics.LATENCY.observe(latency)
        if not math.isnan(decision.weight):
            metrics.WEIGHT.observe(decision.weight)
        request_id = (header(scope, b"x-request-id") or b"").decode("latin-1")[:128] or uuid.uuid4().hex
        self.audit.write({
            "request_id": request_id, "route": template, "outcome": outcome, "adapter": adapter or "base",
            "scale": round(decision.scale, 4), "weight": None if math.isnan(decision.weight) else round(
                decision.weight, 4), "weights": {k: round(v, 4) for k, v in decision.weights.items()},
            "generation": routing.version, "latency_ms": round(latency * 1000, 2), "windows": decision.windows,
            "error": decision.error, "prompt_hash": self.audit.prompt_hash(texts)})
        body = json.dumps(data).encode()
        extra = [(b"x-serve-unlearn-weight", f"{decision.weight:.4f}".encode()),
                 (b"x-serve-unlearn-scale", f"{decision.scale:.4f}".encode()),
                 (b"x-serve-unlearn-adapter", (adapter or "base").encode()),
                 (b"x-serve-unlearn-generation", str(routing.version).encode()),
                 (b"x-serve-unlearn-request-id", request_id.encode("latin-1", "replace"))]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), *extra])
            await send(message)

        version = routing.version
        inflight = metrics.INFLIGHT.labels(str(version))
        self._inflight[version] = self._inflight.get(version, 0) + 1
        inflight.inc()
        try:
            await self.app(with_body(scope, body, _ADAPTER_HEADERS), replay(body, receive), send_with_headers)
        finally:
            self._inflight[version] -= 1
            inflight.dec()


def _hide_adapters(send):
    """A ``send`` that drops serve-unlearn adapters from a ``/v1/models`` list (buffers that one small body)."""
    start: dict | None = None
    chunks: list[bytes] = []

    async def filtered(message):
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body":
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = b"".join(chunks)
        try:
            listing = json.loads(body)
            listing["data"] = [m for m in listing.get("data", [])
                               if not str(m.get("id", "")).startswith(NAME_PREFIX)]
            body = json.dumps(listing).encode()
        except (ValueError, TypeError, AttributeError):
            pass  # not a model list (an error answer): pass it on as it is
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send(dict(start, headers=[*headers, (b"content-length", str(len(body)).encode())]))
        await send({"type": "http.response.body", "body": body})

    return filtered
