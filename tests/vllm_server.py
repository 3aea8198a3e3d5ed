"""`serve-unlearn vllm` servers for tests: started as users start them, in their own process group, waited for
until /health answers, and stopped (the whole group) when the block ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def start(model, registry, config, log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "serve_unlearn.cli", "vllm", "--model", str(model),
                                 "--registry", str(registry), "--config", str(config)],
                                env={**os.environ, **(env or {})}, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except (urllib.error.URLError, OSError):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("vLLM did not start:\n" + log.read_text()[-4000:])
            time.sleep(1)


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def running(servers: list[tuple], env: dict | None = None) -> Iterator[list[subprocess.Popen]]:
    """Start every ``(model, registry, config, log, url)`` at once, wait until each answers, stop them all after."""
    procs = [start(model, registry, config, log, env) for model, registry, config, log, _ in servers]
    try:
        for proc, (_, _, _, log, url) in zip(procs, servers):
            wait_healthy(url, proc, log)
        yield procs
    finally:
        stop(procs)
