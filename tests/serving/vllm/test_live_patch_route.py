"""The live-patch route without vLLM: a fake engine client records the calls, so the order (prepare on every
worker, pause, commit, prefix-cache reset, resume) and the refusals are checked in milliseconds."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from serve_unlearn.serving.vllm.live_patch import handle
from serve_unlearn.serving.vllm.worker_extension import block_prefix


class FakeEngine:
    def __init__(self, prepare=None, commit_raises=False, workers=2):
        self.calls = []
        self.prepare = prepare or {"ok": True, "patch_id": "p1", "tensors": 3, "blocks": ["model.layers.0."]}
        self.commit_raises = commit_raises
        self.workers = workers

    async def collective_rpc(self, method, args=()):
        self.calls.append(method)
        if method == "serve_unlearn_prepare":
            return [self.prepare] * self.workers
        if method == "serve_unlearn_commit":
            if self.commit_raises:
                raise RuntimeError("worker died")
            return [{"ok": True, "patches": [{"path": "/p", "patch_id": "p1"}]}] * self.workers
        if method == "serve_unlearn_patches":
            return [{"ok": True, "patches": []}] * self.workers
        return [{"ok": True}] * self.workers

    async def pause_generation(self, mode="abort", clear_cache=True):
        assert mode == "wait"
        self.calls.append("pause")

    async def resume_generation(self):
        self.calls.append("resume")

    async def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")


def _call(engine, body=None, method="POST"):
    scope = {"type": "http", "method": method, "path": "/serve-unlearn/patches",
             "app": SimpleNamespace(state=SimpleNamespace(engine_client=engine))}
    sent = []
    raw = json.dumps(body).encode() if body is not None else b""

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(handle(scope, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_apply_prepares_everywhere_then_pauses_commits_resets_and_resumes():
    engine = FakeEngine()
    status, body = _call(engine, {"action": "apply", "patch": "/p"})
    assert status == 200 and body["workers"] == 2 and body["patch_id"] == "p1"
    assert engine.calls == ["serve_unlearn_prepare", "pause", "serve_unlearn_commit", "reset_prefix_cache", "resume"]


@pytest.mark.parametrize("kind,status", [("PatchMismatchError", 409), ("PatchStateError", 409),
                                         ("PatchFormatError", 422)])
def test_a_refused_prepare_never_pauses_the_engine(kind, status):
    engine = FakeEngine(prepare={"ok": False, "error": {"type": kind, "message": "no"}})
    got, body = _call(engine, {"action": "apply", "patch": "/p"})
    assert got == status and body["error"] == {"message": "no", "type": kind, "code": status}
    assert engine.calls == ["serve_unlearn_prepare", "serve_unlearn_discard"]


def test_generation_resumes_when_the_load_fails():
    engine = FakeEngine(commit_raises=True)
    status, body = _call(engine, {"action": "revert", "patch": "/p"})
    assert status == 500 and body["error"]["type"] == "ServerError"
    assert engine.calls[-1] == "resume"


@pytest.mark.parametrize("body", [{"action": "merge", "patch": "/p"}, {"action": "apply"}, [1, 2]])
def test_bad_bodies_get_400(body):
    engine = FakeEngine()
    status, answer = _call(engine, body)
    assert status == 400 and answer["error"]["type"] == "BadRequestError" and engine.calls == []


def test_get_lists_and_a_worker_without_the_extension_is_501():
    assert _call(FakeEngine(), method="GET") == (200, {"patches": []})

    class Bare(FakeEngine):
        async def collective_rpc(self, method, args=()):
            raise AttributeError(f"'CPUWorker' object has no attribute '{method}'")

    status, body = _call(Bare(), {"action": "apply", "patch": "/p"})
    assert status == 501 and "--worker-extension-cls" in body["error"]["message"]


def test_block_prefix():
    assert block_prefix("model.layers.12.self_attn.q_proj.weight") == "model.layers.12."
    assert block_prefix("model.language_model.layers.3.mlp.up_proj.weight") == "model.language_model.layers.3."
    assert block_prefix("lm_head.weight") == "" and block_prefix("model.embed_tokens.weight") == ""
