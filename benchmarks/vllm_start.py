"""vLLM engine start with ``--load-format serve_unlearn`` + a patch, against a plain start of the same model.

Target: patched start <= 1.1x plain start. Each start runs in its own process (vLLM spawns its engine), plain and
patched alternate, and the table reports the median of ``--repeats`` starts (time from ``LLM(...)`` to ready).

    python benchmarks/vllm_start.py                 # the tiny Llama
    python benchmarks/vllm_start.py --smollm2       # SmolLM2-135M from its PyPI package
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child(model: str, patch: str | None) -> None:
    from vllm import LLM, SamplingParams

    kwargs = {"load_format": "serve_unlearn", "model_loader_extra_config": {"patches": [patch]}} if patch else {}
    t0 = time.perf_counter()
    llm = LLM(model=model, max_model_len=256, enforce_eager=True, seed=0, **kwargs)
    ready = time.perf_counter() - t0
    llm.generate(["Hello"], SamplingParams(max_tokens=2))
    print("START_SECONDS " + json.dumps(ready), flush=True)


def synthetic_patch(model_dir: Path, out: Path, density: float = 0.05) -> Path:
    """A SalUn-shaped patch: `density` of every attention/MLP matrix, small value changes, checkpoint dtype."""
    import torch
    from safetensors.torch import load_file

    from serve_unlearn.patches import WeightPatch
    from serve_unlearn.patches.materialize import weight_shards

    base = {}
    for shard in weight_shards(model_dir):
        base.update({k: v for k, v in load_file(str(shard)).items() if ".mlp." in k or ".self_attn." in k})
    g = torch.Generator().manual_seed(0)
    edited = {}
    for k, v in base.items():
        m = torch.rand(v.shape, generator=g) < density
        e = v.clone()
        e[m] = (e[m].float() * 0.9).to(v.dtype) + 1e-3
        edited[k] = e
    return WeightPatch.from_diff(base, edited, method="synthetic").save(out)


def start_seconds(model: Path, patch: Path | None) -> float:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--child", str(model)] + ([str(patch)] if patch else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    line = [l for l in proc.stdout.splitlines() if l.startswith("START_SECONDS ")]
    if proc.returncode or not line:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(line[0].split(" ", 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smollm2", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--density", type=float, default=0.05)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    if args.smollm2:
        from serve_unlearn.models import prepare_smollm2

        model = prepare_smollm2()
    else:
        from serve_unlearn.testing import build_tiny_llama

        model = build_tiny_llama(tmp / "tiny-llama")
    patch = synthetic_patch(model, tmp / "p.patch.safetensors", args.density)
    plain, patched = [], []
    for i in range(args.repeats):
        plain.append(start_seconds(model, None))
        patched.append(start_seconds(model, patch))
        print(f"run {i + 1}/{args.repeats}: plain {plain[-1]:.1f} s, patched {patched[-1]:.1f} s", flush=True)
    p, q = statistics.median(plain), statistics.median(patched)
    print(f"\n| model | patch bytes | plain start (s) | patched start (s) | ratio |\n|---|---|---|---|---|\n"
          f"| {model.name} | {patch.stat().st_size:,} | {p:.1f} | {q:.1f} | {q / p:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
    else:
        main()
