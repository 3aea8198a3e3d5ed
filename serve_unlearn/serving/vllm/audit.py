"""The audit log: one JSON line per gated request, to a file or the ``serve_unlearn.audit`` logger.

It answers "which requests since T were served with forget request X in force, and how": request id, route,
per-forget-request weights, scale, adapter, routed generation, latency and outcome. It never holds the prompt;
with ``hash_salt_env`` set, a salted HMAC-SHA256 of the prompt's text lets an operator check whether a given
prompt was seen without the log revealing any prompt.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
from pathlib import Path

from pydantic import Field

from ...config import StrictConfig

logger = logging.getLogger("serve_unlearn.audit")


class AuditConfig(StrictConfig):
    enabled: bool = True
    path: str | None = None          # a JSON-lines file (appended); None: the serve_unlearn.audit logger (INFO)
    hash_salt_env: str | None = Field(None, min_length=1)  # env var holding the salt; unset: no prompt hashes


class AuditLog:
    def __init__(self, config: AuditConfig):
        self.config = config
        self._lock = threading.Lock()
        self._file = None
        salt = os.environ.get(config.hash_salt_env) if config.hash_salt_env else None
        self._salt = salt.encode() if salt else None
        if config.enabled and config.path:
            Path(config.path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(config.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - kept open

    def prompt_hash(self, texts: list[str]) -> str | None:
        if self._salt is None:
            return None
        return hmac.new(self._salt, "\x1f".join(texts).encode(), hashlib.sha256).hexdigest()

    def write(self, record: dict) -> None:
        if not self.config.enabled:
            return
        line = json.dumps({"ts": round(time.time(), 3), **record}, separators=(",", ":"), sort_keys=True)
        if self._file is None:
            logger.info(line)
            return
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
