"""``vllm serve --middleware serve_unlearn.serving.vllm.O3Middleware``: route each request by the O3 gate.

Pure ASGI (no ``BaseHTTPMiddleware``), so streamed responses stream. For ``POST /v1/completions``,
``/v1/chat/completions`` and ``/v1/responses`` it reads the JSON body, scores the prompt(s) or messages with the
gate (in a worker thread, off the event loop), and rewrites ``model`` to the bank adapter for the applied scale, or
leaves the base model. Responses carry ``x-serve-unlearn-weight`` (the gate weight), ``-scale`` and ``-adapter``.

- A body that is not a JSON object goes through untouched: vLLM's own validation answers it.
- A client that names an ``o3-*`` adapter itself gets 403 unless it sends the admin token
  (``Authorization: Bearer`` or ``x-serve-unlearn-admin``; the token is read from ``$SERVE_UNLEARN_ADMIN_TOKEN``).
- A list of prompts is routed at the largest scale among them (one request runs on one adapter).
- Token-id prompts cannot be scored: they fail closed (or open), like a detector error.
- If the registry is missing or corrupt, gated requests get 503 when failing closed (never the un-gated model),
  or go to the base model when failing open; the error is logged and shown at ``GET /serve-unlearn/status``.
- A new published version (see ``routing``) is loaded in the background; requests keep the routing they started
  with, and the switch is one reference assignment.

Settings: ``$SERVE_UNLEARN_REGISTRY`` (the registry folder, required) and ``$SERVE_UNLEARN_CONFIG`` (a YAML
``VllmServeConfig``, optional).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import time
from collections import Counter
from typing import Any

from ...adapters.gate import GateDecision
from ...errors import GateInputError
from ...registry import ForgetRegistry
from .bank import NAME_PREFIX
from .config import CONFIG_ENV, REGISTRY_ENV, VllmServeConfig
from .contract import STATUS_PATH
from .routing import Routing, load_routing, published_bank

logger = logging.getLogger("serve_unlearn.middleware")
GATED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses"})


class _Unscorable(Exception):
    """The request is valid for vLLM but holds no text to score (token ids)."""


def request_prompts(path: str, data: dict[str, Any]) -> list[Any]:
    """The prompts of one request, as the gate takes them (strings or chat message lists)."""
    if path == "/v1/chat/completions":
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise GateInputError("'messages' must be a non-empty list")
        return [messages]
    if path == "/v1/responses":
        inp = data.get("input")
        if isinstance(inp, str):
            return [inp]
        if isinstance(inp, list) and inp and all(isinstance(m, dict) for m in inp):
            return [[m for m in inp if "role" in m] or inp]
        raise GateInputError("'input' must be a string or a list of messages")
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, int) for p in prompt) or all(isinstance(p, list) for p in prompt):
            raise _Unscorable("token-id prompts cannot be scored")
    raise GateInputError("'prompt' must be a string or a list of strings")


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


async def _read_body(receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """A ``receive`` that hands the buffered body over once, then defers to the client connection."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _respond_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _error(status: int, message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "code": status}}


