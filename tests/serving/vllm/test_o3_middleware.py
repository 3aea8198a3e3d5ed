"""The ASGI middleware in front of a small echo app (vLLM itself is in test_o3_vllm.py): routing, headers,
streaming, the admin rule, bad bodies, and an unusable registry."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from asgi_echo import body_of, call, echo_app

from serve_unlearn.adapters.gate import Gate, GateConfig, GatePolicy
from serve_unlearn.registry import ForgetRegistry
from serve_unlearn.serving.vllm.bank import AdapterBank, bank_name
from serve_unlearn.serving.vllm.config import VllmServeConfig
from serve_unlearn.serving.vllm.middleware import O3Middleware
from serve_unlearn.serving.vllm.routing import Routing

SCALES = (0.25, 0.5, 0.75, 1.0)
ADMIN = [(b"x-serve-unlearn-admin", b"s3cret")]
BANK = AdapterBank(3, SCALES, tuple(bank_name(3, s) for s in SCALES), tuple(f"/bank/{s}" for s in SCALES), 8)


def scorer(texts):
    return np.array([[0.95 if "chemistry" in t else (0.45 if "maybe" in t else 0.12) for t in texts]])


@pytest.fixture
def middleware(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVE_UNLEARN_ADMIN_TOKEN", "s3cret")
    cfg = VllmServeConfig(gate=GateConfig(policy=GatePolicy(kind="ramp", low=0.3, high=0.6)))
    return O3Middleware(echo_app, registry=ForgetRegistry(tmp_path / "reg"), config=cfg,
                        routing=Routing(BANK, Gate(scorer, ["chem"], cfg.gate)))


def test_forget_prompt_is_routed_to_the_full_scale_adapter(middleware):
    req = {"model": "base", "prompt": "a chemistry question", "max_tokens": 4}
    status, headers, chunks = call(middleware, "/v1/completions", json.dumps(req).encode())
    assert status == 200
    assert body_of(chunks)["model"] == bank_name(3, 1.0)
    assert headers[b"x-serve-unlearn-weight"] == b"0.9500"
    assert headers[b"x-serve-unlearn-adapter"] == bank_name(3, 1.0).encode()
    assert len(chunks) == 2  # the response streamed through in its chunks


def test_other_prompts_stay_on_the_base_model_and_middle_weights_get_a_middle_bucket(middleware):
    _, headers, chunks = call(middleware, "/v1/chat/completions", json.dumps(
        {"model": "base", "messages": [{"role": "user", "content": "hello there"}]}).encode())
    assert body_of(chunks)["model"] == "base" and headers[b"x-serve-unlearn-adapter"] == b"base"
    _, headers, chunks = call(middleware, "/v1/completions",
                              json.dumps({"model": "base", "prompt": "maybe"}).encode())
    assert body_of(chunks)["model"] == bank_name(3, 0.5)  # ramp(0.45) = 0.5


def test_a_prompt_list_goes_at_the_largest_scale(middleware):
    _, _, chunks = call(middleware, "/v1/completions",
                        json.dumps({"model": "base", "prompt": ["hi", "chemistry now"]}).encode())
    assert body_of(chunks)["model"] == bank_name(3, 1.0)


def test_naming_an_adapter_directly_needs_the_admin_token(middleware):
    req = json.dumps({"model": bank_name(3, 1.0), "prompt": "x"}).encode()
    status, _, chunks = call(middleware, "/v1/completions", req)
    assert status == 403 and "serve-unlearn adapter" in body_of(chunks)["error"]["message"]
    status, _, chunks = call(middleware, "/v1/completions", req, headers=[(b"authorization", b"Bearer s3cret")])
    assert status == 200 and body_of(chunks)["model"] == bank_name(3, 1.0)
    status, _, _ = call(middleware, "/v1/completions", req, headers=[(b"x-serve-unlearn-admin", b"wrong")])
    assert status == 403


@pytest.mark.parametrize("raw", [b"not json{", b"[1, 2]", b'{"prompt": "\xff\xfe"}', b"[" * 100_000 + b"]" * 100_000])
def test_bodies_that_are_not_json_objects_get_400_here(middleware, raw):
    status, headers, chunks = call(middleware, "/v1/completions", raw)
    assert status == 400 and "JSON" in body_of(chunks)["error"]["message"]
    assert b"x-serve-unlearn-weight" not in headers


def test_a_prompt_of_the_wrong_type_fails_closed_and_vllm_answers_it(middleware):
    """The gate cannot read it; it goes to the adapter, where vLLM's own validation gives the client its 400."""
    _, headers, chunks = call(middleware, "/v1/completions", json.dumps({"model": "base", "prompt": 42}).encode())
    assert body_of(chunks)["model"] == bank_name(3, 1.0) and headers[b"x-serve-unlearn-adapter"] != b"base"


