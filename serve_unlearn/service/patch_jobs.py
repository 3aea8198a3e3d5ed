"""Forget requests filed with ``method: salun`` or ``iau``: a weight patch instead of a gated adapter.

Worker side (:func:`train_patch`): the patch is computed by the same code as ``serve-unlearn salun|iau``
(``patches.compute``) on the worker's float32 copy of the deployment's model, saved atomically as
``<registry>/patches/<filing id>/patch.safetensors`` in the checkpoint's dtype, optionally verified on the filing's
probes (the model with and without the patch), and recorded in the filing's result with a sha256 manifest.

Publisher side (:class:`LivePatches`): a ready patch is applied on every server through the live-patch route
(``POST /serve-unlearn/patches``); when one refuses, it is reverted where it was applied and the filing fails with
that server's reason. The servers' lists of patches are compared with the registry's in-force patches (in the
order they were put in force) on every poll, so a server started or restarted later gets them, and a retired
patch whose revert did not reach a server is reverted there later. The patch file is read by each server's
workers at the path the service sees: the registry folder must be on the servers' host too (or a shared
filesystem mounted at the same path).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from ..errors import ServerError, ServeUnlearnError
from ..patches.compute import METHODS
from ..registry import ForgetQueue, ForgetRegistry, Job
from ..registry.integrity import folder_manifest, verify_tree
from ..serving.vllm.contract import PATCHES_PATH
from ..serving.vllm.hotload import call_server
from ..serving.vllm.live_patch import change_on_server

logger = logging.getLogger(__name__)
PATCHES_FOLDER = "patches"
PATCH_FILE = "patch.safetensors"
PATCH_METHODS = tuple(METHODS)  # salun, iau


def train_patch(worker, job: Job, submission: dict, on_progress) -> dict:
    """Compute, save and (with probes) verify the filing's patch; the filing's result. The folder is removed
    again when anything fails (including a retire while it trains, raised by ``on_progress``)."""
    from ..patches.compute import compute_patch, lm_task, method_config
    from ..patches.inputs import checkpoint_dtype

    cfg = worker.config
    config = method_config(job.method, job.spec.get("config") or {}, yaml_path=getattr(cfg, f"{job.method}_config"),
                           where=f"the {job.method} request's config")
    rel = f"{PATCHES_FOLDER}/{job.id}"
    folder = worker.registry.root / rel
    shutil.rmtree(folder, ignore_errors=True)  # an earlier attempt's
    try:
        dtype = checkpoint_dtype(cfg.model)
        t0 = time.perf_counter()
        patch = compute_patch(job.method, worker.model, lm_task(cfg.model, getattr(config, "forget_target", "refusal")),
                              submission["records"], submission.get("retain"), config, patch_dtype=dtype,
                              progress=False, on_step=on_progress, base_model=str(Path(cfg.model).resolve()),
                              key_convention="hf-transformers")
        train_s = round(time.perf_counter() - t0, 2)
        path = patch.save(folder / PATCH_FILE)  # temp file + rename
        result = {"patch": f"{rel}/{PATCH_FILE}", "patch_id": patch.patch_id, "tensors": len(patch.tensor_names),
                  "bytes": path.stat().st_size, "train_s": train_s}
        probes = submission.get("probes") or {}
        if probes.get("forget") and probes.get("retain"):
            on_progress("verification", 0, 1)
            result["verification"] = _verify(worker, job, path, probes, dtype)
        result["artifacts"] = folder_manifest(folder, rel)
        return result
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _verify(worker, job: Job, path: Path, probes: dict, dtype) -> dict:
    import torch

    from ..eval.staged import verify_patch

    model = worker.model
    if dtype != torch.float32:  # the patch is in the checkpoint's dtype: verify it on the model as served
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(worker.config.model, dtype=dtype)
    return verify_patch(path, job.name, probes, model=model, tokenizer=worker.tokenizer,
                        policy=worker.config.evidence, request_id=job.id, extra={"filing": job.id})


class LivePatches:
    """The registry's in-force patches, kept in force on every server (the publisher calls it under its lock)."""

    def __init__(self, registry: ForgetRegistry, queue: ForgetQueue, servers: list[str], *,
                 api_key: str | None = None, timeout_s: float = 600.0):
        self.registry, self.queue, self.servers = registry, queue, [s.rstrip("/") for s in servers]
        self.api_key, self.timeout_s = api_key, timeout_s
        self.errors: dict[str, str] = {}  # server -> why its patches differ from the registry's
        self.dirty = False  # a change did not reach every server: reconcile on the next poll

    def in_force(self) -> list[Job]:
        """In-force patch filings, in the order they were put in force (the stacking order on every server)."""
        jobs = [j for j in self.queue.list("in_force") if j.method in PATCH_METHODS]
        return sorted(jobs, key=lambda j: j.timings.get("in_force", ""))

    def path(self, job: Job) -> str:
        """The patch file as the servers' workers read it (absolute: the same path on their host)."""
        return os.path.abspath(self.registry.root / job.result["patch"])

    def check(self, job: Job) -> None:
        """The file is the one the worker recorded (sha256 manifest); ArtifactError otherwise."""
        verify_tree(self.registry.root, job.result["patch"], job.result.get("artifacts") or {},
                    f"forget request {job.name!r}")

    def listed(self, server: str) -> list[str]:
        """The patches in force on ``server``, in order (``GET /serve-unlearn/patches``)."""
        import json

        status, text = call_server(server + PATCHES_PATH, api_key=self.api_key, timeout=10)
        if status != 200:
            raise ServerError(f"{server} did not list its patches (HTTP {status}): {text[:300]}")
        return [p["path"] for p in json.loads(text).get("patches", [])]

    def _ours(self, paths: list[str]) -> list[str]:
        root = os.path.abspath(self.registry.root / PATCHES_FOLDER) + os.sep
        return [p for p in paths if p.startswith(root)]

    def _change(self, server: str, action: str, path: str) -> None:
        report = change_on_server(server, action, path, api_key=self.api_key, timeout=self.timeout_s)
        logger.info("%s %s on %s in %.2f s", action, path, server, report.get("seconds", {}).get("total", 0.0))

    def put_in_force(self, job: Job) -> None:
        """Apply ``job``'s patch on every server, all or nothing: when one refuses, it is reverted where it was
        applied and ServerError says which server refused and why."""
        self.check(job)
        path, done = self.path(job), []
        for server in self.servers:
            try:
                if path not in self.listed(server):
                    self._change(server, "apply", path)
                    done.append(server)
            except ServeUnlearnError as exc:
                self.dirty = True  # the next reconcile reverts what is left anywhere (e.g. from a crashed attempt)
                undone = self._undo(done, path)
                raise ServerError(f"{server} refused the patch ({exc}); reverted on {undone} of {len(done)} "
                                  "server(s) that had applied it, so it is in force nowhere") from exc

    def _undo(self, servers: list[str], path: str) -> int:
        undone = 0
        for server in reversed(servers):
            try:
                self._change(server, "revert", path)
                undone += 1
            except ServeUnlearnError as exc:
                logger.warning("reverting %s on %s failed (retried on the next poll): %s", path, server, exc)
                self.errors[server] = f"revert of {path} failed: {exc}"
                self.dirty = True
        return undone

    def reconcile(self) -> None:
        """Bring each server's list of our patches to the registry's: keep the common prefix, revert the rest
        (last first), apply the missing ones in order. Other patches (applied by hand) are left alone."""
        jobs = self.in_force()
        want = [self.path(j) for j in jobs]
        by_path = dict(zip(want, jobs))
        for server in self.servers:
            try:
                have = self._ours(self.listed(server))
                keep = 0
                while keep < min(len(have), len(want)) and have[keep] == want[keep]:
                    keep += 1
                for path in reversed(have[keep:]):
                    self._change(server, "revert", path)
                for path in want[keep:]:
                    self.check(by_path[path])
                    self._change(server, "apply", path)
                self.errors.pop(server, None)
            except ServeUnlearnError as exc:
                if self.errors.get(server) != str(exc):
                    logger.warning("the patches of %s differ from the registry's: %s", server, exc)
                self.errors[server] = str(exc)
        self.dirty = bool(self.errors)
