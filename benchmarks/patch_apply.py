"""Patch-apply throughput against a plain copy of the same tensor (the memory-bandwidth limit), and what
verification costs on top.

Throughput table. Target: ``masked_apply_`` >= 0.5x the GB/s of ``weight.copy_(other)``, and the same for
``masked_gather`` (what an apply reads first to keep its undo). GB/s counts the weight's bytes once for all
(apply reads a mask of n/8 bytes and nnz values on top, copy reads a second tensor). ``--impls`` lists the
backends to compare (default: what ``serve_unlearn.kernels.masked_apply_`` picks, "auto": numba on CPU where it
is installed, else torch; Triton on CUDA); each row is one backend. The table is also written as JSON and a plot
(``--out``, default ``benchmarks/results/patch_apply.{json,png}``).

Verification table (``--table verify``), one tensor patched through the public API, in ms: ``copy_`` (a plain
copy of the tensor), ``write`` (the kernel alone), ``apply_patch(verify=False)`` (the write, the undo's gather
and the NaN/inf check), the file check ``WeightPatch.load`` adds for this tensor (its payload sha256, over mask +
values only), ``apply_patch`` (the default: also the base tensor's sha256) and ``verify="full"`` (also the
result's sha256 after the write: what a version-1 file gets by default).

Each cell is the median of ``--repeats`` timed runs after a warm-up; the weight is restored between apply runs
outside the timed region, so every run does the same work.

    python benchmarks/patch_apply.py --sizes 128M --dtypes fp32 --densities 0.5 0.05 --threads 2 \
        --impls torch numba --table throughput      # the issue-16 target: 512 MiB fp32, 50 % and 5 %
    python benchmarks/patch_apply.py                  # 4M, 16M, 64M elements; fp32, bf16; 1/10/50 %; both tables
    python benchmarks/patch_apply.py --sizes 4M --mode add --device cuda --table throughput
    python benchmarks/patch_apply.py --threads 1      # steadier on a small, shared CPU box

Whole-model table (``--table model``): a patch file of ``--patch-gb`` GB (bf16, each density) made against a
model-sized state dict of 64M-element tensors on ``--device``, timed end to end the way a live apply runs it:
``WeightPatch.load`` (read + payload check), ``apply_patch`` with and without the base digests, ``revert_patch``,
against one device ``copy_`` of the same weights. The reverted weights are checked bit for bit.

    python benchmarks/patch_apply.py --table model --device cuda --patch-gb 1 --densities 0.5 0.05

Block table (``--table blocks``, CUDA): the Triton apply per (``BLOCK``, ``num_warps``), the kernel alone and the
whole call, in ms from CUDA events over back-to-back runs; how the kernel's defaults were chosen.

    python benchmarks/patch_apply.py --table blocks --device cuda --sizes 128M --densities 0.5 0.05
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from serve_unlearn.kernels import (
    is_numba_available,
    is_triton_available,
    masked_apply_,
    masked_gather,
    pack_mask,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, repeats: int, reset=None) -> float:
    """Median wall time of ``fn`` after one warm-up; ``reset`` runs before each call, untimed."""
    times = []
    for i in range(repeats + 1):
        if reset is not None:
            reset()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i:  # the first run is the warm-up (allocator, Triton compile, page faults)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_one(numel: int, dtype: torch.dtype, density: float, mode: str, device: torch.device, repeats: int,
              impls=("auto",)):
    """{impl: (apply s, gather s)}, the copy's seconds and the first-touch floor of the gather's output (a fresh
    buffer of nnz elements written once: the page faults every new undo buffer pays, whatever the kernel)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    base = torch.randn(numel, generator=g).to(dtype).to(device)
    mask = torch.rand(numel, generator=g) < density
    packed = pack_mask(mask).to(device)
    values = torch.randn(int(mask.sum()), generator=g).to(dtype).to(device)
    del mask
    weight = base.clone()
    other = torch.empty_like(base)
    t_copy = _median_seconds(lambda: weight.copy_(other), device, repeats)
    t_alloc = _median_seconds(lambda: torch.empty_like(values).fill_(0), device, repeats)
    out = {}
    for impl in impls:
        def apply(impl=impl):
            masked_apply_(weight, packed, values, mode, impl=impl)

        t_apply = _median_seconds(apply, device, repeats, reset=lambda: weight.copy_(base))
        t_gather = _median_seconds(lambda impl=impl: masked_gather(weight, packed, impl=impl), device, repeats)
        out[impl] = (t_apply, t_gather)
    return out, t_copy, t_alloc


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['size']} {r['dtype']} {r['density']:.0%}\n{r['impl']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["apply_over_copy"] for r in rows], 0.4, label="apply / copy_")
    ax.bar([i + 0.2 for i in x], [r["gather_over_copy"] for r in rows], 0.4, label="gather (undo) / copy_")
    ax.axhline(0.5, color="k", ls="--", lw=1, label="target 0.5")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("throughput / plain copy_")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def bench_verify(numel: int, dtype: torch.dtype, density: float, mode: str, device: torch.device, repeats: int):
    """ms for: copy_, write, apply(verify=False), load's payload check, apply(verify=True), apply(verify="full")."""
    from serve_unlearn.patches import WeightPatch, apply_patch
    from serve_unlearn.patches.integrity import payload_digest

    g = torch.Generator(device="cpu").manual_seed(0)
    base = torch.randn(numel, generator=g).to(dtype)
    edited = base.clone()
    mask = torch.rand(numel, generator=g) < density
    edited[mask] += torch.randn(int(mask.sum()), generator=g).to(dtype)
    del mask
    patch = WeightPatch.from_diff({"w": base}, {"w": edited}, mode=mode)
    entry = patch.entries["w"]
    info = entry.header()
    base = base.to(device)
    weight = base.clone()
    other = torch.empty_like(base)
    target = {"w": weight}

    def reset():
        weight.copy_(base)

    times = [
        _median_seconds(lambda: weight.copy_(other), device, repeats),
        _median_seconds(lambda: entry.write_into(weight, mode), device, repeats, reset=reset),
        _median_seconds(lambda: apply_patch(target, patch, verify=False), device, repeats, reset=reset),
        _median_seconds(lambda: payload_digest("w", mode, info, entry.stored()), device, repeats),
        _median_seconds(lambda: apply_patch(target, patch), device, repeats, reset=reset),
        _median_seconds(lambda: apply_patch(target, patch, verify="full"), device, repeats, reset=reset),
    ]
    return [t * 1e3 for t in times]


