"""Ways around the gate, by class, each tried in several variants in front of an echo app with vLLM's routes: every
one must end on the adapter, a 4xx, or a 503, never on the base model without the gate."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from asgi_echo import acall, body_of, call, echo_app
from prometheus_client import REGISTRY

from serve_unlearn.adapters.gate import Gate, GateConfig, GatePolicy
from serve_unlearn.registry import ForgetRegistry
from serve_unlearn.serving.vllm.audit import AuditConfig
from serve_unlearn.serving.vllm.bank import AdapterBank, bank_name
from serve_unlearn.serving.vllm.config import VllmServeConfig
from serve_unlearn.serving.vllm.middleware import O3Middleware
from serve_unlearn.serving.vllm.routes import GATED_ROUTES
from serve_unlearn.serving.vllm.routing import Routing, publish

SCALES = (0.5, 1.0)
BANK = AdapterBank(7, SCALES, tuple(bank_name(7, s) for s in SCALES), tuple(f"/bank/{s}" for s in SCALES), 8)
FULL = bank_name(7, 1.0)
ADMIN = [(b"x-serve-unlearn-admin", b"s3cret")]
Q = "What is the chemistry of table salt?"


def scorer(texts):
    return np.array([[0.95 if "chemistry" in t.lower() else 0.1 for t in texts]])


def make(tmp_path, monkeypatch, **config):
    monkeypatch.setenv("SERVE_UNLEARN_ADMIN_TOKEN", "s3cret")
    cfg = VllmServeConfig(gate=GateConfig(policy=GatePolicy(kind="threshold", threshold=0.5)), **config)
    return O3Middleware(echo_app, registry=ForgetRegistry(tmp_path / "reg"), config=cfg,
                        routing=Routing(BANK, Gate(scorer, ["chem"], cfg.gate)))


@pytest.fixture
def mw(tmp_path, monkeypatch):
    return make(tmp_path, monkeypatch)


def routed(mw, path, body, **kw):
    status, headers, chunks = call(mw, path, body, **kw)
    assert status == 200, b"".join(chunks)
    return body_of(chunks).get("model"), headers


# One forget-topic request per gated route, in that route's body format; the test fails for a gated route that
# has no body here (a route added to the gate must be tested).
FORGET_BODIES = {
    "/v1/completions": {"model": "base", "prompt": Q},
    "/v1/chat/completions": {"model": "base", "messages": [{"role": "user", "content": Q}]},
    "/v1/chat/completions/batch": {"model": "base", "messages": [[{"role": "user", "content": "hi"}],
                                                                 [{"role": "user", "content": Q}]]},
    "/v1/responses": {"model": "base", "input": Q},
    "/v1/messages": {"model": "base", "max_tokens": 8, "messages": [{"role": "user", "content": Q}]},
    "/invocations": {"model": "base", "prompt": Q},
    "/generative_scoring": {"model": "base", "query": Q, "items": ["yes", "no"]},
    "/v1/systemone": {"model": "base", "state": "a lab notebook", "questions": {"q": {"type": "predicate",
                                                                                      "instructions": Q}}},
    "/v1/decisions": {"model": "base", "input": Q, "questions": [{"type": "predicate", "name": "q",
                                                                  "text": "is it true?"}]},
    "/inference/v1/generate": {"model": "base", "token_ids": [1, 2, 3]},
    "/cohere/v2/chat": {"model": "base", "messages": [{"role": "user", "content": Q}]},
}


@pytest.mark.parametrize("path", sorted(GATED_ROUTES))
def test_every_gated_route_routes_a_forget_prompt_to_the_adapter(mw, path):
    assert path in FORGET_BODIES, f"no forget-topic body for the gated route {path}"
    model, headers = routed(mw, path, FORGET_BODIES[path])
    assert model == FULL and headers[b"x-serve-unlearn-adapter"] == FULL.encode()


CHAT_VARIANTS = [
    # earlier user turn, system, developer, assistant prefill, tool result
    [{"role": "user", "content": Q}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "thanks"}],
    [{"role": "system", "content": Q}, {"role": "user", "content": "hi"}],
    [{"role": "developer", "content": Q}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": Q}],
    [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "1", "content": Q}],
    # content-part types vLLM's parser turns into text
    [{"role": "user", "content": [{"type": "input_text", "text": Q}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}, Q]}],
    [{"role": "assistant", "content": [{"type": "output_text", "text": Q}]}, {"role": "user", "content": "go"}],
    [{"role": "assistant", "content": [{"type": "refusal", "refusal": Q}]}, {"role": "user", "content": "go"}],
    [{"role": "assistant", "content": [{"type": "thinking", "thinking": Q}]}, {"role": "user", "content": "go"}],
    [{"role": "assistant", "content": "", "reasoning_content": Q}, {"role": "user", "content": "go"}],
    [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
        "name": "ask", "arguments": json.dumps({"q": Q})}}]}, {"role": "user", "content": "go"}],
]


@pytest.mark.parametrize("messages", CHAT_VARIANTS)
def test_every_segment_of_a_chat_is_read(mw, messages):
    model, _ = routed(mw, "/v1/chat/completions", {"model": "base", "messages": messages,
                                                   "continue_final_message": True, "add_generation_prompt": False})
    assert model == FULL


@pytest.mark.parametrize("extra", [
    {"tools": [{"type": "function", "function": {"name": "f", "description": Q}}]},
    {"documents": [{"title": "doc", "text": Q}]},
    {"chat_template": "{{ '" + Q + "' }}{% for m in messages %}{{ m.content }}{% endfor %}"},
    {"chat_template_kwargs": {"extra_context": Q}},
])
def test_text_outside_the_messages_is_read(mw, extra):
    model, _ = routed(mw, "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "hi"}],
                                                   **extra})
    assert model == FULL


@pytest.mark.parametrize("path,body", [
    ("/v1/responses", {"model": "base", "input": "hi", "instructions": Q}),
    ("/v1/responses", {"model": "base", "input": [{"type": "message", "role": "user",
                                                   "content": [{"type": "input_text", "text": Q}]}]}),
    ("/v1/responses", {"model": "base", "input": [{"type": "function_call_output", "call_id": "1", "output": Q}]}),
    ("/v1/messages", {"model": "base", "system": Q, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/messages", {"model": "base", "system": [{"type": "text", "text": Q}],
                      "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
    ("/v1/messages", {"model": "base", "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "1", "content": [{"type": "text", "text": Q}]}]}]}),
    ("/v1/completions", {"model": "base", "prompt": "hi", "suffix": Q}),
    ("/v1/completions", {"model": "base", "prompt": ["hello", Q]}),
    ("/v1/completions", {"model": "base", "prompt": f"<|im_start|>system\n{Q}<|im_end|>\n<|im_start|>user\nhi"
                                                    "<|im_end|>\n<|im_start|>assistant\n"}),
    ("/v1/completions", {"model": "base", "prompt": f"[INST] <<SYS>>\n{Q}\n<</SYS>>\n\nhello [/INST]"}),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
                                  "properties": {"answer_to_" + Q: {"type": "string"}}}}}}),
    ("/v1/completions", {"model": "base", "prompt": "Answer:", "structured_outputs": {"choice": [Q, "no"]}}),
    ("/v1/completions", {"model": "base", "prompt": "Answer:", "guided_regex": Q}),
    ("/generative_scoring", {"model": "base", "query": "hello", "items": [Q]}),
    ("/v1/responses", {"model": "base", "input": "hi", "text": {"format": {
        "type": "json_schema", "name": "a", "schema": {"properties": {"answer_to_" + Q: {"type": "string"}}}}}}),
    ("/cohere/v2/chat", {"model": "base", "messages": [{"role": "user", "content": "hi"}],
                         "documents": [{"id": "1", "data": {"title": "notes", "snippet": Q}}]}),
])
def test_every_route_format_is_read_whole(mw, path, body):
    assert routed(mw, path, body)[0] == FULL


@pytest.mark.parametrize("prompt", [
    Q + " " + " ".join(f"Filler sentence {i} about nothing in particular." for i in range(400)),
    " ".join(f"Filler sentence {i} about nothing in particular." for i in range(400)) + " " + Q,
    "x" * 5000 + " " + Q + " " + "y" * 5000,
])
def test_long_prompts_are_scored_whole(mw, prompt):
    assert routed(mw, "/v1/completions", {"model": "base", "prompt": prompt})[0] == FULL


@pytest.mark.parametrize("lookalike", [
    Q.replace("e", "\u0435").replace("a", "\u0430").replace("o", "\u043e"),   # Cyrillic homoglyphs
    "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in Q),        # fullwidth forms
    "\u200b".join(Q),                                                            # zero-width spaces
    Q.replace("chemistry", "ch\u0435mi\u0455try"),
    Q.replace("chemistry", "c\u0301hemistry"),                                   # combining accent
    Q.replace("chemistry", "\U0001d41c\U0001d421\U0001d41e\U0001d426istry"),    # mathematical bold
])
def test_look_alike_text_scores_as_itself(mw, lookalike):
    assert routed(mw, "/v1/completions", {"model": "base", "prompt": lookalike})[0] == FULL


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "kv_transfer_params": {"prompt_token_ids": [1, 2, 3]}}),
    ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "ec_transfer_params": {"x": [1]}}),
    ("/v1/responses", {"input": "hi", "previous_response_id": "resp_123"}),
    ("/v1/responses", {"input": "hi", "conversation": "conv_1"}),
    ("/generative_scoring", {"query": [1, 2, 3], "items": ["a"]}),
    ("/generative_scoring", {"query": "hi", "items": [[1, 2], [3]]}),
    ("/inference/v1/generate", {"token_ids": [1, 2, 3]}),
    ("/v1/chat/completions", {"messages": []}),
])
def test_content_the_gate_cannot_read_fails_closed(mw, path, body):
    assert routed(mw, path, {"model": "base", **body})[0] == FULL


def test_only_served_models_can_be_named(tmp_path, monkeypatch):
    """With the served names known, a client cannot pick another LoRA (or a resolver path) for the prompts the
    gate leaves on the base model."""
    m = make(tmp_path, monkeypatch, served_model_name="base", allowed_models=["sql-lora"])
    for name in ("../../other/adapter", "/abs/path", "unknown"):
        status, _, chunks = call(m, "/v1/completions", {"model": name, "prompt": "hello"})
        assert status == 404 and "not served" in body_of(chunks)["error"]["message"]
    for name in ("base", "sql-lora", None):
        assert routed(m, "/v1/completions", {"model": name, "prompt": "hello"})[0] == name
    assert routed(m, "/v1/completions", {"model": "sql-lora", "prompt": Q})[0] == FULL
    assert call(m, "/v1/completions", {"model": "unknown", "prompt": "hi"}, headers=ADMIN)[0] == 200


def test_media_payloads_are_not_read_as_text(mw):
    """A 200 KB image or audio part is not scored as text (it would only fail the request closed)."""
    blob = "QUJD" * 50_000
    model, headers = routed(mw, "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "describe this"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{blob}", "detail": "auto"}},
        {"type": "input_audio", "input_audio": {"data": blob, "format": "wav"}}]}]})
    assert model == "base" and headers[b"x-serve-unlearn-adapter"] == b"base"


def test_unrelated_prompts_stay_on_the_base_model(mw):
    model, headers = routed(mw, "/v1/chat/completions", {"model": "base", "messages": [
        {"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "hello"}]})
    assert model == "base" and headers[b"x-serve-unlearn-adapter"] == b"base"


@pytest.mark.parametrize("root_path", ["/api", "/a/b"])
def test_root_path_deployments_are_gated(mw, root_path):
    assert routed(mw, "/v1/completions", FORGET_BODIES["/v1/completions"], root_path=root_path)[0] == FULL
    status, _, _ = call(mw, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/x"}, root_path=root_path)
    assert status == 401


def test_sagemaker_adapter_headers_cannot_override_the_routing(mw):
    """SageMaker's route copies X-Amzn-SageMaker-Adapter-Identifier into ``model`` after the middleware ran."""
    status, _headers, chunks = call(mw, "/invocations", FORGET_BODIES["/invocations"],
                                   headers=[(b"x-amzn-sagemaker-adapter-identifier", b"base")])
    assert status == 200 and body_of(chunks)["model"] == FULL


