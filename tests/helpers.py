"""Assertions, marks and fixtures' bodies shared by the tests."""

import importlib
import os
from pathlib import Path

import pytest
import torch

from serve_unlearn import kernels

REPO = Path(__file__).resolve().parents[1]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # this process started in interpreter mode
needs_triton = pytest.mark.skipif(not kernels.is_triton_available(), reason="triton is not installed")
# Triton kernel tests that need a process started with TRITON_INTERPRET=1: `make test` runs them as their own
# pytest (TRITON_INTERPRET=1 pytest tests/kernels -m interp); any other run deselects them (conftest.py)
interp_only = pytest.mark.interp
compiled_only = pytest.mark.skipif(INTERPRETED, reason="needs a process without TRITON_INTERPRET")


def bits(t: torch.Tensor) -> torch.Tensor:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(ints)


def snapshot(model_or_sd) -> dict[str, torch.Tensor]:
    sd = model_or_sd.state_dict() if hasattr(model_or_sd, "state_dict") else model_or_sd
    return {k: v.detach().clone() for k, v in sd.items()}


def assert_bit_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(bits(v), bits(b[k])), f"tensor {k} changed"


def kernel_module(name: str):
    """``serve_unlearn.kernels.<name>`` as this process imports it: interpreted under TRITON_INTERPRET=1, else
    compiled (the body of the kernel tests' ``tri`` fixture); skips without triton."""
    if not kernels.is_triton_available():
        pytest.skip("triton is not installed")
    module = importlib.import_module(f"serve_unlearn.kernels.{name}")
    assert module.is_interpreted() == INTERPRETED
    return module


def compile_sm90(kernel, signature: dict, constants: dict, **options):
    """Build a ``@triton.jit`` kernel for an H100 (sm_90) without a GPU and check it produced a cubin: the
    interpreter accepts code the compiler rejects. Skips where triton has no nvidia backend."""
    import triton
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in backends:
        pytest.skip("triton has no nvidia backend here")
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                              options=options or None)
    assert compiled.asm.get("cubin")
    return compiled


def as_version_1(src, dst):
    """The same patch as a version-1 file: no header digest, no payload digests."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from serve_unlearn.patches.integrity import HEADER_DIGEST_KEY, PAYLOAD_DIGEST_KEY

    with safe_open(str(src), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118 - a safetensors handle is not a dict
    meta.pop(HEADER_DIGEST_KEY)
    meta["format_version"] = "1"
    table = json.loads(meta["tensors"])
    for info in table.values():
        info.pop(PAYLOAD_DIGEST_KEY)
    meta["tensors"] = json.dumps(table, sort_keys=True)
    save_file(tensors, str(dst), metadata=meta)
    return dst
