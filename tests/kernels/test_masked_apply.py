"""masked_apply_: the Triton kernel against ``masked_apply_torch.masked_apply_`` (on CPU through the Triton
interpreter), the torch reference against a naive boolean-index oracle, the dispatch, and the compiled kernel (built for sm_90 here;
run on CUDA where there is one).

How the interpreter tests run. Triton must see ``TRITON_INTERPRET=1`` before ``import triton``: the @jit
helpers of ``triton.language`` itself are built interpreted or compiled at that import, and ``@triton.jit`` in
our module decides when the module is imported. A process that mixes the two breaks inside Triton (a
compiled-mode import of ``triton.experimental.gluon`` asserts on interpreted ``tl.standard`` functions), and
setting the variable at the top of this file is too late whenever anything imported triton earlier in the
session; it would also leak into later tests and the vLLM subprocesses they start. So the ``test_interp_*``
tests (marker ``interp``) run in their own pytest started with ``TRITON_INTERPRET=1`` in its environment:
``make test`` runs ``TRITON_INTERPRET=1 pytest tests/kernels -m interp`` before the main run, and every process
not started that way deselects them (conftest.py). The compiled-kernel tests need the opposite and skip under the
interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    bits,
    compile_sm90,
    compiled_only,
    interp_only,
    kernel_module,
    needs_triton,
)

from serve_unlearn import kernels
from serve_unlearn.kernels import dispatch
from serve_unlearn.kernels import masked_apply_torch as reference

REPO = Path(__file__).resolve().parents[2]
SIZES = [1, 7, 8, 9, 1000, 4099, (5, 123, 123)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DENSITIES = {"empty": 0.0, "1%": 0.01, "50%": 0.5, "full": 1.0}
# (dtype, atol, rtol) for mode="add". Both sides add in float32 and round once to nearest even (the kernel
# rounds bf16 by hand for that), so add is exact too; a backend that cannot promise it loosens its row here.
ADD_TOL = {torch.float32: (0.0, 0.0), torch.bfloat16: (0.0, 0.0), torch.float16: (0.0, 0.0)}


def _run(args, **env):
    """Run a Python subprocess in the repo with a clean kernel environment plus ``env``."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", kernels.IMPL_ENV)}
    full_env.update(env)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.fixture(scope="module")
def tri():
    """The kernel module as this process imports it: interpreted under TRITON_INTERPRET=1, else compiled."""
    return kernel_module("masked_apply_triton")


def _case(shape, dtype, density, seed=0):
    """A weight, its mask (exactly empty/full at the ends), the packed mask, values in the weight's dtype."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g).to(dtype)
    mask = torch.rand(shape, generator=g) < density
    if density >= 1.0:
        mask[...] = True
    values = torch.randn(int(mask.sum()), generator=g).to(dtype)
    return weight, mask, reference.pack_mask(mask), values


def _naive(weight, mask, values, mode):
    """The simplest correct answer: boolean indexing on a copy."""
    out = weight.clone()
    m = mask.reshape(-1)
    if mode == "replace":
        out.view(-1)[m] = values.to(out.dtype)
    else:
        out.view(-1)[m] = (out.view(-1)[m].to(torch.float32) + values.to(torch.float32)).to(out.dtype)
    return out


def _assert_same(actual, expected, mode, dtype):
    if mode == "replace":
        assert torch.equal(bits(actual), bits(expected))
    else:
        atol, rtol = ADD_TOL[dtype]
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------------- parity


@interp_only
@pytest.mark.parametrize("mode", ["replace", "add"])
@pytest.mark.parametrize("density", list(DENSITIES.values()), ids=list(DENSITIES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SIZES, ids=str)
def test_interp_matches_reference(tri, shape, dtype, density, mode):
    weight, _, packed, values = _case(shape, dtype, density)
    # the interpreter costs ~ms per program: small blocks give the small sizes several programs (the prefix
    # sum across blocks is exercised); the largest size runs with the default block
    block = 256 if weight.numel() <= 5000 else tri.BLOCK
    expected = reference.masked_apply_(weight.clone(), packed, values, mode)
    actual = weight.clone()
    out = tri.masked_apply_triton_(actual, packed, values, mode, block=block)
    assert out is actual and actual.shape == weight.shape
    _assert_same(actual, expected, mode, dtype)


@interp_only
@pytest.mark.parametrize("density", list(DENSITIES.values()), ids=list(DENSITIES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SIZES, ids=str)
def test_interp_gather_matches_reference(tri, shape, dtype, density):
    """The undo's read: the masked elements in flat order, bit for bit, and the weight untouched."""
    weight, _, packed, _ = _case(shape, dtype, density)
    block = 256 if weight.numel() <= 5000 else tri.BLOCK
    before = weight.clone()
    out = tri.masked_gather_triton(weight, packed, block=block)
    assert torch.equal(bits(out), bits(reference.masked_gather(weight, packed)))
    assert torch.equal(bits(weight), bits(before))