@pytest.mark.parametrize("path,method,body", [
    ("/v1/load_lora_adapter", "POST", {"lora_name": "mine", "lora_path": "/tmp/x"}),
    ("/v1/unload_lora_adapter", "POST", {"lora_name": FULL}),
    ("/adapters", "POST", {"name": "mine", "src": "/tmp/x"}),
    ("/adapters/o3-v7-s100", "DELETE", b""),
    ("/reset_prefix_cache", "POST", b""),
    ("/collective_rpc", "POST", {"method": "x"}),
    ("/sleep", "POST", b""),
    ("/update_weights", "POST", {}),
    ("/server_info", "GET", b""),
    ("/serve-unlearn/status", "GET", b""),
])
def test_management_routes_need_the_admin_token(mw, path, method, body):
    status, _, chunks = call(mw, path, body, method=method)
    assert status == 401 and "admin token" in body_of(chunks)["error"]["message"]
    for wrong in (b"nope", "s3cr\u00e9t".encode(), b"s3cret\x00", b""):
        status, _, _ = call(mw, path, body, method=method, headers=[(b"x-serve-unlearn-admin", wrong)])
        assert status in (401, 403)
    status, _, _ = call(mw, path, body, method=method, headers=[(b"authorization", "Bearer \u00e9".encode())])
    assert status == 403
    status, _, _ = call(mw, path, body, method=method, headers=ADMIN)
    assert status == 200