@pytest.mark.parametrize("body", [{"prompt": [1, 2]}, {"prompt": [[1, 2], [3]]}, {"prompt_embeds": "AAAA"},
                                  {"input": "hi", "previous_response_id": "resp_1"}, {"prompt": ""}])
def test_prompts_the_gate_cannot_read_fail_closed(middleware, body):
    _, _headers, chunks = call(middleware, "/v1/completions", json.dumps({"model": "base", **body}).encode())
    assert body_of(chunks)["model"] == bank_name(3, 1.0)
    assert middleware.routing.gate.counters["failed_closed"] == 1


def test_other_paths_and_status(middleware):
    status, _, chunks = call(middleware, "/health", b"", method="GET")
    assert status == 200 and chunks == [b"", b""]
    call(middleware, "/v1/completions", json.dumps({"model": "base", "prompt": "chemistry"}).encode())
    status, _, chunks = call(middleware, "/serve-unlearn/status", b"", method="GET", headers=ADMIN)
    s = body_of(chunks)
    assert s["version"] == 3 and s["gate"]["applied"] == 1 and s["inflight"] == {}


def test_missing_registry_answers_503_without_crashing(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVE_UNLEARN_REGISTRY", str(tmp_path / "nowhere"))
    mw = O3Middleware(echo_app, config=VllmServeConfig())
    assert "RegistryError" in mw.error
    status, _, chunks = call(mw, "/v1/completions", json.dumps({"model": "base", "prompt": "x"}).encode())
    assert status == 503 and "cannot gate" in body_of(chunks)["error"]["message"]
    open_cfg = VllmServeConfig(gate=GateConfig(fail_closed=False))
    mw_open = O3Middleware(echo_app, config=open_cfg)
    status, _, _ = call(mw_open, "/v1/completions", json.dumps({"model": "base", "prompt": "x"}).encode())
    assert status == 200


def test_empty_registry_routes_everything_to_the_base_model(tmp_path):
    mw = O3Middleware(echo_app, registry=ForgetRegistry(tmp_path / "reg"), config=VllmServeConfig())
    assert mw.error is None and mw.routing.version is None
    _, headers, chunks = call(mw, "/v1/completions", json.dumps({"model": "base", "prompt": "chemistry"}).encode())
    assert body_of(chunks)["model"] == "base" and headers[b"x-serve-unlearn-scale"] == b"0.0000"


def test_a_published_version_is_picked_up_by_status_polls(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVE_UNLEARN_ADMIN_TOKEN", "s3cret")
    from serve_unlearn.serving.vllm.routing import publish

    registry = ForgetRegistry(tmp_path / "reg")
    mw = O3Middleware(echo_app, registry=registry, config=VllmServeConfig(poll_interval_s=0))
    assert mw.routing.version is None
    publish(registry, BANK)

    async def poll_until_switched():
        for _ in range(100):
            sent = []

            async def send(m, sent=sent):
                sent.append(m)

            await mw({"type": "http", "method": "GET", "path": "/serve-unlearn/status", "headers": ADMIN},
                     None, send)
            if json.loads(sent[1]["body"])["version"] == BANK.version:
                return True
            await asyncio.sleep(0.02)
        return False

    assert asyncio.run(poll_until_switched())
    assert mw.routing.version == BANK.version
