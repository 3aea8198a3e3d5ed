"""The route table: what the middleware does with each route of the *running* app.

Every route is put in one class: ``gated`` (the body is scored and the request routed to the base model or a bank
adapter), ``admin`` (adapter and engine management: only with the admin token), ``open`` (no model output:
health, tokenize, metrics, ...), ``models`` (open, with the serve-unlearn adapters hidden from non-admins) or
``refused`` (403). A POST/PUT/PATCH/DELETE route nobody classified is refused, so a vLLM upgrade or an endpoint
plugin that adds a generating route cannot open a hole; operators open such a route with ``open_routes`` or
``admin_routes`` in ``VllmServeConfig``.

A request is matched the way Starlette's router matches it (each route's own ``matches`` on the same scope), so
``--root-path``, trailing slashes, percent-encoding and the like resolve to the route that will answer, and the
class of that route decides.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .contract import PATCHES_PATH, STATUS_PATH


class RouteClass(StrEnum):
    GATED = "gated"
    ADMIN = "admin"
    OPEN = "open"
    MODELS = "models"
    REFUSED = "refused"


# Routes that make the model produce output from a request body the gate can read (vLLM 0.32-0.34).
GATED_ROUTES = frozenset({
    "/v1/completions", "/v1/chat/completions", "/v1/chat/completions/batch", "/v1/responses", "/v1/messages",
    "/invocations", "/generative_scoring", "/v1/systemone", "/v1/decisions", "/inference/v1/generate",
    "/cohere/v2/chat",
})
# Adapter, weight and engine management (vLLM's development routes among them), and this middleware's status.
ADMIN_ROUTES = frozenset({
    "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/adapters", "/adapters/{adapter_name}",
    "/reset_prefix_cache", "/reset_mm_cache", "/reset_encoder_cache", "/collective_rpc", "/sleep", "/wake_up",
    "/release_kv_cache_memory", "/is_sleeping", "/server_info", "/start_profile", "/stop_profile",
    "/scale_elastic_ep", "/is_scaling_elastic_ep", "/fault_tolerance/apply", "/fault_tolerance/status",
    "/v1/fault_tolerance/apply", "/v1/fault_tolerance/status", "/checkpoint/prepare", "/checkpoint/restore",
    "/checkpoint/status",
    "/abort_requests", "/inference/v1/abort_requests", "/pause", "/resume", "/is_paused", "/update_weights",
    "/start_weight_update", "/finish_weight_update", "/init_weight_transfer_engine",
    "/shutdown_weight_transfer_engine", "/start_draft_weight_update", "/update_weight_version", "/weight_checker",
    "/weight_info", "/get_world_size", STATUS_PATH, PATCHES_PATH,
})
# Non-GET routes that produce no model output.
OPEN_ROUTES = frozenset({"/tokenize", "/detokenize", "/ping", "/v1/messages/count_tokens",
                         "/v1/responses/{response_id}/cancel", "/metrics"})
MODELS_ROUTE = "/v1/models"
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class RouteEntry:
    path: str                      # the route's template, e.g. /v1/responses/{response_id}
    methods: tuple[str, ...]       # empty: every method (a mounted app)
    route_class: RouteClass

    def as_dict(self) -> dict:
        return {"path": self.path, "methods": list(self.methods), "class": str(self.route_class)}


def classify(path: str, methods: Iterable[str], *, open_routes: Iterable[str] = (),
             admin_routes: Iterable[str] = ()) -> RouteClass:
    """The class of one route template served for ``methods``."""
    if path in admin_routes or path in ADMIN_ROUTES:
        return RouteClass.ADMIN
    if path in GATED_ROUTES:
        return RouteClass.GATED
    if path == MODELS_ROUTE:
        return RouteClass.MODELS
    methods = set(methods)
    if path in open_routes or path in OPEN_ROUTES or (methods and methods <= _READ_METHODS):
        return RouteClass.OPEN
    return RouteClass.REFUSED


class RouteTable:
    """The classes of the routes of one app (FastAPI/Starlette), and the matching of requests against them."""

    def __init__(self, routes: list[Any], *, open_routes: Iterable[str] = (), admin_routes: Iterable[str] = ()):
        self.routes = routes
        self.entries: list[RouteEntry] = []
        self._class_of: dict[int, RouteClass] = {}
        for route in routes:
            path = getattr(route, "path", None)
            if path is None:
                continue
            methods = tuple(sorted(getattr(route, "methods", None) or ()))
            entry = RouteEntry(path, methods, classify(path, methods, open_routes=open_routes,
                                                       admin_routes=admin_routes))
            self.entries.append(entry)
            self._class_of[id(route)] = entry.route_class

    @classmethod
    def of_app(cls, app: Any, **kwargs) -> RouteTable:
        return cls(list(getattr(app, "routes", None) or []), **kwargs)

    def match(self, scope: dict) -> tuple[str | None, RouteClass | None]:
        """The template and class of the route the router will run for ``scope``; (None, None) when the router
        answers by itself (404, 405, a slash redirect)."""
        from starlette.routing import Match

        for route in self.routes:
            matched, _ = route.matches(scope)
            if matched == Match.FULL:
                return route.path, self._class_of.get(id(route), RouteClass.REFUSED)
        return None, None

    def by_class(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {str(c): [] for c in RouteClass}
        for e in self.entries:
            out[str(e.route_class)].append(f"{','.join(e.methods) or '*'} {e.path}")
        return out