def bench_model(patch_gb: float, density: float, device: torch.device, workdir: Path) -> dict:
    """Seconds for load / apply (verify False, True) / revert of a ``patch_gb`` GB bf16 patch, and a copy_."""
    from serve_unlearn.patches import WeightPatch, apply_patch, revert_patch

    chunk = 64 << 20
    per_element = density * 2 + 1 / 8  # bf16 values + the packed mask
    count = max(1, round(patch_gb * 1e9 / per_element / chunk))
    g = torch.Generator(device="cpu").manual_seed(0)
    base, edited = {}, {}
    for i in range(count):
        w = torch.randn(chunk, generator=g).to(torch.bfloat16).view(8192, -1)
        e = w.clone()
        m = torch.rand(w.shape, generator=g) < density
        e[m] = torch.randn(int(m.sum()), generator=g).to(torch.bfloat16)
        base[f"layers.{i}.weight"], edited[f"layers.{i}.weight"] = w, e
    path = WeightPatch.from_diff(base, edited, method="bench").save(workdir / f"model_{density}.patch.safetensors")
    del edited
    state = {n: t.to(device) for n, t in base.items()}
    scratch = torch.empty_like(next(iter(state.values())))

    def timed(fn):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        return time.perf_counter() - t0, out

    t_copy = min(timed(lambda: [scratch.copy_(t) for t in state.values()])[0] for _ in range(3))
    t_load, patch = timed(lambda: WeightPatch.load(path))
    t_fast, _ = timed(lambda: apply_patch(state, patch, verify=False))
    t_revert, _ = timed(lambda: revert_patch(state, patch))
    t_checked, _ = timed(lambda: apply_patch(state, patch))
    revert_patch(state, patch)
    exact = all(torch.equal(state[n].cpu(), base[n]) for n in base)
    return {"patch_gb": path.stat().st_size / 1e9, "weights_gb": count * chunk * 2 / 1e9, "density": density,
            "copy_s": t_copy, "load_s": t_load, "apply_s": t_fast, "apply_verified_s": t_checked,
            "revert_s": t_revert, "reverted_exactly": exact}


