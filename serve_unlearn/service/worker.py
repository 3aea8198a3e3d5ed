"""The training worker: claims queued filings from the registry and trains them, in its own process.

``python -m serve_unlearn.service.worker --config FILE`` (the service starts these; ``serve-unlearn worker``
runs one on another host). Per O3 filing: detector first, published at once as a guard (the filing is
``guarded``: middlewares refuse what it flags), then the unlearning LoRA, then the request is registered
``ready``; the service's publisher puts it in force. A SalUn/IAU filing becomes a weight patch in the registry
folder (``patch_jobs``), then ``ready``. Progress and a heartbeat go to the queue row; a row that is retired
meanwhile stops the training at the next step. A user's data error fails the filing at once; any other error
costs one attempt (re-queued until ``max_attempts``), as does a worker killed mid-training.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

from ..errors import ServeUnlearnError, UnlearnConfigError, UnlearnDataError
from ..eval.staged import EvidenceShortfall
from ..registry import ForgetQueue, ForgetRegistry, Job
from ..registry.integrity import folder_manifest
from .config import ServeConfig
from .patch_jobs import PATCH_METHODS, train_patch

logger = logging.getLogger(__name__)
GUARDS_FOLDER = "guards"


class Withdrawn(Exception):
    """The filing was retired (or re-queued by another process) while this worker trained it."""


def forget_config(config: ServeConfig, overrides: dict):
    """The ForgetConfig of a filing: the service's ``forget_config`` file with the filing's keys on top."""
    from ..adapters.forget_request import ForgetConfig

    base = {}
    if config.forget_config is not None:
        import yaml

        base = yaml.safe_load(Path(config.forget_config).read_text()) or {}
    merged = {k: dict(base.get(k) or {}) for k in ("detector", "lora")}
    for key, value in (overrides or {}).items():
        if key in merged and isinstance(value, dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return ForgetConfig.validate_dict(merged, where="the forget request's config")


class Worker:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.registry = ForgetRegistry(config.registry, database=config.registry_database)
        self.queue = ForgetQueue(self.registry, lease_ttl=config.worker.lease_ttl_s)
        self.model = self.tokenizer = None
        self.stopping = threading.Event()

    def run(self, *, max_jobs: int | None = None) -> int:
        self._load_model()  # before the first filing: its time is not the filer's
        done = 0
        while not self.stopping.is_set() and (max_jobs is None or done < max_jobs):
            job = self.queue.claim()
            if job is None:
                self.stopping.wait(self.config.worker.poll_s)
                continue
            self.train(job)
            done += 1
        return done

    def _load_model(self) -> None:
        if self.model is None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.config.model)
            self.model = AutoModelForCausalLM.from_pretrained(self.config.model, dtype=torch.float32)

    def train(self, job: Job) -> None:
        from ..adapters.forget_request import forget

        logger.info("training forget request %s (%s), attempt %d/%d", job.name, job.id, job.attempts,
                    job.max_attempts)
        beating = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job.id, beating), daemon=True)
        beat.start()
        guard_root = self.registry.root / GUARDS_FOLDER / job.id
        try:
            submission = self.queue.submission(job)
            self._load_model()

            def on_progress(phase: str, step: int, total: int) -> None:
                if not self.queue.beat(job.id, {"phase": phase, "step": step, "total": total}):
                    raise Withdrawn(job.id)

            if job.method in PATCH_METHODS:
                result = train_patch(self, job, submission, on_progress)
                if not self.queue.move(job.id, "ready", expect=("training",), result=result):
                    logger.info("forget request %s was retired as its patch was saved", job.name)
                return
            config = forget_config(self.config, job.spec.get("config") or {})

            def on_detector(folder: Path) -> None:
                shutil.rmtree(guard_root, ignore_errors=True)
                shutil.copytree(folder, guard_root / "detector")
                rel = f"{GUARDS_FOLDER}/{job.id}/detector"
                guard = {"path": rel, "files": folder_manifest(guard_root / "detector", rel)}
                if not self.queue.move(job.id, "guarded", expect=("training",), result={"guard": guard}):
                    raise Withdrawn(job.id)

            evidence: dict = {}

            def before_ready(staging) -> None:
                probes = submission.get("probes") or {}
                if probes.get("forget") and probes.get("retain"):
                    on_progress("verification", 0, 1)
                    evidence.update(self._verify(job, staging, probes))

            t0 = time.perf_counter()
            request = forget(self.registry, job.name, submission["records"], model=self.model,
                             tokenizer=self.tokenizer, config=config, progress=False, on_progress=on_progress,
                             on_detector=on_detector, before_ready=before_ready)
            result = {"request_id": request.id, "version": request.version, "train_s": round(
                time.perf_counter() - t0, 2), "artifacts": {k: v for k, v in (request.files or {}).items()},
                **({"verification": evidence} if evidence else {})}
            if not self.queue.move(job.id, "ready", expect=("guarded", "training"), result=result):
                # retired while it finished: take the registered request out again
                self.registry.retire(request.id)
        except Withdrawn:
            logger.info("forget request %s was withdrawn during training", job.name)
        except EvidenceShortfall as exc:
            self._fail(job, str(exc), retry=False, result={"verification": exc.summary})
        except (UnlearnDataError, UnlearnConfigError) as exc:  # the filing itself is wrong: retrying cannot help
            self._fail(job, f"{type(exc).__name__}: {exc}", retry=False)
        except Exception as exc:
            logger.exception("forget request %s failed", job.name)
            self._fail(job, f"{type(exc).__name__}: {exc}", retry=True)
        finally:
            beating.set()
            beat.join()
            current = self._status(job.id)
            if current not in ("guarded", "ready"):
                shutil.rmtree(guard_root, ignore_errors=True)

    def _verify(self, job: Job, staging, probes: dict) -> dict:
        from ..eval.staged import verify_staged
        from ..serving.vllm.config import VllmServeConfig

        return verify_staged(self.registry, staging, job.name, probes, model=self.model, tokenizer=self.tokenizer,
                             policy=self.config.evidence, gate_config=VllmServeConfig.load(self.config.vllm.config).gate,
                             extra={"filing": job.id})

    def _status(self, job_id: str) -> str | None:
        try:
            return self.queue.get(job_id).status
        except ServeUnlearnError:
            return None

    def _fail(self, job: Job, error: str, *, retry: bool, result: dict | None = None) -> None:
        again = retry and job.attempts < job.max_attempts
        status = "queued" if again else "failed"
        note = "; re-queued" if again else ("" if not retry else f"; {job.max_attempts} attempts spent")
        self.queue.move(job.id, status, expect=("training", "guarded"), result={"guard": None, **(result or {})},
                        error=error + note)

    def _beat(self, job_id: str, stop: threading.Event) -> None:
        interval = max(1.0, self.config.worker.lease_ttl_s / 6)
        while not stop.wait(interval):
            try:
                self.queue.beat(job_id)
            except ServeUnlearnError as exc:
                logger.warning("heartbeat of %s failed: %s", job_id, exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="serve-unlearn worker", description=__doc__.split("\n")[0])
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--config", help="the service's YAML config (configs/serve.yaml)")
    given.add_argument("--config-json", help="the same, as JSON (how the service starts its workers)")
    parser.add_argument("--max-jobs", type=int, default=None, help="stop after this many filings")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the service) is gone; the filing "
                        "in training is then re-queued")
    args = parser.parse_args(argv)
    if args.parent_pid:
        threading.Thread(target=_exit_with_parent, args=(args.parent_pid,), daemon=True).start()
    config = (ServeConfig.from_yaml(args.config) if args.config else
              ServeConfig.validate_dict(json.loads(args.config_json), where="--config-json"))
    return run_worker(config, max_jobs=args.max_jobs)


def _exit_with_parent(pid: int) -> None:
    while os.getppid() == pid:
        time.sleep(1.0)
    logger.warning("the service (pid %d) is gone; this worker exits", pid)
    os._exit(0)


def run_worker(config: ServeConfig, *, max_jobs: int | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(process)d %(levelname)s %(message)s")
    if config.worker.torch_threads:
        import torch

        torch.set_num_threads(config.worker.torch_threads)
    worker = Worker(config)
    signal.signal(signal.SIGTERM, lambda *_: worker.stopping.set())
    logger.info("worker %d polling %s", os.getpid(), config.registry)
    worker.run(max_jobs=max_jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
