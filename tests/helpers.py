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
interp_only = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess of test_interpreter_suite"
)
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


def run_interpreter_suite(test_file: str) -> None:
    """Run ``test_file``'s ``test_interp_*`` tests in a fresh pytest started with TRITON_INTERPRET=1.

    Triton decides interpreted vs compiled when it is imported, so those tests cannot share a process with the
    compiled ones (see tests/test_kernels.py's docstring).
    """
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SERVE_UNLEARN_KERNEL_IMPL")}
    env["TRITON_INTERPRET"] = "1"
    here = str(Path(test_file).resolve().relative_to(REPO))
    args = ["-m", "pytest", here, "-k", "test_interp_", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(f"interpreter subprocess: {summary}")
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary and "deselected" in summary, summary


def interpreter_suite(test_file: str):
    """``test_file``'s ``test_interpreter_suite``: a test that runs its ``test_interp_*`` tests through
    ``run_interpreter_suite``, from a compiled-mode process where triton is installed."""

    @compiled_only
    @needs_triton
    def test_interpreter_suite():
        """Runs the ``test_interp_*`` tests in a fresh process started with TRITON_INTERPRET=1."""
        run_interpreter_suite(test_file)

    return test_interpreter_suite