@interp_only
@pytest.mark.parametrize("mode", ["replace", "add"])
@pytest.mark.parametrize(
    "wdtype,vdtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float16),
        (torch.bfloat16, torch.float64),
    ],
    ids=str,
)
def test_interp_casts_values_like_reference(tri, wdtype, vdtype, mode):
    """Values of another float dtype are cast in the kernel, rounding exactly as torch does."""
    weight, mask, packed, _ = _case(2051, wdtype, 0.5)
    values = torch.randn(int(mask.sum()), generator=torch.Generator().manual_seed(1)).to(vdtype) * 3
    expected = reference.masked_apply_(weight.clone(), packed, values, mode)
    actual = tri.masked_apply_triton_(weight.clone(), packed, values, mode, block=256)
    _assert_same(actual, expected, "replace", wdtype)  # exact in both modes


@interp_only
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy, 1e39 -> fp16 inf
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["replace", "add"])
def test_interp_rounding_edge_cases(tri, wdtype, mode):
    """Ties, subnormals, overflow, inf, NaN: bf16/fp16 rounding must be torch's (round to nearest even).

    The interpreter's own fp32<->bf16 casts truncate and mis-handle subnormals, which is why the kernel
    converts bf16 by hand; this test fails if that is dropped.
    """
    one = 1.0
    specials = [one + 2**-8, one + 3 * 2**-8, one + 2**-9, -(one + 2**-8), 2**-130, -(2**-133), 1e-45,
                3.4e38, 1e39, float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 65504.0, 65520.0, 6e-8]
    values = torch.tensor(specials * 3, dtype=torch.float32)
    weight = torch.tensor(
        [2**-130, -(2**-126), 1.0, 0.0, -0.0, 3e38, 1e-40] * 8, dtype=torch.float32
    )[: values.numel()].to(wdtype)
    packed = reference.pack_mask(torch.ones(values.numel(), dtype=torch.bool))
    expected = reference.masked_apply_(weight.clone(), packed, values, mode)
    actual = tri.masked_apply_triton_(weight.clone(), packed, values, mode, block=64)
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    assert torch.equal(bits(actual)[~nan], bits(expected)[~nan])


@interp_only
def test_interp_keeps_bits_outside_the_mask(tri):
    weight, mask, packed, values = _case(3001, torch.bfloat16, 0.3)
    weight.view(-1)[::7] = float("nan")
    weight.view(-1)[3::7] = -0.0
    before = weight.clone()
    tri.masked_apply_triton_(weight, packed, values, "add", block=128)
    assert torch.equal(bits(weight)[~mask], bits(before)[~mask])


# ------------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 1000, 4099])
def test_pack_unpack_round_trip(n):
    mask = torch.rand(n) < 0.4
    packed = reference.pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy(), bitorder="little"))
    assert torch.equal(reference.unpack_mask(packed, n), mask)
    assert reference.popcount(packed) == int(mask.sum())
    if n >= 24:
        assert torch.equal(reference.unpack_mask(packed, n, 8, n - 5), mask[8 : n - 5])


def test_unpack_start_must_be_byte_aligned():
    with pytest.raises(ValueError, match="multiple of 8"):
        reference.unpack_mask(reference.pack_mask(torch.ones(16, dtype=torch.bool)), 16, 3)


