"""The forget-request routes: file, inspect, list, retire, retry, and score texts with the gate in force.

A filing is validated completely before anything is recorded (name, method, records, config keys, probes,
size): a bad one gets a 4xx that says what to fix, and leaves neither a row nor a file. ``method: o3`` trains a
gated adapter; ``salun`` / ``iau`` compute a weight patch from forget ``records`` and ``retain`` records (the
records of the CLI's JSONL data files), put in force on every server as a live patch.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ..errors import ServeUnlearnError, UnlearnDataError
from ..eval.data import eval_set_from_records
from ..patches.compute import METHODS as PATCH_CONFIGS
from ..patches.compute import method_config
from ..registry import ForgetQueue, Job, check_name
from ..registry.queue import STATUSES
from .auth import AdminAuth
from .errors import ApiError
from .worker import forget_config

METHODS = ("o3", *PATCH_CONFIGS)  # salun, iau: a weight patch, applied live on every server
MIN_DISTINCT_PROMPTS = 12  # the detector's minimum: fit on 8, calibrate on 4 held out
FIELDS = ("name", "method", "records", "retain", "config", "probes")

_RECORD = {"type": "object", "properties": {"prompt": {"type": "string", "minLength": 1},
                                            "completion": {"type": "string"}, "text": {"type": "string"}},
           "description": "o3: {prompt, completion?}; salun/iau: {prompt, completion} or {text}"}
_PROBE = {"type": "object", "properties": {"question": {"type": "string"}, "answer": {
    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}}}
FILING_SCHEMA = {
    "type": "object", "required": ["name", "records"],
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
        "method": {"type": "string", "enum": list(METHODS), "default": "o3"},
        "records": {"type": "array", "items": _RECORD, "minItems": 1, "description": "what to forget"},
        "retain": {"type": "array", "items": _RECORD, "description": "salun (optional) / iau (required): what "
                   "the model must keep answering"},
        "config": {"type": "object", "description": "o3: ForgetConfig keys (detector:, lora:); salun: "
                   "SalUnConfig keys; iau: IAUConfig keys; over the service's"},
        "probes": {"type": "object", "properties": {"forget": {"type": "array", "items": _PROBE},
                                                    "retain": {"type": "array", "items": _PROBE}}},
    }}
_MULTIPART = {"type": "object", "required": ["name", "file"], "properties": {
    "name": {"type": "string"}, "method": {"type": "string"}, "config": {"type": "string"},
    "probes": {"type": "string"},
    "file": {"type": "string", "format": "binary", "description": "JSONL, one {prompt, completion?} a line"},
    "retain_file": {"type": "string", "format": "binary", "description": "salun/iau: retain JSONL"}}}


class ScoreBody(BaseModel):
    texts: list[str] = Field(min_length=1, max_length=256)


def job_view(job: Job) -> dict[str, Any]:
    """A filing as the API shows it."""
    result = {k: v for k, v in job.result.items() if k != "guard"}
    return {"id": job.id, "object": "forget_request", "name": job.name, "method": job.method,
            "status": job.status, "progress": job.progress, "attempts": job.attempts,
            "max_attempts": job.max_attempts, "created_at": job.created_at, "timings": job.timings,
            "records": job.spec.get("records"), "retain": job.spec.get("retain"),
            "data_digest": job.spec.get("data_digest"),
            "probes": job.spec.get("probes"), "guarded": bool(job.result.get("guard")),
            "result": result, "error": job.error}


async def read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes; split the forget set or raise "
                       "max_body_bytes in the service config", "RequestTooLarge")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes", "RequestTooLarge")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_filing(request: Request, limit: int) -> dict:
    """The filing as a dict, from JSON or from multipart (a JSONL ``file`` and form fields)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_limited(request, limit)
    if content_type == "multipart/form-data":
        from starlette.datastructures import UploadFile
        from starlette.requests import Request as StarletteRequest

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        form = await StarletteRequest(request.scope, replay).form()
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "a multipart filing needs a JSONL `file` part (one {\"prompt\": ...} a line)",
                           "ValidationError")
        records = _jsonl(await upload.read())
        filing: dict = {"name": form.get("name"), "method": form.get("method") or "o3", "records": records}
        retain = form.get("retain_file")
        if isinstance(retain, UploadFile):
            filing["retain"] = _jsonl(await retain.read())
        for key in ("config", "probes"):
            if form.get(key):
                filing[key] = _json_field(key, form.get(key))
        return filing
    if content_type not in ("application/json", ""):
        raise ApiError(415, f"send the filing as application/json or multipart/form-data, not {content_type!r}",
                       "UnsupportedMediaType")
    try:
        filing = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({type(exc).__name__}); send a JSON object "
                       "with name and records", "BadRequestError") from None
    if not isinstance(filing, dict):
        raise ApiError(400, "the request body must be a JSON object with name and records", "BadRequestError")
    return filing


