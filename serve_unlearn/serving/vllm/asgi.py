"""Small pieces of raw ASGI the middleware needs: bounded body reads, replays, JSON answers, header access."""

from __future__ import annotations

import json


class BodyTooLarge(Exception):
    pass


def header(scope, name: bytes) -> bytes | None:
    """A request header's raw bytes (the first one of that name)."""
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v
    return None


def route_path(scope) -> str:
    """The path the app's routes see (without ``--root-path``)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


async def read_body(receive, limit: int) -> bytes:
    """The whole request body; BodyTooLarge as soon as it passes ``limit`` bytes (nothing more is buffered)."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(size)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def replay(body: bytes, receive):
    """A ``receive`` that hands ``body`` over once, then defers to the client connection (disconnects)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def error_body(status: int, message: str, kind: str) -> dict:
    """vLLM's error shape: ``{"error": {"message", "type", "code"}}``."""
    return {"error": {"message": message, "type": kind, "code": status}}


async def respond_json(send, status: int, payload: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def with_body(scope, body: bytes, drop: tuple[bytes, ...] = ()) -> dict:
    """``scope`` for a rewritten JSON body: its own content-length and content-type, and without the headers
    named in ``drop`` (lower-case prefixes)."""
    skip = (b"content-length", b"content-type", b"transfer-encoding", *drop)
    headers = [(k, v) for k, v in scope.get("headers", []) if not k.lower().startswith(skip)]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return dict(scope, headers=headers)