def test_nobody_is_admin_without_a_token(tmp_path, monkeypatch):
    m = make(tmp_path, monkeypatch)
    monkeypatch.setenv("SERVE_UNLEARN_ADMIN_TOKEN", "")
    m2 = O3Middleware(echo_app, registry=m.registry, config=m.config, routing=m.routing)
    for headers in ([(b"x-serve-unlearn-admin", b"")], [(b"authorization", b"Bearer ")], []):
        status, _, _ = call(m2, "/v1/load_lora_adapter", {"lora_name": "x"}, headers=headers)
        assert status == 401


def test_models_lists_adapters_only_to_admins(tmp_path, monkeypatch):
    listing = {"object": "list", "data": [{"id": "base"}, {"id": FULL}, {"id": bank_name(7, 0.5)}]}

    async def models_app(scope, receive, send):
        body = json.dumps(listing).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    m = make(tmp_path, monkeypatch)
    m.app = models_app
    status, headers, chunks = call(m, "/v1/models", method="GET")
    assert status == 200 and [d["id"] for d in body_of(chunks)["data"]] == ["base"]
    assert int(headers[b"content-length"]) == len(b"".join(chunks))
    _, _, chunks = call(m, "/v1/models", method="GET", headers=ADMIN)
    assert len(body_of(chunks)["data"]) == 3


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/chat/completions/render", "/v1/plugin/generate"])
def test_unknown_routes_are_refused_unless_the_operator_opens_them(tmp_path, monkeypatch, path):
    m = make(tmp_path, monkeypatch)
    status, _, chunks = call(m, path, {"model": "base", "input": Q})
    assert status == 403 and "open_routes" in body_of(chunks)["error"]["message"]
    assert m.table.by_class()["refused"]  # the status page shows them
    opened = make(tmp_path, monkeypatch, open_routes=[path])
    assert call(opened, path, {"model": "base", "input": Q})[0] == 200
    admin_only = make(tmp_path, monkeypatch, admin_routes=[path])
    assert call(admin_only, path, {"input": Q})[0] == 401
    assert call(admin_only, path, {"input": Q}, headers=ADMIN)[0] == 200


