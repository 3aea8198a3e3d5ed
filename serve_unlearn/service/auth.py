"""The deployment's admin token on the service's routes: the same header and variable as the vLLM middleware
(``x-serve-unlearn-admin`` or ``Authorization: Bearer``), compared in constant time; unset means nobody is admin."""

from __future__ import annotations

import hmac
import os

from fastapi import Request

from ..serving.vllm.contract import ADMIN_HEADER
from .errors import ApiError


class AdminAuth:
    """A FastAPI dependency: 401 without a token, 403 with a wrong one."""

    def __init__(self, token_env: str):
        self.token_env = token_env
        token = os.environ.get(token_env) or ""
        self._token = token.encode() if token else None

    def presented(self, request: Request) -> bytes | None:
        token = request.headers.get(ADMIN_HEADER)
        auth = request.headers.get("authorization", "")
        if not token and auth[:7].lower() == "bearer ":
            token = auth[7:].strip()
        return token.encode("utf-8", "replace") if token else None

    async def __call__(self, request: Request) -> None:
        presented = self.presented(request)
        if presented and self._token and hmac.compare_digest(presented, self._token):
            return
        status = 403 if presented else 401
        hint = (f"set ${self.token_env} on the service" if self._token is None else
                f"send the admin token in the {ADMIN_HEADER} header (or Authorization: Bearer)")
        raise ApiError(status, f"this route needs the deployment's admin token: {hint}",
                       "PermissionDenied" if status == 403 else "Unauthorized",
                       headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)