@pytest.mark.parametrize("mode", ["replace", "add"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("density", [0.0, 0.05, 0.2, 0.3, 0.6, 0.97, 1.0])
def test_reference_matches_naive_across_chunks(monkeypatch, dtype, density, mode):
    """Small chunks so one weight mixes empty, sparse (masked_scatter_), dense (bit blend) and full chunks."""
    monkeypatch.setattr(reference, "CHUNK_ELEMS", 64)
    weight, mask, packed, values = _case((37, 29), dtype, density)
    mask.view(-1)[64:128] = True  # the second chunk is full
    mask.view(-1)[-256:] = False  # the last four are empty
    packed, values = reference.pack_mask(mask), torch.randn(int(mask.sum())).to(dtype)
    expected = _naive(weight, mask, values, mode)
    actual = reference.masked_apply_(weight.clone(), packed, values, mode)
    assert torch.equal(bits(actual), bits(expected))


@pytest.mark.parametrize("density", [0.05, 0.6])
def test_replace_then_gather_returns_values_and_keeps_the_rest(density):
    weight, mask, packed, values = _case((5, 123, 123), torch.bfloat16, density)
    weight.view(-1)[::11] = float("nan")  # NaN and -0.0 outside the mask must survive bit for bit
    weight.view(-1)[5::11] = -0.0
    before = weight.clone()
    reference.masked_apply_(weight, packed, values, "replace")
    assert torch.equal(bits(reference.masked_gather(weight, packed)), bits(values))
    assert torch.equal(bits(weight)[~mask], bits(before)[~mask])


# ---------------------------------------------------------------------------------------------------- errors


def _assert_count_checked_before_writing(fn, delta):
    weight, _, packed, values = _case(100, torch.float32, 0.5)
    values = torch.randn(values.numel() + delta)
    before = weight.clone()
    with pytest.raises(ValueError, match="values were given"):
        fn(weight, packed, values, "replace")
    assert torch.equal(weight, before)


def _assert_bad_mode_raises(fn):
    weight, _, packed, values = _case(16, torch.float32, 0.5)
    with pytest.raises(ValueError, match="mode"):
        fn(weight, packed, values, "multiply")


@pytest.mark.parametrize("delta", [-1, 1])
def test_reference_wrong_value_count_raises_before_writing(delta):
    _assert_count_checked_before_writing(reference.masked_apply_, delta)


@interp_only
@pytest.mark.parametrize("delta", [-1, 1])
def test_interp_wrong_value_count_raises_before_writing(tri, delta):
    _assert_count_checked_before_writing(tri.masked_apply_triton_, delta)


def test_reference_bad_mode_raises():
    _assert_bad_mode_raises(reference.masked_apply_)


@interp_only
def test_interp_bad_mode_raises(tri):
    _assert_bad_mode_raises(tri.masked_apply_triton_)


@interp_only
def test_interp_rejects_non_contiguous(tri):
    weight = torch.randn(16, 8).t()
    packed = reference.pack_mask(torch.ones(128, dtype=torch.bool))
    with pytest.raises(ValueError, match="contiguous"):
        tri.masked_apply_triton_(weight, packed, torch.randn(128))


def _assert_bad_masks_raise(fn):
    with pytest.raises(ValueError, match="bytes"):
        fn(torch.randn(17), torch.zeros(2, dtype=torch.uint8), torch.randn(0))
    padding_bit_set = torch.tensor([0, 0, 0b10], dtype=torch.uint8)  # element 17 of a 17-element weight
    with pytest.raises(ValueError, match="padding"):
        fn(torch.randn(17), padding_bit_set, torch.randn(1))


def test_reference_rejects_bad_masks():
    _assert_bad_masks_raise(reference.masked_apply_)


@interp_only
def test_interp_rejects_bad_masks(tri):
    _assert_bad_masks_raise(tri.masked_apply_triton_)


# -------------------------------------------------------------------------------------------------- dispatch


@compiled_only
def test_explicit_triton_on_cpu_without_interpreter_raises():
    weight, _, packed, values = _case(64, torch.float32, 0.5)
    before = weight.clone()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1|not installed"):
        kernels.masked_apply_(weight, packed, values, impl="triton")
    assert torch.equal(weight, before)


def test_explicit_triton_without_triton_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "is_triton_available", lambda: False)
    weight, _, packed, values = _case(64, torch.float32, 0.5)
    with pytest.raises(RuntimeError, match="not installed"):
        kernels.masked_apply_(weight, packed, values, impl="triton")


@pytest.mark.parametrize(
    "impl,env", [(None, None), ("auto", None), ("torch", None), (None, "torch"), (None, "auto")]
)
def test_cpu_weights_take_the_torch_path(monkeypatch, impl, env):
    """auto falls back to torch on CPU silently (interpreter or not) where numba is missing; torch is torch."""
    monkeypatch.setattr(kernels.masked_apply, "is_numba_available", lambda: False)
    if env is None:
        monkeypatch.delenv(kernels.IMPL_ENV, raising=False)
    else:
        monkeypatch.setenv(kernels.IMPL_ENV, env)
    calls = []
    monkeypatch.setattr(reference, "masked_apply_", lambda *a: calls.append(a) or a[0])
    weight, _, packed, values = _case(64, torch.float32, 0.5)
    assert kernels.masked_apply_(weight, packed, values, impl=impl) is weight
    assert len(calls) == 1


@pytest.mark.parametrize("impl,env", [("cuda", None), (None, "tritonn")])
def test_unknown_impl_raises(monkeypatch, impl, env):
    monkeypatch.setenv(kernels.IMPL_ENV, env or "auto")
    weight, _, packed, values = _case(8, torch.float32, 0.5)
    with pytest.raises(ValueError, match="must be one of"):
        kernels.masked_apply_(weight, packed, values, impl=impl)


def test_import_does_not_need_triton():
    code = "import sys, serve_unlearn.kernels as k; "
    code += "print('triton' in sys.modules, k.__all__ == sorted(k.__all__))"
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]