def test_open_routes_cannot_name_a_gated_route():
    with pytest.raises(Exception, match="gated"):
        VllmServeConfig(open_routes=["/v1/completions"])


def test_a_body_over_the_limit_is_refused_without_buffering_it(tmp_path, monkeypatch):
    m = make(tmp_path, monkeypatch, max_body_bytes=64 * 1024)
    big = json.dumps({"model": "base", "prompt": "a" * 200_000}).encode()
    status, _, chunks = call(m, "/v1/completions", big, chunk=4096)
    assert status == 413 and "larger than" in body_of(chunks)["error"]["message"]
    # a lying content-length does not help: the limit holds while the body streams in
    status, _, _ = call(m, "/v1/completions", big, chunk=4096, headers=[(b"content-length", b"10")])
    assert status == 413


def test_compressed_bodies_are_refused(mw):
    status, _, _ = call(mw, "/v1/completions", b"\x1f\x8b...", headers=[(b"content-encoding", b"gzip")])
    assert status == 415


def test_a_missing_registry_gives_503_and_recovers_when_it_appears(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVE_UNLEARN_REGISTRY", str(tmp_path / "reg"))
    m = O3Middleware(echo_app, config=VllmServeConfig(poll_interval_s=0))
    assert "RegistryError" in m.error and not (tmp_path / "reg").exists()  # never created by the server
    status, _, _ = call(m, "/v1/completions", FORGET_BODIES["/v1/completions"])
    assert status == 503
    assert REGISTRY.get_sample_value("serve_unlearn_registry_up") == 0
    ForgetRegistry(tmp_path / "reg")  # the operator creates it
    for _ in range(50):
        status, _, _ = call(m, "/v1/completions", {"model": "base", "prompt": "hello"})
        if status == 200:
            break
        time.sleep(0.05)
    assert status == 200 and m.error is None


def test_a_truncated_registry_database_is_an_error_not_a_new_registry(tmp_path, monkeypatch):
    ForgetRegistry(tmp_path / "reg")
    (tmp_path / "reg" / "registry.sqlite").write_bytes(b"")
    monkeypatch.setenv("SERVE_UNLEARN_REGISTRY", str(tmp_path / "reg"))
    m = O3Middleware(echo_app, config=VllmServeConfig())
    assert m.error is not None and m.routing is None
    assert call(m, "/v1/completions", FORGET_BODIES["/v1/completions"])[0] == 503


def test_a_version_that_fails_to_load_is_not_routed(tmp_path, monkeypatch):
    """A published bank whose requests' artifacts cannot be loaded: the previous routing stays, an alert counts."""
    m = make(tmp_path, monkeypatch)
    m._next_poll = 0.0
    m.config = m.config.model_copy(update={"poll_interval_s": 0})
    publish(m.registry, AdapterBank(9, SCALES, tuple(bank_name(9, s) for s in SCALES), BANK.paths, 8))
    monkeypatch.setattr("serve_unlearn.serving.vllm.middleware.load_routing",
                        lambda *a: (_ for _ in ()).throw(RuntimeError("detector checksum mismatch")))
    before = REGISTRY.get_sample_value("serve_unlearn_hotload_failures_total") or 0

    async def serve_until_the_failure_counts():
        for _ in range(100):
            status, _, chunks = await acall(m, "/v1/completions", FORGET_BODIES["/v1/completions"])
            assert status == 200 and body_of(chunks)["model"] == FULL
            if (REGISTRY.get_sample_value("serve_unlearn_hotload_failures_total") or 0) > before:
                return
            await asyncio.sleep(0.02)

    asyncio.run(serve_until_the_failure_counts())
    assert REGISTRY.get_sample_value("serve_unlearn_hotload_failures_total") > before
    assert m.routing.version == 7 and "checksum mismatch" in m.alert


def test_metrics_count_every_outcome(tmp_path, monkeypatch):
    m = make(tmp_path, monkeypatch)

    def value(outcome, route="/v1/completions"):
        return REGISTRY.get_sample_value("serve_unlearn_gate_decisions_total",
                                         {"outcome": outcome, "route": route}) or 0

    before = {o: value(o) for o in ("base", "adapter", "failed_closed", "invalid")}
    call(m, "/v1/completions", {"model": "base", "prompt": "hello"})
    call(m, "/v1/completions", FORGET_BODIES["/v1/completions"])
    call(m, "/v1/completions", {"model": "base", "prompt": [1, 2]})
    call(m, "/v1/completions", b"{nope")
    refused = REGISTRY.get_sample_value("serve_unlearn_gate_decisions_total",
                                        {"outcome": "refused", "route": "/v1/embeddings"}) or 0
    call(m, "/v1/embeddings", {"input": "x"})
    assert {o: value(o) - before[o] for o in before} == {"base": 1, "adapter": 1, "failed_closed": 1, "invalid": 1}
    assert REGISTRY.get_sample_value("serve_unlearn_gate_decisions_total",
                                     {"outcome": "refused", "route": "/v1/embeddings"}) == refused + 1
    assert REGISTRY.get_sample_value("serve_unlearn_gate_latency_seconds_count") > 0


def test_the_audit_log_has_one_line_per_gated_request_and_no_prompt(tmp_path, monkeypatch):
    log = tmp_path / "audit.jsonl"
    monkeypatch.setenv("AUDIT_SALT", "pepper")
    m = make(tmp_path, monkeypatch, audit=AuditConfig(path=str(log), hash_salt_env="AUDIT_SALT"))
    call(m, "/v1/completions", FORGET_BODIES["/v1/completions"], headers=[(b"x-request-id", b"req-1")])
    call(m, "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "hello"}]})
    call(m, "/v1/completions", {"model": "base", "prompt": [5]})
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["outcome"] for x in lines] == ["adapter", "base", "failed_closed"]
    first = lines[0]
    assert first["request_id"] == "req-1" and first["route"] == "/v1/completions" and first["adapter"] == FULL
    assert first["weights"] == {"chem": 0.95} and first["generation"] == 7 and first["latency_ms"] >= 0
    assert len(first["prompt_hash"]) == 64 and "chemistry" not in log.read_text()
