"""The processes the service runs beside its API: training workers (restarted when they die) and, with
``vllm.launch``, one vLLM server through ``serve-unlearn vllm``, stopped with the service."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from ..errors import ServerError
from ..serving.vllm.config import VllmServeConfig
from .config import ServeConfig

logger = logging.getLogger(__name__)


class Supervised:
    """One child process in its own process group; ``restart`` brings it back when it exits."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None, *, restart: bool):
        self.name, self.argv, self.env, self.restart = name, argv, env, restart
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env={**os.environ, **(self.env or {})}, start_new_session=True)
        logger.info("%s started (pid %d)", self.name, self.proc.pid)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        if self.proc is not None and not self.alive and self.restart:
            logger.warning("%s (pid %d) exited with %s; restarting it", self.name, self.proc.pid,
                           self.proc.returncode)
            self.restarts += 1
            self.start()

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


class Supervisor:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.children: list[Supervised] = []
        self.vllm: Supervised | None = None
        self.vllm_url: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        payload = self.config.model_dump_json()
        for i in range(self.config.worker.processes if self.config.forgets else 0):
            child = Supervised(f"worker {i}", [sys.executable, "-m", "serve_unlearn.service.worker",
                                                "--config-json", payload, "--parent-pid", str(os.getpid())],
                               restart=True)
            child.start()
            self.children.append(child)
        if self.config.vllm.launch:
            self._launch_vllm()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="serve-unlearn-supervisor")
        self._thread.start()

    def _launch_vllm(self) -> None:
        cfg = VllmServeConfig.load(self.config.vllm.config)
        argv = [sys.executable, "-m", "serve_unlearn.cli", "vllm", "--model", str(self.config.model),
                "--registry", str(self.config.registry)]
        if self.config.vllm.config:
            argv += ["--config", str(self.config.vllm.config)]
        if self.config.vllm.args:
            argv += ["--", *self.config.vllm.args]
        env = {"SERVE_UNLEARN_REGISTRY_DATABASE": self.config.registry_database} if (
            self.config.registry_database) else None
        self.vllm = Supervised("vLLM server", argv, env, restart=False)
        self.vllm.start()
        self.vllm_url = f"http://{cfg.host}:{cfg.port}"

    def wait_for_vllm(self) -> None:
        """Block until the launched server answers /health (ServerError when it exits or times out)."""
        if self.vllm is None:
            return
        deadline = time.monotonic() + self.config.vllm.start_timeout_s
        while time.monotonic() < deadline:
            if not self.vllm.alive:
                raise ServerError("the launched vLLM server exited during start; its log is above")
            try:
                with urllib.request.urlopen(f"{self.vllm_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise ServerError(f"the launched vLLM server did not answer /health within "
                          f"{self.config.vllm.start_timeout_s:.0f}s; raise vllm.start_timeout_s")

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            for child in self.children:
                child.check()

    def workers_alive(self) -> int:
        return sum(c.alive for c in self.children)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for child in [*self.children, *([self.vllm] if self.vllm else [])]:
            child.stop()
