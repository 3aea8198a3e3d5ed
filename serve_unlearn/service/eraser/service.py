"""``EraserService``: the object-removal endpoint (``POST /v1/images/erase``) and its page (``GET /erase``).

Lifecycle (called by the app's lifespan): ``start()`` loads the pipeline once, warms it and starts the batcher;
``ready()`` feeds ``/readyz``; ``stop()`` answers what is still queued with 503 and stops the pipeline thread.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable
from typing import Any, ClassVar

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CollectorRegistry

from ..errors import ApiError
from .batcher import DynamicBatcher
from .config import EraserConfig
from .engine import EraserEngine
from .metrics import EraserMetrics
from .page import PAGE
from .requests import Job, b64_image, invalid, open_image, parse_params, png_bytes, to_job_arrays

logger = logging.getLogger(__name__)


class EraserService:
    """Object removal for one pipeline folder; ``router`` holds the routes, ``start``/``stop`` its lifecycle."""

    # builds the batcher in ``start`` (engine, config, metrics) -> object with start/stop/submit/depth; None: the
    # embedded DynamicBatcher. The Ray Serve deployment sets a factory that batches with ``@serve.batch``.
    batcher_factory: ClassVar[Callable[..., Any] | None] = None

    def __init__(self, config: EraserConfig, metrics: CollectorRegistry, *, engine: EraserEngine | None = None):
        self.config = config
        self.metrics = EraserMetrics(metrics)
        self.engine = engine or EraserEngine(config)  # a prebuilt engine: benchmarks, embedding in other apps
        self.batcher = None
        self._state = "not started"
        self.router = self._build_router()

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._state = "loading the pipeline"
        try:
            await asyncio.to_thread(self.engine.load)
            if self.config.warmup:
                self._state = "warming up"
                await asyncio.to_thread(self.engine.warmup)
        except Exception as exc:
            self._state = f"failed to start: {exc}"
            raise
        factory = type(self).batcher_factory
        if factory is not None:
            self.batcher = factory(self.engine, self.config, self.metrics)
        else:
            self.batcher = DynamicBatcher(self.engine.run_batch, max_batch_size=self.config.max_batch_size,
                                          batch_wait_ms=self.config.batch_wait_ms, max_queue=self.config.max_queue,
                                          timeout_s=self.config.timeout_s, metrics=self.metrics)
        self.batcher.start()
        self._state = "ok"
        logger.info("eraser ready: %s (%s preset) on %s", self.config.model, self.engine.preset, self.config.device)

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        self._state = "stopped"

    def ready(self) -> tuple[bool, str]:
        return self._state == "ok", self._state

    # -- routes ------------------------------------------------------------------------------------------------
    def _build_router(self) -> APIRouter:
        router = APIRouter(tags=["eraser"])

        @router.post("/v1/images/erase", summary="Remove the masked object from an image",
                     responses={200: {"content": {"image/png": {}, "application/json": {}}}})
        async def erase(request: Request):
            """multipart/form-data (``image``, ``mask`` files + fields) or JSON (base64 ``image``, ``mask`` +
            fields). Answers image/png, or JSON with a base64 PNG for ``Accept: application/json``."""
            start = time.perf_counter()
            status = 500
            try:
                response = await self._erase(request, start)
                status = 200
                return response
            except ApiError as exc:
                status = exc.status
                raise
            except Exception as exc:
                logger.exception("erase failed")
                raise ApiError(500, f"the erase failed inside the server ({type(exc).__name__}); it was logged",
                               "InternalServerError", "internal_error") from exc
            finally:
                self.metrics.answered(status, time.perf_counter() - start)

        @router.get("/erase", response_class=HTMLResponse, include_in_schema=False)
        async def page():
            return HTMLResponse(PAGE)

        return router

    async def _erase(self, request: Request, start: float) -> Response:
        ok, why = self.ready()
        if not ok:
            raise ApiError(503, f"the eraser is not ready ({why})", "ServiceUnavailable", "not_ready",
                           headers={"Retry-After": "5"})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.timeout_s
        image_bytes, mask_bytes, fields = await self._read_request(request)
        params = parse_params(fields, self.config.default_steps, self.config.max_steps)
        max_px = self.config.max_pixels

        def decode():
            image = open_image(image_bytes, "image", max_px)
            mask = open_image(mask_bytes, "mask", max_px)
            return to_job_arrays(image, mask, self.engine.factor)

        arr, mask, size, resized, empty = await asyncio.to_thread(decode)
        headers = {"X-Seed": str(params.seed), "X-Steps": str(params.num_inference_steps),
                   "X-Mask-Empty": "true" if empty else "false"}
        if resized:
            headers["X-Mask-Resized"] = f"{resized[0]}x{resized[1]}->{size[1]}x{size[0]}"
        if empty:  # documented: nothing to remove, the upload comes back unchanged and no model runs
            result, batch = arr[: size[0], : size[1]], 0
        else:
            job = Job(params, arr, mask, size, params.seed, deadline,
                      key=params.batch_key(arr.shape[0], arr.shape[1]))
            result, batch = await self.batcher.submit(job)
        png = await asyncio.to_thread(png_bytes, result)
        headers["X-Batch-Size"] = str(batch)
        headers["X-Server-Time-Ms"] = f"{(time.perf_counter() - start) * 1000:.1f}"
        if "application/json" in request.headers.get("accept", ""):
            body = {"image": base64.b64encode(png).decode(), "width": size[1], "height": size[0],
                    "seed": params.seed, "steps": params.num_inference_steps, "batch_size": batch,
                    "mask_resized": headers.get("X-Mask-Resized"), "mask_empty": empty,
                    "server_time_ms": float(headers["X-Server-Time-Ms"])}
            return JSONResponse(body, headers=headers)
        return Response(png, media_type="image/png", headers=headers)

    async def _read_request(self, request: Request) -> tuple[bytes, bytes, dict[str, Any]]:
        """(image bytes, mask bytes, other fields) from a multipart or JSON body of at most max_upload_bytes."""
        body = await self._read_body(request)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            try:
                data = json.loads(body)
            except ValueError as exc:
                raise invalid(f"the body is not valid JSON: {exc}", "invalid_json") from exc
            if not isinstance(data, dict):
                raise invalid("the JSON body must be an object with `image`, `mask` and fields", "invalid_json")
            return b64_image(data.pop("image", None), "image"), b64_image(data.pop("mask", None), "mask"), data
        if kind != "multipart/form-data":
            raise ApiError(415, f"send multipart/form-data (image and mask files) or application/json (base64), "
                           f"not {kind or 'no content type'}", "UnsupportedMediaType", "unsupported_body")

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, receive).form(max_files=4, max_fields=32)
        except Exception as exc:  # malformed multipart
            raise invalid(f"the multipart body could not be parsed: {getattr(exc, 'detail', exc)}",
                          "invalid_multipart") from exc
        files: dict[str, bytes] = {}
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                files[key] = await value.read()
            elif value != "":
                fields[key] = value
        for name in ("image", "mask"):
            if name not in files:
                raise invalid(f"`{name}` is missing: upload it as a file part of multipart/form-data",
                              "missing_field")
        unknown = sorted(set(files) - {"image", "mask"})
        if unknown:
            raise invalid(f"unexpected file part(s) {unknown}: only `image` and `mask`", "invalid_field")
        return files["image"], files["mask"], fields

    async def _read_body(self, request: Request) -> bytes:
        cap = self.config.max_upload_bytes
        too_big = ApiError(413, f"the request body is over this server's {cap} bytes (max_upload_bytes): send "
                           "smaller files (PNG/JPEG/WebP)", "PayloadTooLarge", "body_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > cap:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)
