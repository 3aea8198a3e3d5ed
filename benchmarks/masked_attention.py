"""Masked attention (Attentive Eraser's ASS) per backend: latency and peak memory at SD's largest level.

q/k/v (2, 8, 4096, 40) (SD 1.5, 64x64 tokens) and (2, 10, 4096, 64) (SDXL/SD 2.1 head dim), the central 25% of
the token grid barred for both samples, lambda = 0.3 on the barred rows' queries (similarity suppression on).
Target: ``sdpa_gather`` peak attention memory <= 0.5x ``reference`` at 64x64 tokens.

Each (shape, backend) runs in a fresh subprocess so one backend's allocator state cannot hide another's peak.
Peak memory there: on CPU the peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS before the
timed calls, inputs built and one warm-up call done; on CUDA ``torch.cuda.max_memory_allocated`` minus the
allocation before the calls. Latency: median of ``--repeats`` calls after the warm-up. ``max |err|`` compares
with ``reference`` on the same inputs, computed after the measurement. Writes
``benchmarks/results/masked_attention.json`` and prints a table. About 3 minutes on 2 CPU cores.

    python benchmarks/masked_attention.py
    python benchmarks/masked_attention.py --device cuda --dtype fp16      # adds the triton backend
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from serve_unlearn.kernels import is_triton_available, masked_attention

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
SHAPES = [(2, 8, 4096, 40), (2, 10, 4096, 64)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAMBDA = 0.3
TARGET_RATIO = 0.5


def _inputs(shape, dtype, device):
    """q, k, v, keep, query_scale: the central quarter of the square token grid barred, lambda on its queries."""
    B, H, N, D = shape
    side = int(N**0.5)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, N, H, D, generator=g).to(dtype).to(device).transpose(1, 2) for _ in range(3))
    fg = torch.zeros(side, side, dtype=torch.bool)
    fg[side // 4 : side // 4 + side // 2, side // 4 : side // 4 + side // 2] = True
    fg = fg.flatten().expand(B, N).to(device)
    return q, k, v, ~fg, 1 + (LAMBDA - 1) * fg.float()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(shape, backend: str, dtype: torch.dtype, device: torch.device, repeats: int) -> dict:
    """One configuration, measured in this (fresh) process."""
    q, k, v, keep, qs = _inputs(shape, dtype, device)

    def call():
        return masked_attention(q, k, v, keep, qs, backend=backend)

    out = call()  # warm-up: thread pools, Triton compile, allocator
    del out
    gc.collect()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _rss_kib("VmRSS") * 1024
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = call()
        _sync(device)
        times.append(time.perf_counter() - t0)
        del out
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss_kib("VmHWM") * 1024) - base
    err = 0.0
    if backend != "reference":
        diff = call().float() - masked_attention(q, k, v, keep, qs, backend="reference").float()
        err = diff.abs().max().item()
    return {"median_s": statistics.median(times), "peak_mib": peak / 2**20, "max_abs_err": err}


def run_one(shape, backend: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", backend, "--shape", *map(str, shape), "--dtype", args.dtype,
           "--device", args.device, "--repeats", str(args.repeats)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{backend} {shape} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one backend in this process
    parser.add_argument("--shape", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.worker:
        print(json.dumps(worker(tuple(args.shape), args.worker, DTYPES[args.dtype], device, args.repeats)))
        return

    backends = ["reference", "sdpa_mask", "sdpa_gather"]
    if device.type == "cuda" and is_triton_available():
        backends.append("triton")
    print(f"device={device} ({torch.get_num_threads()} threads) dtype={args.dtype} torch={torch.__version__} "
          f"repeats={args.repeats} (median); central 25% barred, lambda={LAMBDA} on its queries\n")
    print("| q/k/v (B, H, N, D) | backend | latency ms | peak MiB | peak / reference | max abs err |")
    print("|---|---|---:|---:|---:|---:|")
    rows, targets = [], []
    for shape in SHAPES:
        by_backend = {}
        for backend in backends:
            r = run_one(shape, backend, args)
            by_backend[backend] = r
            ratio = r["peak_mib"] / by_backend["reference"]["peak_mib"]
            rows.append({"shape": list(shape), "backend": backend, **r, "peak_over_reference": ratio})
            print(f"| {shape} | {backend} | {r['median_s'] * 1e3:.1f} | {r['peak_mib']:.1f} | {ratio:.3f} | "
                  f"{r['max_abs_err']:.2e} |", flush=True)
        ratio = by_backend["sdpa_gather"]["peak_mib"] / by_backend["reference"]["peak_mib"]
        targets.append({"shape": list(shape), "gather_peak_over_reference": ratio, "target": TARGET_RATIO,
                        "met": ratio <= TARGET_RATIO})
    print()
    for t in targets:
        verdict = "met" if t["met"] else "MISSED"
        print(f"target sdpa_gather peak <= {TARGET_RATIO}x reference at {tuple(t['shape'])}: "
              f"{t['gather_peak_over_reference']:.3f}x, {verdict}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "lambda": LAMBDA,
        "mask": "central 25% of the token grid barred, same for both samples",
        "rows": rows,
        "targets": targets,
    }
    (RESULTS / "masked_attention.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / 'masked_attention.json'}")


if __name__ == "__main__":
    main()
