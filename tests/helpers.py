"""Assertions shared by the tests."""

import torch


def bits(t: torch.Tensor) -> torch.Tensor:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(ints)


def snapshot(model_or_sd) -> dict[str, torch.Tensor]:
    sd = model_or_sd.state_dict() if hasattr(model_or_sd, "state_dict") else model_or_sd
    return {k: v.detach().clone() for k, v in sd.items()}


def assert_bit_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(bits(a[k]), bits(b[k])), f"tensor {k} changed"


def run_interpreter_suite(test_file: str) -> None:
    """Run ``test_file``'s ``test_interp_*`` tests in a fresh pytest started with TRITON_INTERPRET=1.

    Triton decides interpreted vs compiled when it is imported, so those tests cannot share a process with the
    compiled ones (see tests/test_kernels.py's docstring).
    """
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SERVE_UNLEARN_KERNEL_IMPL")}
    env["TRITON_INTERPRET"] = "1"
    here = str(Path(test_file).resolve().relative_to(repo))
    args = ["-m", "pytest", here, "-k", "test_interp_", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    proc = subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(f"interpreter subprocess: {summary}")
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary and "deselected" in summary, summary
