"""``POST /serve-unlearn/patches``: apply or revert a weight patch on a running vLLM, without a restart (admin only).

The middleware hands this route to :func:`handle`, which drives the workers' ``LivePatchExtension`` (vLLM's
``--worker-extension-cls``, which ``serve-unlearn vllm`` sets) through the engine client vLLM keeps on
``app.state``:

1. ``prepare`` on every worker: the patch file is verified, the new list of patches in force is computed, and the
   checkpoint tensors of the blocks it touches are patched and staged. A wrong base, a patch already in force (or
   not in force, for a revert), a damaged or missing file: a 4xx answer here, before any weight changes.
2. the engine is paused with vLLM's ``pause_generation(mode="wait")``: requests already running finish on the
   weights they started with, new ones are queued (not refused) until the change is done;
3. ``commit`` on every worker: vLLM's in-place reload loads the staged tensors (fused and tensor-parallel layouts
   by the model's own ``load_weights``);
4. the prefix cache is reset (pausing cleared the KV cache too), so no state computed on the old weights answers
   a new request, and generation resumes (also when a step failed).

Body: ``{"action": "apply" | "revert", "patch": "/path/on/the/server.patch.safetensors"}`` (the file is read by
the server's workers, like ``--model-loader-extra-config``). ``GET`` lists the patches in force. One change at a
time per API process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from .asgi import BodyTooLarge, error_body, read_body, respond_json
from .contract import PATCHES_PATH, WORKER_EXTENSION

logger = logging.getLogger("serve_unlearn.live_patch")

__all__ = ["handle"]

_MAX_BODY = 64 * 1024
# the worker's error type -> HTTP status
_STATUS = {"PatchMismatchError": 409, "PatchStateError": 409, "PatchFormatError": 422,
           "FileNotFoundError": 404, "PermissionError": 403, "IsADirectoryError": 422}
_lock = asyncio.Lock()


class _Refused(Exception):
    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def _engine(scope) -> Any:
    state = getattr(scope.get("app"), "state", None)
    engine = getattr(state, "engine_client", None)
    if engine is None:
        raise _Refused(503, "ServiceUnavailable", "the vLLM engine client is not ready yet: try again")
    return engine


async def _rpc(engine, method: str, *args) -> list[dict]:
    """``collective_rpc`` on every worker; a worker without the extension is an operator error (501)."""
    try:
        results = await engine.collective_rpc(method, args=args)
    except Exception as exc:  # vLLM reports a worker-side failure as a plain exception
        if method in str(exc) or "has no attribute" in str(exc):
            raise _Refused(501, "NotImplementedError", "live patches need vLLM's workers to carry the serve-unlearn "
                           f"extension: start the server with serve-unlearn vllm, or add --worker-extension-cls "
                           f"{WORKER_EXTENSION} to vllm serve ({type(exc).__name__}: {exc})") from exc
        raise
    for r in results:
        if not r.get("ok"):
            err = r.get("error", {})
            kind = err.get("type", "Error")
            raise _Refused(_STATUS.get(kind, 400), kind, err.get("message", "refused by a worker"))
    return results


async def _pause(engine) -> None:
    await engine.pause_generation(mode="wait", clear_cache=True)


async def _change(engine, action: str, path: str) -> dict:
    t0 = time.perf_counter()
    token = uuid.uuid4().hex
    try:
        prepared = await _rpc(engine, "serve_unlearn_prepare", action, path, token)
    except _Refused as exc:
        if exc.status != 501:  # workers that did stage it drop it
            await engine.collective_rpc("serve_unlearn_discard", args=(token,))
        raise
    t1 = time.perf_counter()
    await _pause(engine)
    t2 = time.perf_counter()
    try:
        committed = await engine.collective_rpc("serve_unlearn_commit", args=(token,))
        await engine.reset_prefix_cache()
    finally:
        await engine.resume_generation()
    t3 = time.perf_counter()
    failed = [r for r in committed if not r.get("ok")]
    if failed:
        raise _Refused(500, "ServerError", f"{len(failed)} of {len(committed)} workers did not load the change "
                       f"({failed[0].get('error')}); check the server log, then apply or revert again")
    first = prepared[0]
    return {"action": action, "patch": path, "patch_id": first["patch_id"], "workers": len(prepared),
            "tensors": first["tensors"], "blocks": first["blocks"], "patches": committed[0]["patches"],
            "seconds": {"prepare": round(t1 - t0, 3), "drain": round(t2 - t1, 3), "load": round(t3 - t2, 3),
                        "total": round(t3 - t0, 3)}}


async def _request(scope, receive) -> tuple[str, str]:
    try:
        body = await read_body(receive, _MAX_BODY)
        data = json.loads(body)
    except BodyTooLarge as exc:
        raise _Refused(413, "BadRequestError", f"the request body is larger than {_MAX_BODY} bytes") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Refused(400, "BadRequestError", "the body must be JSON: {\"action\": \"apply\" | \"revert\", "
                       "\"patch\": PATH}") from exc
    action = data.get("action") if isinstance(data, dict) else None
    path = data.get("patch") if isinstance(data, dict) else None
    if action not in ("apply", "revert") or not isinstance(path, str) or not path:
        raise _Refused(400, "BadRequestError", "the body must be {\"action\": \"apply\" | \"revert\", \"patch\": "
                       "PATH}, PATH a patch file on the server")
    return action, path


async def handle(scope, receive, send) -> None:
    """Answer ``GET`` / ``POST`` on :data:`PATCHES_PATH` (the caller has checked the admin token)."""
    method = scope.get("method", "GET")
    try:
        engine = _engine(scope)
        if method in ("GET", "HEAD"):
            (first, *_) = await _rpc(engine, "serve_unlearn_patches")
            return await respond_json(send, 200, {"patches": first["patches"]})
        if method != "POST":
            raise _Refused(405, "MethodNotAllowed", f"{method} {PATCHES_PATH}: use GET to list or POST to change")
        action, path = await _request(scope, receive)
        async with _lock:
            result = await _change(engine, action, path)
        logger.info("serve-unlearn live patch: %s", json.dumps(result))
        return await respond_json(send, 200, result)
    except _Refused as exc:
        logger.warning("serve-unlearn live patch refused (%s): %s", exc.kind, exc.message)
        return await respond_json(send, exc.status, error_body(exc.status, exc.message, exc.kind))
    except Exception as exc:  # a worker failed while loading: say so in the API's error shape
        logger.exception("serve-unlearn live patch failed")
        return await respond_json(send, 500, error_body(500, f"{type(exc).__name__}: {exc}; check the server log",
                                                        "ServerError"))


# -- the client side (serve-unlearn patch apply|revert --server) -------------------------------------------------
_ERRORS = {"PatchMismatchError": "PatchMismatchError", "PatchStateError": "PatchStateError",
           "PatchFormatError": "PatchFormatError"}


def change_on_server(server: str, action: str, patch: str, *, api_key: str | None = None,
                     timeout: float = 600.0) -> dict:
    """Apply or revert ``patch`` (a path the server can read; made absolute here) on the vLLM server at
    ``server``, with the admin token from ``$SERVE_UNLEARN_ADMIN_TOKEN``. Returns the server's report; a refusal
    raises the worker's error type (PatchMismatchError, PatchStateError, PatchFormatError) or ServerError."""
    import os

    from ... import errors
    from .hotload import call_server

    payload = {"action": action, "patch": os.path.abspath(patch)}
    status, text = call_server(server.rstrip("/") + PATCHES_PATH, "POST", payload, api_key=api_key, timeout=timeout)
    try:
        body = json.loads(text)
    except ValueError:
        body = {}
    if status == 200:
        return body
    err = body.get("error", {}) if isinstance(body, dict) else {}
    kind = getattr(errors, _ERRORS.get(err.get("type"), "ServerError"))
    raise kind(f"the server refused to {action} {patch} (HTTP {status}, {err.get('type')}): "
               f"{err.get('message') or text[:500]}")
