"""Object removal served over HTTP: images/s and p50/p99 latency at 1, 4 and 16 concurrent clients, dynamic batching
on and off, against a direct pipeline call; and the Ray Serve deployment with two replicas against one.

Two models, both through the real service (``EraserService`` in ``create_app``-style app, uvicorn in a subprocess,
closed-loop clients over HTTP with multipart PNG uploads):

- ``tiny``: the tests' tiny SD pipeline (``serve_unlearn.testing.tiny_sd``), 64x64 images, 4 steps at strength 1.
- ``pixel``: the architecture of ``benchmarks/eraser_quality.py`` (a UNet 32/64 with cross-attention in both blocks on
  32x32 images through a lossless pixel-space "VAE"), 10 steps at strength 1. Its trained weights are used when
  ``eraser_quality.py`` has cached them; otherwise the same UNet at its seeded initialisation (same compute: serving
  speed does not depend on the values of the weights).

Batching on: ``max_batch_size`` 16, ``batch_wait_ms`` 5; off: ``max_batch_size`` 1. The direct call is
``EraserEngine.run_batch`` on one job in-process (what a caller without the service would run). Targets: batching on
>= 2x the images/s of batching off at 16 clients; p99 at 1 client <= 1.1x the direct call's p99.

Writes ``benchmarks/results/eraser_serving.json`` and ``eraser_serving.png``; prints a table.

    python benchmarks/eraser_serving.py [--models tiny pixel] [--requests 48] [--ray]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SETTINGS = {"tiny": {"size": 64, "steps": 4}, "pixel": {"size": 32, "steps": 10}}
CLIENTS = (1, 4, 16)


# -- the server side (a subprocess: `python eraser_serving.py --_serve ...`) --------------------------------------
def build_engine(model: str, folder: Path, config):
    """The EraserEngine for ``model``: the tiny SD folder, or the pixel-space eraser_quality pipeline."""
    from serve_unlearn.service.eraser.engine import EraserEngine

    if model == "tiny":
        return EraserEngine(config)
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import eraser_quality as eq
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**eq.UNET_CONFIG).eval()
    cached = sorted(eq.CACHE.glob("*.safetensors")) if eq.CACHE.is_dir() else []
    if cached:
        from safetensors.torch import load_file

        unet.load_state_dict(load_file(str(cached[-1])))
    return EraserEngine(config, pipe=eq.eraser_pipeline(unet),
                        call_kwargs={"prompt_embeds": torch.zeros(1, 1, eq.CROSS_DIM), "mask_dilation": 0})


def serve_main(model: str, folder: str, port: int, batch: int, wait_ms: float) -> None:
    import asyncio
    import contextlib

    import uvicorn
    from fastapi import FastAPI
    from prometheus_client import CollectorRegistry

    from serve_unlearn.service.eraser import EraserConfig, EraserService
    from serve_unlearn.service.errors import install_error_handlers

    config = EraserConfig(model=folder, max_batch_size=batch, batch_wait_ms=wait_ms, max_queue=64, timeout_s=600,
                          torch_threads=int(os.environ.get("BENCH_TORCH_THREADS", "2")))
    service = EraserService(config, CollectorRegistry(), engine=build_engine(model, Path(folder), config))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(service.router)

    @app.get("/readyz")
    async def ready():
        return {"ready": service.ready()[0]}

    size, steps = SETTINGS[model]["size"], SETTINGS[model]["steps"]
    job = _direct_job(size, steps)

    @app.post("/_bench/direct")
    def direct_call():
        """One pipeline call as a caller without the service makes it (no HTTP, queue, decode or PNG), timed here."""
        t = time.perf_counter()
        service.engine.run_batch([job], lambda: False)
        return {"seconds": time.perf_counter() - t}

    asyncio.run(uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")).serve())


# -- the client side ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc=None, timeout: float = 300) -> None:
    import httpx

    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            r = httpx.get(url + "/readyz", timeout=5)
            if r.status_code == 200 and r.json().get("ready", True):
                return
        except (httpx.HTTPError, ValueError) as exc:  # not up yet
            last = exc
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become ready ({last})")


def _uploads(size: int, n: int = 8) -> list[tuple[bytes, bytes]]:
    import PIL.Image

    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        image = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        mask = np.zeros((size, size), np.uint8)
        a, b = sorted(rng.integers(size // 8, size - size // 8, 2))
        mask[a : max(b, a + size // 4), size // 4 : size // 2 + size // 8] = 255
        bufs = []
        for arr in (image, mask):
            buf = io.BytesIO()
            PIL.Image.fromarray(arr).save(buf, format="PNG")
            bufs.append(buf.getvalue())
        out.append((bufs[0], bufs[1]))
    return out


def load(url: str, clients: int, total: int, uploads, steps: int) -> dict:
    """``clients`` closed-loop clients send ``total`` requests; images/s, p50/p99 latency (s), batch sizes."""
    import httpx

    latencies, batches, errors = [], [], []
    lock, counter = threading.Lock(), iter(range(total))

    def client():
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                image, mask = uploads[i % len(uploads)]
                t = time.perf_counter()
                r = http.post(url + "/v1/images/erase", files={"image": ("i.png", image), "mask": ("m.png", mask)},
                              data={"seed": str(i), "num_inference_steps": str(steps), "strength": "1"})
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                        batches.append(int(r.headers["x-batch-size"]))
                    else:
                        errors.append(r.status_code)

    # warm the connection path once
    httpx.post(url + "/v1/images/erase", files={"image": ("i.png", uploads[0][0]), "mask": ("m.png", uploads[0][1])},
               data={"num_inference_steps": str(steps), "strength": "1"}, timeout=600)
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {"clients": clients, "requests": len(lat), "errors": errors, "images_per_s": len(lat) / wall,
            "p50_s": statistics.median(lat), "p99_s": float(np.percentile(lat, 99)),
            "mean_batch": float(np.mean(batches))}


def _direct_job(size: int, steps: int):
    from serve_unlearn.service.eraser.requests import EraseParams, Job

    image = (np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8)
    mask = np.zeros((size, size), bool)
    mask[size // 4 : size // 2, size // 4 : size // 2] = True
    return Job(EraseParams(num_inference_steps=steps, strength=1.0), image, mask, (size, size), 0, 0.0)


def one_client_vs_direct(url: str, uploads, steps: int, n: int) -> dict:
    """1 client, alternating an HTTP erase (client-side time) and a direct pipeline call in the server process (its
    own time), so both see the same machine load: p50/p99 of each."""
    import httpx

    http_t, direct_t = [], []
    with httpx.Client(timeout=600) as http:
        for i in range(n + 2):
            image, mask = uploads[i % len(uploads)]
            t = time.perf_counter()
            r = http.post(url + "/v1/images/erase", files={"image": ("i.png", image), "mask": ("m.png", mask)},
                          data={"seed": str(i), "num_inference_steps": str(steps), "strength": "1"})
            r.raise_for_status()
            http_t.append(time.perf_counter() - t)
            direct_t.append(http.post(url + "/_bench/direct").json()["seconds"])
    http_t, direct_t = http_t[2:], direct_t[2:]
    pct = {"p50_s": statistics.median, "p99_s": lambda v: float(np.percentile(v, 99))}
    return {"http": {k: f(http_t) for k, f in pct.items()}, "direct": {k: f(direct_t) for k, f in pct.items()},
            "calls": n}


def bench_embedded(model: str, folder: Path, total: int) -> dict:
    s = SETTINGS[model]
    uploads = _uploads(s["size"])
    out = {"batching": {}}
    for label, batch in (("on", 16), ("off", 1)):
        port = _free_port()
        proc = subprocess.Popen([sys.executable, __file__, "--_serve", model, str(folder), str(port), str(batch), "5"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_ready(f"http://127.0.0.1:{port}", proc)
            if label == "on":
                out["one_client"] = one_client_vs_direct(f"http://127.0.0.1:{port}", uploads, s["steps"],
                                                         max(20, total // 2))
                out["direct"] = out["one_client"]["direct"]
            out["batching"][label] = [load(f"http://127.0.0.1:{port}", c, total if c > 1 else max(20, total // 2),
                                           uploads, s["steps"]) for c in CLIENTS]
        finally:
            proc.terminate()
            proc.wait(30)
    return out


def bench_ray(folder: Path, total: int) -> dict:
    """Ray Serve, tiny model, 16 clients: one replica against two (torch 1 thread each, batching on)."""
    import ray
    from ray import serve

    from serve_unlearn.service.config import ServeConfig
    from serve_unlearn.service.ray_engine import run_on_ray

    s = SETTINGS["tiny"]
    uploads = _uploads(s["size"])
    out = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 1024**2)
    try:
        for replicas in (1, 2):
            port = _free_port()
            config = ServeConfig.validate_dict({"eraser": {
                "model": str(folder), "torch_threads": 1, "max_batch_size": 16, "batch_wait_ms": 5, "max_queue": 64,
                "ray": {"num_replicas": replicas, "num_cpus": 0.5}}})
            run_on_ray(config, "127.0.0.1", port, blocking=False)
            _wait_ready(f"http://127.0.0.1:{port}")
            time.sleep(2 * replicas)  # every replica warmed
            out[str(replicas)] = load(f"http://127.0.0.1:{port}", 16, total, uploads, s["steps"])
            serve.shutdown()
    finally:
        ray.shutdown()
    return out


def table(results: dict) -> str:
    lines = ["| model | batching | clients | images/s | p50 ms | p99 ms | mean batch |", "|---|---|---|---|---|---|---|"]
    for model, r in results["models"].items():
        d = r["direct"]
        h = r["one_client"]["http"]
        lines.append(f"| {model} | direct call (interleaved) | 1 | {1 / d['p50_s']:.2f} | {d['p50_s'] * 1e3:.0f} | "
                     f"{d['p99_s'] * 1e3:.0f} | 1 |")
        lines.append(f"| {model} | HTTP (interleaved) | 1 | {1 / h['p50_s']:.2f} | {h['p50_s'] * 1e3:.0f} | "
                     f"{h['p99_s'] * 1e3:.0f} | 1 |")
        for label, rows in r["batching"].items():
            for row in rows:
                lines.append(f"| {model} | {label} | {row['clients']} | {row['images_per_s']:.2f} | "
                             f"{row['p50_s'] * 1e3:.0f} | {row['p99_s'] * 1e3:.0f} | {row['mean_batch']:.1f} |")
    for replicas, row in results.get("ray", {}).items():
        lines.append(f"| tiny (Ray Serve, {replicas} replica{'s' * (replicas != '1')}) | on | 16 | "
                     f"{row['images_per_s']:.2f} | {row['p50_s'] * 1e3:.0f} | {row['p99_s'] * 1e3:.0f} | "
                     f"{row['mean_batch']:.1f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for label, rows in results["models"][model]["batching"].items():
            ax.plot([r["clients"] for r in rows], [r["images_per_s"] for r in rows], marker="o",
                    label=f"batching {label}")
        ax.axhline(1 / results["models"][model]["direct"]["p50_s"], ls="--", c="grey", label="direct call, 1/p50")
        ax.set(xscale="log", xticks=list(CLIENTS), xticklabels=[str(c) for c in CLIENTS], xlabel="concurrent clients",
               ylabel="images/s", title=f"{model} ({SETTINGS[model]['size']} px, {SETTINGS[model]['steps']} steps)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "pixel"], choices=list(SETTINGS))
    ap.add_argument("--requests", type=int, default=48, help="requests per setting at 4 and 16 clients")
    ap.add_argument("--ray", action="store_true", help="also Ray Serve with 1 and 2 replicas (tiny model)")
    args = ap.parse_args()

    from serve_unlearn.testing.tiny_sd import save_tiny_sd

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_sd(Path(tmp) / "tiny-sd")
        results = {"load_before": os.getloadavg(), "cpus": os.cpu_count(), "models": {}}
        for model in args.models:
            results["models"][model] = bench_embedded(model, folder, args.requests)
        if args.ray:
            results["ray"] = bench_ray(folder, args.requests)
        results["load_after"] = os.getloadavg()
    for model, r in results["models"].items():
        on16, off16 = r["batching"]["on"][-1], r["batching"]["off"][-1]
        r["speedup_16_clients"] = on16["images_per_s"] / off16["images_per_s"]
        r["p99_1_client_over_direct"] = r["one_client"]["http"]["p99_s"] / r["one_client"]["direct"]["p99_s"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eraser_serving.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "eraser_serving.png")
    print(table(results))
    for model, r in results["models"].items():
        print(f"{model}: batching on/off at 16 clients {r['speedup_16_clients']:.2f}x (target >= 2); p99 at 1 client "
              f"{r['p99_1_client_over_direct']:.2f}x the direct call (target <= 1.1)")
    print(f"load average before {results['load_before']}, after {results['load_after']} on {results['cpus']} CPUs")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_serve":
        m, f, p, b, w = sys.argv[2:7]
        serve_main(m, f, int(p), int(b), float(w))
    else:
        main()
