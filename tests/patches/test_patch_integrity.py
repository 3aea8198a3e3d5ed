"""What a patch verifies: version-1 files (unverified, results checked), NaN/inf, results after the write, files
changed after loading, and the loader's per-tensor path."""

import json

import pytest
import torch
from helpers import as_version_1, assert_bit_equal, bits

from serve_unlearn.cli import main
from serve_unlearn.patches import (
    PatchFormatError,
    PatchStateError,
    UnverifiedPatchWarning,
    WeightPatch,
    apply_patch,
    revert_patch,
    stack_patches,
)
from serve_unlearn.patches.apply import apply_to_tensor


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(40, 30, generator=g), "b": torch.randn(40, generator=g)}
    edited = {k: v.clone() for k, v in base.items()}
    m = torch.rand(40, 30, generator=g) < 0.2
    edited["w"][m] = torch.randn(int(m.sum()), generator=g)
    edited["b"] += 1
    return base, edited


def _clone(sd):
    return {k: v.clone() for k, v in sd.items()}


def _data_offset(path, key):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return 8 + n + json.loads(data[8 : 8 + n])[key]["data_offsets"][0]


def test_version_1_loads_applies_and_says_unverified(tmp_path, capsys):
    base, edited = _pair()
    v2 = WeightPatch.from_diff(base, edited, method="test").save(tmp_path / "v2.patch.safetensors")
    v1 = as_version_1(v2, tmp_path / "v1.patch.safetensors")
    with pytest.warns(UnverifiedPatchWarning, match="version-1 patch"):
        patch = WeightPatch.load(v1)
    assert not patch.verified and patch.format_version == 1
    assert WeightPatch.load(v2).verified
    target = _clone(base)
    apply_patch(target, patch)
    assert_bit_equal(target, edited)
    revert_patch(target, patch)
    assert_bit_equal(target, base)
    with pytest.raises(PatchFormatError, match="vouch for bytes nobody checked"):
        patch.save(tmp_path / "laundered.patch.safetensors")
    with pytest.raises(PatchFormatError, match="vouch"):  # nor through a stack
        stack_patches([patch, WeightPatch.from_diff(base, edited, method="x")], overlap="last").save(tmp_path / "s")

    with pytest.warns(UnverifiedPatchWarning):
        assert main(["patch", "inspect", str(v1)]) == 0
    assert "integrity: UNVERIFIED: format 1" in capsys.readouterr().out
    with pytest.warns(UnverifiedPatchWarning):
        assert main(["patch", "inspect", str(v1), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["verified"] is False and info["format_version"] == 1
    assert main(["patch", "inspect", str(v2)]) == 0
    assert "integrity: verified: format 2" in capsys.readouterr().out


def test_version_1_damaged_data_is_caught_after_the_write_and_put_back(tmp_path):
    base, edited = _pair()
    v2 = WeightPatch.from_diff(base, edited).save(tmp_path / "v2.patch.safetensors")
    v1 = as_version_1(v2, tmp_path / "v1.patch.safetensors")
    data = bytearray(v1.read_bytes())
    data[_data_offset(v1, "w::values") + 5] ^= 0x40  # a byte of one stored value
    v1.write_bytes(bytes(data))
    target = _clone(base)
    with pytest.warns(UnverifiedPatchWarning), pytest.raises(PatchFormatError, match="after the write") as err:
        apply_patch(target, v1)
    assert str(v1) in str(err.value)
    assert_bit_equal(target, base)


def test_verify_full_checks_every_result(monkeypatch):
    """A write that goes wrong after the values were verified (a kernel or memory fault) is caught by verify="full"
    and put back; the default trusts the kernel once the file's bytes are verified."""
    from serve_unlearn.patches import format as fmt

    base, edited = _pair()
    patch = WeightPatch.from_diff(base, edited)
    real = fmt.masked_apply_

    def faulty(weight, packed, values, mode):
        real(weight, packed, values, mode)
        weight.view(-1)[0] += 1.0  # one element outside the edit changes
        return weight

    monkeypatch.setattr(fmt, "masked_apply_", faulty)
    target = _clone(base)
    with pytest.raises(PatchFormatError, match=r"tensor .w. did not hold the values"):
        apply_patch(target, patch, verify="full")
    monkeypatch.setattr(fmt, "masked_apply_", real)
    assert_bit_equal(target, base)  # the stray write outside the edited positions too
    t = base["w"].clone()
    monkeypatch.setattr(fmt, "masked_apply_", faulty)
    with pytest.raises(PatchFormatError, match="did not hold the values"):
        apply_to_tensor("w", t, patch, verify="full")
    assert torch.equal(bits(t), bits(base["w"]))


def test_nonfinite_values_refused_unless_the_base_holds_them(tmp_path):
    base, edited = _pair()
    patch = WeightPatch.from_diff(base, edited)
    patch.entries["w"].values[3] = float("nan")
    target = _clone(base)
    with pytest.raises(PatchFormatError, match=r"1 NaN/inf value\(s\) into tensor 'w'"):
        apply_patch(target, patch)
    assert_bit_equal(target, base)
    path = patch.save(tmp_path / "nan.patch.safetensors")  # a file whose digests agree: refused all the same
    with pytest.raises(PatchFormatError, match="NaN/inf") as err:
        apply_patch(target, path)
    assert str(path) in str(err.value)
    t = base["w"].clone()
    with pytest.raises(PatchFormatError, match="NaN/inf"):
        apply_to_tensor("w", t, WeightPatch.load(path))
    assert torch.equal(bits(t), bits(base["w"]))
    with pytest.raises(PatchFormatError, match="did the unlearning run diverge"):
        WeightPatch.from_diff(base, {"w": torch.where(edited["w"] > 2, float("inf"), edited["w"])})


def test_nonfinite_the_base_already_holds_is_kept():
    """A -inf mask buffer carried whole by a dense entry, and a NaN the base held: not created by the patch."""
    base = {"mask": torch.zeros(64), "w": torch.tensor([1.0, float("nan")])}
    base["mask"][1] = float("-inf")
    edited = {"mask": torch.where(base["mask"].isinf(), base["mask"], 0.5), "w": torch.tensor([2.0, 3.0])}
    patch = WeightPatch.from_diff(base, edited)
    assert patch.entries["mask"].form == "dense"
    target = _clone(base)
    apply_patch(target, patch)
    assert_bit_equal(target, edited)
    revert_patch(target, patch)  # the undo puts the base's NaN back
    assert_bit_equal(target, base)
    flipped = WeightPatch.from_diff(base, edited)
    flipped.entries["mask"].values[1] = float("inf")  # +inf where the base holds -inf is a change: refused
    with pytest.raises(PatchFormatError, match="'mask'"):
        apply_patch(_clone(base), flipped)


def test_add_mode_overflow_to_inf_is_refused():
    base = {"w": torch.tensor([60000.0, 1.0, 2.0, 3.0], dtype=torch.float16)}
    patch = WeightPatch.from_diff(base, {"w": torch.tensor([60000.0, 1.5, 2.0, 3.0], dtype=torch.float16)}, mode="add")
    target = _clone(base)
    apply_patch(target, patch)
    revert_patch(target, patch)
    entry = patch.entries["w"]
    entry.values = torch.full_like(entry.values, 30000.0)  # 60000 + 30000 overflows float16
    if entry.form == "mask":
        from serve_unlearn.kernels import pack_mask

        entry.mask, entry.values = pack_mask(torch.tensor([True, False, False, False])), entry.values[:1]
    with pytest.raises(PatchFormatError, match="NaN/inf"):
        apply_patch(target, patch)
    assert_bit_equal(target, base)


def test_file_changed_after_loading_does_not_reach_the_model(tmp_path):
    """Tensors are copied out of the file when it is verified: writing into it later changes nothing loaded."""
    base, edited = _pair()
    path = WeightPatch.from_diff(base, edited).save(tmp_path / "p.patch.safetensors")
    patch = WeightPatch.load(path)
    data = bytearray(path.read_bytes())
    data[-8:] = b"\xff" * 8
    with open(path, "r+b") as f:  # in place: the same inode a memory map would follow
        f.write(bytes(data))
    target = _clone(base)
    apply_patch(target, patch)
    assert_bit_equal(target, edited)


def test_header_not_in_canonical_form_is_refused(tmp_path):
    base, edited = _pair()
    path = WeightPatch.from_diff(base, edited).save(tmp_path / "p.patch.safetensors")
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    end = data.rindex(b"}", 8, 8 + n) + 1
    if end == 8 + n:
        pytest.skip("this header needs no padding")
    data[end] = ord("\t")  # still valid JSON, same content
    path.write_bytes(bytes(data))
    with pytest.raises(PatchFormatError, match="canonical form"):
        WeightPatch.load(path)


def test_loader_path_verifies_each_streamed_tensor(tmp_path):
    """What the vLLM loader calls: stack_patches on the files, apply_to_tensor per tensor as it streams."""
    base, edited = _pair()
    path = WeightPatch.from_diff(base, edited).save(tmp_path / "p.patch.safetensors")
    patch = stack_patches([path])
    for name in patch.tensor_names:
        t = base[name].clone()
        apply_to_tensor(name, t, patch)
        assert torch.equal(bits(t), bits(edited[name]))
        with pytest.raises(PatchStateError, match="already applied"):
            apply_to_tensor(name, t, patch)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(PatchFormatError, match="damaged"):
        stack_patches([path])


def test_large_finite_values_pass_the_nan_check():
    """The NaN/inf check's fast path is a sum; finite values whose sum overflows take the exact path and pass."""
    base = {"w": torch.zeros(64, dtype=torch.float16)}
    edited = {"w": torch.full((64,), 60000.0, dtype=torch.float16)}
    patch = WeightPatch.from_diff(base, edited)
    target = _clone(base)
    apply_patch(target, patch)
    assert_bit_equal(target, edited)
    t = base["w"].clone()
    apply_to_tensor("w", t, patch)
    assert torch.equal(bits(t), bits(edited["w"]))
