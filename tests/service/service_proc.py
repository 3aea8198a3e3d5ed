"""Run ``serve-unlearn serve`` as users do (a subprocess with real uvicorn on 127.0.0.1) and talk to it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ADMIN = "service-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, config: dict, folder: Path, *, env: dict | None = None):
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = folder / "serve.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.env = {**os.environ, "SERVE_UNLEARN_ADMIN_TOKEN": ADMIN, "TOKENIZERS_PARALLELISM": "false",
                    **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log = folder / "service.log"

    def start(self, timeout: float = 120) -> Service:
        log = open(self.log, "a")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen([sys.executable, "-m", "serve_unlearn.cli", "serve", "--config",
                                      str(self.config_path), "--port", str(self.port)], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the service exited:\n" + self.log.read_text()[-4000:])
            try:
                if self.call("GET", "/healthz", admin=False)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the service did not start:\n" + self.log.read_text()[-4000:])

    def kill(self, sig=signal.SIGKILL) -> None:
        """Kill the API process only (its workers are in their own sessions and live on, as after a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def call(self, method: str, path: str, payload=None, *, admin: bool | str = True, raw: bytes | None = None,
             headers: dict | None = None, timeout: float = 60):
        data = raw if raw is not None else (None if payload is None else json.dumps(payload).encode())
        h = {"content-type": "application/json"} if data is not None and raw is None else {}
        if admin:
            h["x-serve-unlearn-admin"] = ADMIN if admin is True else admin
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={**h, **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), _decode(r.read(), r.headers.get("content-type", ""))
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), _decode(e.read(), e.headers.get("content-type", ""))

    def declare_huge_body(self, path: str, size: int) -> tuple[int, dict]:
        """Send only the headers of a ``size``-byte JSON POST and read the answer: the service must refuse it from
        the declared length, without reading (or waiting for) the body."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         f"x-serve-unlearn-admin: {ADMIN}\r\nContent-Length: {size}\r\n\r\n".encode())
            sock.sendall(b'{"name": "huge", "records": ["' + b"a" * 65536)  # the start of the body only
            raw = b""
            while b"\r\n\r\n" not in raw or len(raw.split(b"\r\n\r\n", 1)[1]) < 2 or not raw.endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                raw += chunk
        head, body = raw.split(b"\r\n\r\n", 1)
        return int(head.split()[1]), json.loads(body)

    def wait_for(self, request_id: str, statuses: set[str], timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            status, _, body = self.call("GET", f"/v1/forget-requests/{request_id}")
            assert status == 200, body
            seen = body
            if body["status"] in statuses:
                return body
            time.sleep(0.3)
        raise AssertionError(f"{request_id} did not reach {statuses}: {seen}\n" + self.log.read_text()[-3000:])


def _decode(body: bytes, content_type: str):
    return json.loads(body) if content_type.startswith("application/json") else body.decode(errors="replace")