def _jsonl(raw: bytes) -> list:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(422, "the uploaded file is not UTF-8 text; upload JSONL", "ValidationError") from None
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                raise ApiError(422, f"line {i} of the uploaded file is not JSON; one {{\"prompt\": ...}} object a "
                               "line", "ValidationError") from None
    return records


def _json_field(key: str, raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise ApiError(422, f"form field {key!r} must be JSON", "ValidationError") from None


def validate_filing(filing: dict, config, max_records: int) -> dict:
    """Every check a worker would fail on later, done now; returns the normalised filing."""
    unknown = sorted(set(filing) - set(FIELDS))
    if unknown:
        raise ApiError(422, f"unknown field(s) {unknown}; a filing has {', '.join(FIELDS)}", "ValidationError")
    name = filing.get("name")
    try:
        check_name(name)
    except UnlearnDataError as exc:
        raise ApiError(422, str(exc), "ValidationError") from None
    method = filing.get("method") or "o3"
    if method not in METHODS:
        raise ApiError(422, f"method {method!r} is not served by the control plane; use one of {list(METHODS)}",
                       "ValidationError")
    records = filing.get("records")
    if not isinstance(records, list) or not records:
        raise ApiError(422, "records must be a non-empty list of {\"prompt\": ..., \"completion\": ...} objects "
                       "(what to forget)", "ValidationError")
    retain = filing.get("retain")
    count = len(records) + len(retain if isinstance(retain, list) else [])
    if count > max_records:
        raise ApiError(413, f"{count} records; a filing takes at most {max_records} "
                       "(max_records)", "RequestTooLarge")
    if method in PATCH_CONFIGS:
        clean, retain, overrides, merged = _patch_filing(method, records, retain, filing.get("config"), config)
    else:
        if retain is not None:
            raise ApiError(422, "retain records are for method salun or iau; an o3 request keeps everything its "
                           "detector does not flag", "ValidationError")
        clean, overrides, merged = _o3_filing(records, filing.get("config"), config)
    probes = filing.get("probes") or {}
    if not isinstance(probes, dict) or (probes and set(probes) != {"forget", "retain"}):
        raise ApiError(422, "probes must be {\"forget\": [...], \"retain\": [...]}: held-out questions about what "
                       "is forgotten and questions the model must still answer, each {question, answer}",
                       "ValidationError")
    for key, items in probes.items():
        try:
            eval_set_from_records(key, items, f"probes.{key}")
        except ServeUnlearnError as exc:
            raise ApiError(422, f"probes: {exc}", "ValidationError") from None
    return {"name": name, "method": method, "records": clean, "retain": retain, "overrides": overrides,
            "probes": probes, "config": merged.model_dump(mode="json")}


def _o3_filing(records: list, overrides, config) -> tuple[list, dict, Any]:
    clean = []
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            rec = {"prompt": rec}
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise ApiError(422, f"records[{i}] needs a non-empty 'prompt' string", "ValidationError")
        if not isinstance(rec.get("completion", ""), str):
            raise ApiError(422, f"records[{i}].completion must be a string", "ValidationError")
        clean.append({"prompt": rec["prompt"], **({"completion": rec["completion"]} if "completion" in rec else {})})
    distinct = len({r["prompt"].strip() for r in clean})
    if distinct < MIN_DISTINCT_PROMPTS:
        raise ApiError(422, f"{distinct} distinct prompts; a forget request needs at least {MIN_DISTINCT_PROMPTS} "
                       "(its detector fits on 8 and calibrates on 4 held out): add paraphrases of what to forget",
                       "ValidationError")
    overrides = overrides or {}
    if not isinstance(overrides, dict):
        raise ApiError(422, "config must be an object of ForgetConfig keys (detector:, lora:)", "ValidationError")
    try:
        merged = forget_config(config, overrides)
    except ServeUnlearnError as exc:
        raise ApiError(422, str(exc), "ValidationError") from None
    return clean, overrides, merged


def lm_records(records: list, field: str) -> list[dict]:
    """Records as the CLI's JSONL data files hold them: ``{prompt, completion}`` (loss on the completion) or
    ``{text}``; other keys are dropped."""
    clean = []
    for i, rec in enumerate(records):
        if isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and rec["prompt"].strip():
            if not isinstance(rec.get("completion"), str):
                raise ApiError(422, f"{field}[{i}] needs a 'completion' string with its 'prompt' (the answer "
                               "to forget or keep)", "ValidationError")
            clean.append({"prompt": rec["prompt"], "completion": rec["completion"]})
        elif isinstance(rec, dict) and isinstance(rec.get("text"), str) and rec["text"].strip():
            clean.append({"text": rec["text"]})
        else:
            raise ApiError(422, f"{field}[{i}] must be {{\"prompt\": ..., \"completion\": ...}} or "
                           "{\"text\": ...}", "ValidationError")
    return clean


def _patch_filing(method: str, records: list, retain, overrides, config) -> tuple[list, list | None, dict, Any]:
    clean = lm_records(records, "records")
    if retain is not None and not isinstance(retain, list):
        raise ApiError(422, "retain must be a list of {\"prompt\", \"completion\"} or {\"text\"} records",
                       "ValidationError")
    retain = lm_records(retain, "retain") if retain else None
    if method == "iau" and not retain:
        raise ApiError(422, "method iau needs retain records: its one update is ∇[retain loss − forget loss]",
                       "ValidationError")
    overrides = overrides or {}
    allowed = sorted(PATCH_CONFIGS[method].model_fields)
    if not isinstance(overrides, dict):
        raise ApiError(422, f"config must be an object of {method} keys: {allowed}", "ValidationError")
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ApiError(422, f"unknown config key(s) {unknown} for method {method}; allowed: {allowed}",
                       "ValidationError")
    try:
        merged = method_config(method, overrides, yaml_path=getattr(config, f"{method}_config", None),
                               where=f"the {method} request's config")
    except ServeUnlearnError as exc:
        raise ApiError(422, str(exc), "ValidationError") from None
    return clean, retain, overrides, merged


def build_router(queue: ForgetQueue, publisher, config, auth: AdminAuth, gate_cache) -> APIRouter:
    router = APIRouter(tags=["forget requests"], dependencies=[Depends(auth)])

    @router.post("/v1/forget-requests", status_code=202, openapi_extra={"requestBody": {"required": True,
                 "content": {"application/json": {"schema": FILING_SCHEMA},
                             "multipart/form-data": {"schema": _MULTIPART}}}},
                 summary="File a forget request (trained in the background)")
    async def file_request(request: Request):
        filing = validate_filing(await parse_filing(request, config.max_body_bytes), config, config.max_records)
        job = await asyncio.to_thread(queue.file, filing["name"], filing["method"], filing["records"],
                                      config=filing["overrides"], probes=filing["probes"],
                                      retain=filing["retain"], max_attempts=config.worker.max_attempts)
        return JSONResponse({"id": job.id, "object": "forget_request", "status": job.status}, status_code=202,
                            headers={"Location": f"/v1/forget-requests/{job.id}"})

    @router.get("/v1/forget-requests", summary="List forget requests")
    async def list_requests(status: str | None = Query(None, description=f"one of {', '.join(STATUSES)}")):
        if status is not None and status not in STATUSES:
            raise ApiError(422, f"status {status!r} is not one of {list(STATUSES)}", "ValidationError")
        jobs = await asyncio.to_thread(queue.list, status)
        return {"object": "list", "data": [job_view(j) for j in jobs]}

    @router.get("/v1/forget-requests/{request_id}", summary="One forget request: status, progress, results")
    async def get_request(request_id: str):
        return job_view(await asyncio.to_thread(queue.get, request_id))

    @router.delete("/v1/forget-requests/{request_id}", summary="Retire: out of force everywhere, record kept")
    async def retire_request(request_id: str):
        return job_view(await asyncio.to_thread(publisher.retire, request_id))

    @router.post("/v1/forget-requests/{request_id}/retry", status_code=202, summary="Re-queue a failed request")
    async def retry_request(request_id: str):
        return job_view(await asyncio.to_thread(queue.retry, request_id))

    @router.post("/v1/gate/score", summary="The gate's weight of each text over the requests in force")
    async def score(body: ScoreBody):
        gate = await asyncio.to_thread(gate_cache)
        decisions = await asyncio.to_thread(gate.decide, body.texts)
        names = list(gate.request_names)
        return {"weights": [None if d.weight != d.weight else round(d.weight, 6) for d in decisions],
                "per_request": {n: [round(d.weights.get(n, 0.0), 6) for d in decisions] for n in names}}

    return router
