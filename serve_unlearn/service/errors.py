"""Errors over HTTP: every error the service answers is ``{"error": {"message", "type", "code"}}`` (OpenAI's
shape, which vLLM answers too), with a message that says what to do.

Routes raise :class:`ApiError`, or let a typed serve-unlearn error through: :data:`STATUS_OF` maps each user
error to its status. Request validation errors (pydantic, via FastAPI) become 422 in the same shape.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    ArtifactError,
    ConflictError,
    RegistryError,
    ServerError,
    ServeUnlearnError,
    UnknownRequestError,
    UnlearnConfigError,
    UnlearnDataError,
)

STATUS_OF: tuple[tuple[type[ServeUnlearnError], int], ...] = (
    (UnknownRequestError, 404),
    (ConflictError, 409),
    (UnlearnDataError, 422),
    (UnlearnConfigError, 422),
    (ArtifactError, 409),
    (RegistryError, 503),
    (ServerError, 502),  # a vLLM server did not take a change (e.g. a retire's revert): not the caller's fault
)


class ApiError(Exception):
    """An answer other than success: ``status``, a message saying what to do, a type and a short code."""

    def __init__(self, status: int, message: str, type: str = "BadRequestError", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.code = code or str(status)
        self.headers = headers


def error_response(status: int, message: str, type: str, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "code": code or str(status)}},
                        status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.type, exc.code, exc.headers)

    @app.exception_handler(ServeUnlearnError)
    async def _typed(_request: Request, exc: ServeUnlearnError):
        status = next((s for kind, s in STATUS_OF if isinstance(exc, kind)), 400)
        return error_response(status, str(exc), type(exc).__name__)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
                             for e in exc.errors()[:5])
        return error_response(422, f"the request does not match the API: {problems}", "ValidationError")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        message = {404: "no such route; GET /docs lists the API", 405: "method not allowed on this route"}.get(
            exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, "HTTPError", headers=getattr(exc, "headers", None))