@interp_only
@pytest.mark.parametrize("mode", ["replace", "add"])
def test_interp_dispatch_explicit_triton_on_cpu(tri, monkeypatch, mode):
    """impl from the env var; CPU tensors reach the kernel because the process runs the interpreter."""
    monkeypatch.setenv(kernels.IMPL_ENV, "triton")
    calls = []
    real = tri.masked_apply_triton_
    monkeypatch.setattr(tri, "masked_apply_triton_", lambda *a: calls.append(1) or real(*a))
    weight, _, packed, values = _case(3000, torch.bfloat16, 0.3)
    values = values.float()
    expected = reference.masked_apply_(weight.clone(), packed, values, mode)
    actual = kernels.masked_apply_(weight.clone(), packed, values, mode)
    assert calls == [1]
    assert torch.equal(bits(actual), bits(expected))



# ------------------------------------------------------------------------------------------------- compiled


@compiled_only
@needs_triton
@pytest.mark.parametrize("mode", ["replace", "add"])
@pytest.mark.parametrize("wdtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("vdtype", ["same", "fp32"])
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")  # no multiply-add in this kernel
def test_kernel_compiles_for_sm90(tri, wdtype, vdtype, mode):
    """The interpreter accepts code the compiler rejects: build the real kernel to a cubin, no GPU needed."""
    signature = {
        "w_ptr": f"*{wdtype}",
        "packed_ptr": "*u8",
        "values_ptr": f"*{wdtype if vdtype == 'same' else vdtype}",
        "block_start_ptr": "*i64",
        "n": "i64",
        "BLOCK": "constexpr",
        "ADD": "constexpr",
    }
    compile_sm90(tri._masked_apply_kernel, signature, {"BLOCK": tri.BLOCK, "ADD": mode == "add"})


@compiled_only
@needs_triton
@pytest.mark.parametrize("wdtype", ["fp32", "bf16", "fp16"])
def test_gather_kernel_compiles_for_sm90(tri, wdtype):
    signature = {"w_ptr": f"*{wdtype}", "packed_ptr": "*u8", "out_ptr": f"*{wdtype}", "block_start_ptr": "*i64",
                 "n": "i64", "BLOCK": "constexpr"}
    compile_sm90(tri._masked_gather_kernel, signature, {"BLOCK": tri.BLOCK})


@pytest.mark.gpu
@compiled_only
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [9, 4099, (5, 123, 123), (1 << 22) + 3], ids=str)
def test_compiled_gather_on_cuda(tri, shape, dtype):
    for density in DENSITIES.values():
        weight, _, packed, _ = _case(shape, dtype, density)
        expected = reference.masked_gather(weight, packed)
        assert torch.equal(bits(kernels.masked_gather(weight.cuda(), packed).cpu()), bits(expected))


@pytest.mark.gpu
@compiled_only
@needs_triton
@pytest.mark.parametrize("mode", ["replace", "add"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [9, 4099, (5, 123, 123), (1 << 22) + 3], ids=str)
def test_compiled_kernel_on_cuda(tri, shape, dtype, mode):
    for density in DENSITIES.values():
        weight, _, packed, values = _case(shape, dtype, density)
        weight, packed, values = weight.cuda(), packed.cuda(), values.cuda()
        expected = reference.masked_apply_(weight.clone(), packed, values, mode)
        actual = tri.masked_apply_triton_(weight.clone(), packed, values, mode)
        _assert_same(actual, expected, mode, dtype)
    # the dispatch takes Triton for CUDA weights by default and moves a CPU mask and values over
    weight, _, packed, values = _case(shape, dtype, 0.5)
    expected = reference.masked_apply_(weight.cuda(), packed.cuda(), values.cuda(), mode)
    actual = kernels.masked_apply_(weight.cuda(), packed, values, mode)
    _assert_same(actual, expected, mode, dtype)