class O3Middleware:
    def __init__(self, app, registry: ForgetRegistry | None = None, config: VllmServeConfig | None = None):
        self.app = app
        self.config = config or VllmServeConfig.load(os.environ.get(CONFIG_ENV))
        self.admin_token = os.environ.get(self.config.admin_token_env) or None
        self.counters: Counter[str] = Counter()
        self.inflight: Counter[int | None] = Counter()
        self.registry = registry
        self.routing: Routing | None = None
        self.error: str | None = None
        self._next_poll = 0.0
        self._reloading = False
        if self.config.gate_threads:
            import torch

            torch.set_num_threads(self.config.gate_threads)
        try:
            if self.registry is None:
                root = os.environ.get(REGISTRY_ENV)
                if not root:
                    raise ValueError(f"set {REGISTRY_ENV} to the forget-request registry folder")
                self.registry = ForgetRegistry(root, create=False, database=self.config.registry_database)
            self.routing = load_routing(self.registry, self.config.gate)
            logger.info("serve-unlearn middleware: routing to bank version %s", self.routing.version)
        except Exception as exc:  # noqa: BLE001 - the server must come up and report, not crash
            self.error = f"{type(exc).__name__}: {exc}"
            logger.error("serve-unlearn middleware cannot load its registry: %s", self.error)

    # -- version switching ------------------------------------------------------------------------------------
    async def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self._reloading or now < self._next_poll or self.registry is None:
            return
        self._next_poll = now + self.config.poll_interval_s
        loop = asyncio.get_running_loop()
        try:
            bank = await loop.run_in_executor(None, published_bank, self.registry)
        except Exception as exc:  # noqa: BLE001
            logger.error("serve-unlearn: cannot read the published version: %s", exc)
            return
        current = self.routing.version if self.routing else None
        if (bank.version if bank else None) == current and self.routing is not None:
            return
        self._reloading = True
        asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        try:
            routing = await asyncio.get_running_loop().run_in_executor(
                None, load_routing, self.registry, self.config.gate)
            old, self.routing, self.error = self.routing, routing, None
            logger.info("serve-unlearn: switched routing from version %s to %s",
                        old.version if old else None, routing.version)
            if old is not None:
                old.gate.close()
            self.counters["reloads"] += 1
        except Exception as exc:  # noqa: BLE001 - keep serving the old version
            logger.error("serve-unlearn: loading the new version failed, keeping the old one: %s", exc)
            self.counters["reload_errors"] += 1
        finally:
            self._reloading = False

    # -- ASGI -------------------------------------------------------------------------------------------------
    def _is_admin(self, scope) -> bool:
        if not self.admin_token:
            return False
        presented = _header(scope, b"x-serve-unlearn-admin") or ""
        auth = _header(scope, b"authorization") or ""
        if auth.lower().startswith("bearer "):
            presented = presented or auth[7:].strip()
        return bool(presented) and hmac.compare_digest(presented, self.admin_token)

    def status(self) -> dict:
        return {"version": self.routing.version if self.routing else None, "error": self.error,
                "requests": list(self.routing.gate.request_names) if self.routing else [],
                "counters": dict(self.counters),
                "gate": dict(self.routing.gate.counters) if self.routing else {},
                "inflight": {str(k): v for k, v in self.inflight.items() if v}}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        await self._maybe_reload()  # any request (status polls too) may notice a new published version
        path = scope.get("path", "")
        if scope.get("method") == "GET" and path == STATUS_PATH:
            return await _respond_json(send, 200, self.status())
        if scope.get("method") != "POST" or path not in GATED_PATHS:
            return await self.app(scope, receive, send)
        body = await _read_body(receive)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict):
            self.counters["passthrough_invalid"] += 1
            return await self.app(scope, _replay(body, receive), send)
        model = data.get("model")
        if isinstance(model, str) and model.startswith(NAME_PREFIX):
            if not self._is_admin(scope):
                self.counters["forbidden"] += 1
                return await _respond_json(send, 403, _error(
                    403, f"model {model!r} is a serve-unlearn adapter; name the base model and the gate "
                    "routes the request (operators: send the admin token)", "PermissionDenied"))
            self.counters["admin"] += 1
            return await self.app(scope, _replay(body, receive), send)
        routing = self.routing
        if routing is None:
            if self.config.gate.fail_closed:
                self.counters["unavailable"] += 1
                return await _respond_json(send, 503, _error(
                    503, f"serve-unlearn cannot gate requests: {self.error}", "ServiceUnavailable"))
            return await self.app(scope, _replay(body, receive), send)
        try:
            prompts = request_prompts(path, data)
            decisions = await asyncio.get_running_loop().run_in_executor(None, routing.gate.decide, prompts)
        except GateInputError:
            self.counters["passthrough_invalid"] += 1  # vLLM's validation gives the client its 400
            return await self.app(scope, _replay(body, receive), send)
        except _Unscorable as exc:
            decisions = routing.gate.fail(1, str(exc))
        return await self._forward(scope, receive, send, data, routing, decisions)

    async def _forward(self, scope, receive, send, data: dict, routing: Routing,
                       decisions: list[GateDecision]) -> None:
        scale = max(d.scale for d in decisions)
        scored = [d.weight for d in decisions if not math.isnan(d.weight)]
        weight = max(scored) if scored else float("nan")  # nan: scoring failed
        adapter = routing.bank.bucket(scale, self.config.bank.rounding) if routing.bank else None
        if adapter is not None:
            data["model"] = adapter
        self.counters["routed_adapter" if adapter else "routed_base"] += 1
        body = json.dumps(data).encode()
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        scope = dict(scope, headers=headers)
        extra = [(b"x-serve-unlearn-weight", f"{weight:.4f}".encode()),
                 (b"x-serve-unlearn-scale", f"{scale:.4f}".encode()),
                 (b"x-serve-unlearn-adapter", (adapter or "base").encode())]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), *extra])
            await send(message)

        version = routing.version
        self.inflight[version] += 1
        try:
            await self.app(scope, _replay(body, receive), send_with_headers)
        finally:
            self.inflight[version] -= 1
