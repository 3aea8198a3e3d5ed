"""Patch-apply throughput against a plain copy of the same tensor (the memory-bandwidth limit), and what
verification costs on top.

Throughput table. Target: ``masked_apply_`` >= 0.5x the GB/s of ``weight.copy_(other)``. GB/s counts the
weight's bytes once for both (apply reads a mask of n/8 bytes and nnz values on top, copy reads a second tensor).
The backend is what ``serve_unlearn.kernels.masked_apply_`` picks: torch on CPU, Triton on CUDA when triton is
installed (``SERVE_UNLEARN_KERNEL_IMPL`` overrides).

Verification table (``--table verify``), one tensor patched through the public API, in ms: ``copy_`` (a plain
copy of the tensor), ``write`` (the kernel alone), ``apply_patch(verify=False)`` (the write, the undo's gather
and the NaN/inf check), the file check ``WeightPatch.load`` adds for this tensor (its payload sha256, over mask +
values only), ``apply_patch`` (the default: also the base tensor's sha256) and ``verify="full"`` (also the
result's sha256 after the write: what a version-1 file gets by default).

Each cell is the median of ``--repeats`` timed runs after a warm-up; the weight is restored between apply runs
outside the timed region, so every run does the same work.

    python benchmarks/patch_apply.py                  # 4M, 16M, 64M elements; fp32, bf16; 1/10/50 %; both tables
    python benchmarks/patch_apply.py --sizes 4M --mode add --device cuda --table throughput
    python benchmarks/patch_apply.py --threads 1      # steadier on a small, shared CPU box
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from serve_unlearn.kernels import is_triton_available, masked_apply_, pack_mask

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


def bench_one(numel: int, dtype: torch.dtype, density: float, mode: str, device: torch.device, repeats: int):
    g = torch.Generator(device="cpu").manual_seed(0)
    base = torch.randn(numel, generator=g).to(dtype).to(device)
    mask = torch.rand(numel, generator=g) < density
    packed = pack_mask(mask).to(device)
    values = torch.randn(int(mask.sum()), generator=g).to(dtype).to(device)
    del mask
    weight = base.clone()
    other = torch.empty_like(base)
    t_copy = _median_seconds(lambda: weight.copy_(other), device, repeats)
    t_apply = _median_seconds(
        lambda: masked_apply_(weight, packed, values, mode), device, repeats, reset=lambda: weight.copy_(base)
    )
    gb = numel * base.element_size() / 1e9
    return gb / t_apply, gb / t_copy, t_apply, t_copy


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["4M", "16M", "64M"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--densities", nargs="+", type=float, default=[0.01, 0.1, 0.5])
    parser.add_argument("--mode", default="replace", choices=["replace", "add"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--table", choices=["throughput", "verify", "both"], default="both")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backend = "triton" if device.type == "cuda" and is_triton_available() else "torch"
    print(f"device={device} ({torch.get_num_threads()} threads) backend(auto)={backend} mode={args.mode} "
          f"torch={torch.__version__} repeats={args.repeats} (median)\n")
    if args.table in ("throughput", "both"):
        print("| elements | dtype | density | apply GB/s | copy GB/s | apply/copy | apply ms | copy ms |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|")
        for size in args.sizes:
            numel = _size(size)
            for name in args.dtypes:
                for density in args.densities:
                    a, c, ta, tc = bench_one(numel, DTYPES[name], density, args.mode, device, args.repeats)
                    print(f"| {size} | {name} | {density:.0%} | {a:.2f} | {c:.2f} | {a / c:.2f} | "
                          f"{ta * 1e3:.1f} | {tc * 1e3:.1f} |", flush=True)
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


if __name__ == "__main__":
    main()
