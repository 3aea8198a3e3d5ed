"""A stand-in for vLLM's API server in front of which the middleware is tested: the routes of vLLM 0.32 (so the
middleware's route table classifies a realistic app) and an echo app that answers with the body it received."""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI
from starlette.routing import Mount

from serve_unlearn.serving.vllm.routes import ADMIN_ROUTES, GATED_ROUTES, OPEN_ROUTES


def _build_routes_app() -> FastAPI:
    app = FastAPI()

    async def never_called():  # the middleware's downstream is echo_app; these routes are only matched
        raise AssertionError

    for path in sorted(GATED_ROUTES | ADMIN_ROUTES | (OPEN_ROUTES - {"/metrics"})):
        if path.startswith("/serve-unlearn"):
            continue
        app.add_api_route(path, never_called, methods=["POST"])
    for path in ("/health", "/v1/models", "/version", "/v1/responses/{response_id}", "/server_info"):
        app.add_api_route(path, never_called, methods=["GET"])
    # routes the middleware does not know: a newer vLLM or an endpoint plugin
    for path in ("/v1/embeddings", "/v1/chat/completions/render", "/v1/plugin/generate"):
        app.add_api_route(path, never_called, methods=["POST"])
    app.add_api_route("/adapters/{adapter_name}", never_called, methods=["DELETE"])
    app.routes.append(Mount("/metrics", app=echo_app))
    return app


async def echo_app(scope, receive, send):
    """Answers with the body it received, in two chunks (a stand-in for a streamed vLLM response)."""
    body, more = b"", True
    while more:
        msg = await receive()
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
    await send({"type": "http.response.body", "body": body[len(body) // 2:], "more_body": False})


ROUTES_APP = _build_routes_app()


async def acall(app, path, body=b"", method="POST", headers=(), root_path="", chunk=7):
    """One request through ``app`` (the middleware) on the running loop; returns (status, headers, chunks)."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)] if chunk else [body]
    chunks = chunks or [b""]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": root_path + path, "root_path": root_path,
             "query_string": b"", "app": ROUTES_APP,
             "headers": [(b"content-length", str(len(body)).encode()), *headers]}
    await app(scope, receive, send)
    start = sent[0]
    return start["status"], dict(start["headers"]), [m.get("body", b"") for m in sent[1:]]


def call(app, path, body=b"", **kw):
    """``acall`` in a loop of its own."""
    return asyncio.run(acall(app, path, body, **kw))


def body_of(chunks) -> dict:
    return json.loads(b"".join(chunks))