def _event_ms(fn, reps: int = 20) -> float:
    """Mean ms of back-to-back CUDA runs (launch overhead overlapped, as in a loader's stream of tensors)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def bench_blocks(numel: int, dtype: torch.dtype, density: float) -> list[dict]:
    from triton import cdiv

    from serve_unlearn.kernels import masked_apply_triton as tri

    g = torch.Generator(device="cpu").manual_seed(0)
    weight = torch.randn(numel, generator=g).to(dtype).cuda()
    mask = torch.rand(numel, generator=g) < density
    packed = pack_mask(mask).cuda()
    values = torch.randn(int(mask.sum()), generator=g).to(dtype).cuda()
    other = torch.empty_like(weight)
    copy_ms = _event_ms(lambda: weight.copy_(other))
    rows = []
    for block in (1024, 2048, 4096, 8192):
        starts, _ = tri._block_starts(packed, cdiv(numel, block), block)
        for warps in (2, 4, 8):
            def kernel(block=block, warps=warps, starts=starts):
                tri._masked_apply_kernel[(cdiv(numel, block),)](weight, packed, values, starts, numel,
                                                                       BLOCK=block, ADD=False, num_warps=warps)

            def call(block=block, warps=warps):
                tri.masked_apply_triton_(weight, packed, values, block=block, num_warps=warps)

            rows.append({"block": block, "warps": warps, "kernel_ms": _event_ms(kernel), "call_ms": _event_ms(call),
                         "copy_ms": copy_ms})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["4M", "16M", "64M"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--densities", nargs="+", type=float, default=[0.01, 0.1, 0.5])
    parser.add_argument("--mode", default="replace", choices=["replace", "add"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--table", choices=["throughput", "verify", "both", "model", "blocks"], default="both")
    parser.add_argument("--patch-gb", type=float, default=1.0, help="patch file size for --table model")
    parser.add_argument("--impls", nargs="+", default=["auto"], choices=["auto", "torch", "numba", "triton"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "patch_apply"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cpu = "numba" if is_numba_available() else "torch"
    backend = "triton" if device.type == "cuda" and is_triton_available() else cpu
    print(f"device={device} ({torch.get_num_threads()} threads) backend(auto)={backend} mode={args.mode} "
          f"torch={torch.__version__} repeats={args.repeats} (median)\n")
    if args.table in ("throughput", "both"):
        print("gather = the undo's read into a new buffer; 'alloc' = first touch of such a buffer alone\n")
        print("| elements | dtype | density | impl | apply GB/s | copy GB/s | apply/copy | gather/copy | apply ms "
              "| gather ms | alloc ms | copy ms |")
        print("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        rows = []
        for size in args.sizes:
            numel = _size(size)
            for name in args.dtypes:
                for density in args.densities:
                    res, tc, tz = bench_one(numel, DTYPES[name], density, args.mode, device, args.repeats, args.impls)
                    gb = numel * DTYPES[name].itemsize / 1e9
                    for impl, (ta, tg) in res.items():
                        rows.append({"size": size, "dtype": name, "density": density, "impl": impl, "apply_ms":
                                     ta * 1e3, "gather_ms": tg * 1e3, "alloc_ms": tz * 1e3, "copy_ms": tc * 1e3,
                                     "apply_over_copy": tc / ta, "gather_over_copy": tc / tg})
                        print(f"| {size} | {name} | {density:.0%} | {impl} | {gb / ta:.2f} | {gb / tc:.2f} | "
                              f"{tc / ta:.2f} | {tc / tg:.2f} | {ta * 1e3:.1f} | {tg * 1e3:.1f} | {tz * 1e3:.1f} | "
                              f"{tc * 1e3:.1f} |",
                              flush=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": str(device), "threads": torch.get_num_threads(), "mode": args.mode,
                "repeats": args.repeats, "torch": torch.__version__}
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        try:
            _plot(rows, out.with_suffix(".png"))
        except ImportError:
            print("(matplotlib is not installed: no plot; pip install 'serve-unlearn[eval]')")
    if args.table in ("verify", "both"):
        print("\nms per tensor; 'load check' is what WeightPatch.load adds (payload sha256), 'verified' = "
              "apply_patch default + load check\n")
        print("| elements | dtype | density | copy_ | write | apply verify=False | load check | apply verify=True "
              "| verify=\"full\" | verified / unverified | verified / copy_ |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for size in args.sizes:
            numel = _size(size)
            for name in args.dtypes:
                for density in args.densities:
                    cp, wr, off, load, on, full = bench_verify(numel, DTYPES[name], density, args.mode, device,
                                                               args.repeats)
                    print(f"| {size} | {name} | {density:.0%} | {cp:.1f} | {wr:.1f} | {off:.1f} | {load:.1f} | "
                          f"{on:.1f} | {full:.1f} | {(on + load) / off:.2f} | {(on + load) / cp:.1f} |", flush=True)

    if args.table == "model":
        print("\nwhole-model patch, seconds (verified = apply_patch's default: base digests checked)\n")
        print("| patch GB | weights GB | density | load | apply | apply verified | revert | copy_ weights | "
              "apply / copy_ | reverted exactly |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        workdir = Path(args.out).parent
        workdir.mkdir(parents=True, exist_ok=True)
        for density in args.densities:
            r = bench_model(args.patch_gb, density, device, workdir)
            print(f"| {r['patch_gb']:.2f} | {r['weights_gb']:.1f} | {density:.0%} | {r['load_s']:.2f} | "
                  f"{r['apply_s']:.3f} | {r['apply_verified_s']:.2f} | {r['revert_s']:.2f} | {r['copy_s']:.3f} | "
                  f"{r['copy_s'] / r['apply_s']:.2f} | {r['reverted_exactly']} |", flush=True)

    if args.table == "blocks":
        print("| elements | dtype | density | BLOCK | warps | kernel ms | call ms | copy ms | kernel/copy | call/copy |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for size in args.sizes:
            for name in args.dtypes:
                for density in args.densities:
                    for r in bench_blocks(_size(size), DTYPES[name], density):
                        print(f"| {size} | {name} | {density:.0%} | {r['block']} | {r['warps']} | {r['kernel_ms']:.3f} "
                              f"| {r['call_ms']:.3f} | {r['copy_ms']:.3f} | {r['copy_ms'] / r['kernel_ms']:.2f} | "
                              f"{r['copy_ms'] / r['call_ms']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
