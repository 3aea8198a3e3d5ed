"""masked_apply_numba (the compiled CPU loop) against the torch reference, bit for bit, and the CPU dispatch."""

from __future__ import annotations

import pytest
import torch
from helpers import bits

from serve_unlearn import kernels
from serve_unlearn.kernels import masked_apply_torch as reference

nb = pytest.importorskip("serve_unlearn.kernels.masked_apply_numba", reason="numba is not installed")

SIZES = [1, 7, 8, 9, 63, 64, 65, 1000, 4099, (5, 123, 123), 300_001]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DENSITIES = [0.0, 0.01, 0.5, 0.97, 1.0]


def _case(shape, dtype, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g).to(dtype)
    mask = torch.rand(shape, generator=g) < density
    if density >= 1.0:
        mask[...] = True
    values = torch.randn(int(mask.sum()), generator=g).to(dtype)
    return weight, mask, reference.pack_mask(mask), values


@pytest.mark.parametrize("mode", ["replace", "add"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SIZES, ids=str)
def test_numba_matches_reference(shape, dtype, density, mode):
    weight, mask, packed, values = _case(shape, dtype, density)
    weight.view(-1)[::13] = float("nan")  # NaN and -0.0 outside the mask survive bit for bit
    weight.view(-1)[4::13] = -0.0
    expected = reference.masked_apply_(weight.clone(), packed, values, mode)
    actual = weight.clone()
    assert nb.masked_apply_(actual, packed, values, mode) is actual
    # NaN + v in add mode is NaN whose payload torch's own fp16/bf16 casts choose per code path (vectorised or
    # not), so the reference differs from itself there; everything else is bit for bit
    nan = expected.isnan() & mask if mode == "add" else torch.zeros_like(mask)
    assert torch.equal(actual.isnan()[nan], nan[nan])
    assert torch.equal(bits(actual)[~nan], bits(expected)[~nan])
    assert torch.equal(bits(nb.masked_gather(weight, packed)), bits(reference.masked_gather(weight, packed)))


@pytest.mark.parametrize("mode", ["replace", "add"])
@pytest.mark.parametrize("wdtype,vdtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                           (torch.float16, torch.float64)], ids=str)
def test_numba_casts_values_like_reference(wdtype, vdtype, mode):
    weight, mask, packed, _ = _case(2051, wdtype, 0.5)
    values = torch.randn(int(mask.sum()), generator=torch.Generator().manual_seed(1)).to(vdtype) * 3
    expected = reference.masked_apply_(weight.clone(), packed, values, mode)
    assert torch.equal(bits(nb.masked_apply_(weight.clone(), packed, values, mode)), bits(expected))


def test_numba_unaligned_and_strided_inputs():
    """A mask that is a slice of a bigger buffer (not 8-byte aligned) and non-contiguous values."""
    weight, _, packed, values = _case(1027, torch.float32, 0.4)
    shifted = torch.cat([torch.zeros(3, dtype=torch.uint8), packed])[3:]
    assert shifted.data_ptr() % 8
    strided = torch.stack([values, values], 1)[:, 0]
    expected = reference.masked_apply_(weight.clone(), packed, values, "replace")
    assert torch.equal(nb.masked_apply_(weight.clone(), shifted, strided, "replace"), expected)


@pytest.mark.parametrize("delta", [-1, 1])
def test_numba_wrong_value_count_raises_before_writing(delta):
    weight, _, packed, values = _case(100, torch.float32, 0.5)
    before = weight.clone()
    with pytest.raises(ValueError, match="values were given"):
        nb.masked_apply_(weight, packed, torch.randn(values.numel() + delta), "replace")
    assert torch.equal(weight, before)


def test_numba_rejects_bad_masks_and_modes():
    with pytest.raises(ValueError, match="bytes"):
        nb.masked_apply_(torch.randn(17), torch.zeros(2, dtype=torch.uint8), torch.randn(0))
    with pytest.raises(ValueError, match="padding"):
        nb.masked_apply_(torch.randn(17), torch.tensor([0, 0, 0b10], dtype=torch.uint8), torch.randn(1))
    weight, _, packed, values = _case(16, torch.float32, 0.5)
    with pytest.raises(ValueError, match="mode"):
        nb.masked_apply_(weight, packed, values, "multiply")


def test_numba_writes_a_parameter_in_place():
    weight, _, packed, values = _case((33, 17), torch.float32, 0.3)
    param = torch.nn.Parameter(weight.clone())
    nb.masked_apply_(param, packed, values)
    assert torch.equal(param.detach(), reference.masked_apply_(weight.clone(), packed, values))


@pytest.mark.parametrize("impl,env", [(None, None), ("auto", None), ("numba", None), (None, "numba")])
def test_cpu_weights_take_the_numba_path(monkeypatch, impl, env):
    if env is None:
        monkeypatch.delenv(kernels.IMPL_ENV, raising=False)
    else:
        monkeypatch.setenv(kernels.IMPL_ENV, env)
    calls = []
    monkeypatch.setattr(nb, "masked_apply_", lambda *a: calls.append(a) or a[0])
    weight, _, packed, values = _case(64, torch.float32, 0.5)
    assert kernels.masked_apply_(weight, packed, values, impl=impl) is weight
    assert len(calls) == 1


def test_non_contiguous_weights_fall_back_to_torch_or_refuse(monkeypatch):
    monkeypatch.delenv(kernels.IMPL_ENV, raising=False)
    weight = torch.randn(16, 8).t()
    packed = reference.pack_mask(torch.rand(128) < 0.5)
    values = torch.randn(reference.popcount(packed))
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels.masked_apply_(weight, packed, values, impl="numba")
    # auto: the torch path, whose view(-1) refuses a transposed weight the same way it always did
    with pytest.raises(RuntimeError):
        kernels.masked_apply_(weight, packed, values)
