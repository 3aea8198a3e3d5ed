"""The patch file: round trip, size bound, and every way a file can be broken."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from serve_unlearn.patches import PatchFormatError, WeightPatch
from serve_unlearn.patches.format import FORMAT_NAME
from serve_unlearn.patches.integrity import HEADER_DIGEST_KEY, header_digest


def _pair(dtype=torch.float32, density=0.1, n=(64, 48)):
    g = torch.Generator().manual_seed(1)
    base = {"a.weight": torch.randn(*n, generator=g).to(dtype), "a.bias": torch.randn(n[0], generator=g).to(dtype),
            "b.weight": torch.randn(8, 8, generator=g).to(dtype)}
    edited = {k: v.clone() for k, v in base.items()}
    m = torch.rand(*n, generator=g) < density
    edited["a.weight"][m] = torch.randn(int(m.sum()), generator=g).to(dtype)
    edited["a.bias"] += 1  # dense edit
    return base, edited, m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_and_header(tmp_path, dtype):
    base, edited, m = _pair(dtype)
    patch = WeightPatch.from_diff(base, edited, method="salun", hparams={"lr": 1e-5}, forget_digest="f" * 64)
    assert patch.tensor_names == ["a.bias", "a.weight"]  # b.weight is unchanged and not stored
    path = patch.save(tmp_path / "p.patch.safetensors")
    loaded = WeightPatch.load(path)
    assert loaded.patch_id == patch.patch_id
    assert loaded.metadata["method"] == "salun" and loaded.metadata["hparams"] == {"lr": 1e-5}
    assert loaded.metadata["forget_digest"] == "f" * 64 and loaded.metadata["mode"] == "replace"
    assert loaded.entries["a.weight"].form == "mask" and loaded.entries["a.bias"].form == "dense"
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
        assert raw["format"] == FORMAT_NAME and json.loads(raw["tensors"])["a.weight"]["nnz"] == int(m.sum())
        assert f.get_tensor("a.weight::mask").dtype == torch.uint8  # never int64
        assert f.get_tensor("a.weight::values").dtype == dtype


@pytest.mark.parametrize("density", [0.01, 0.1, 0.5])
def test_size_bound(tmp_path, density):
    """Patch size <= n/8 + nnz*itemsize plus a small header."""
    base, edited, _ = _pair(torch.bfloat16, density, n=(256, 256))
    edited["a.bias"] = base["a.bias"].clone()
    patch = WeightPatch.from_diff(base, edited)
    e = patch.entries["a.weight"]
    bound = (e.numel + 7) // 8 + e.nnz * 2
    assert patch.nbytes <= bound
    size = patch.save(tmp_path / "p.safetensors").stat().st_size
    assert size <= bound + 4096


def test_dense_form_when_smaller():
    base, edited, _ = _pair(torch.float32, density=0.99)
    patch = WeightPatch.from_diff(base, edited)
    assert patch.entries["a.weight"].form == "dense"


def _good(tmp_path):
    base, edited, _ = _pair()
    return WeightPatch.from_diff(base, edited).save(tmp_path / "p.safetensors")


def test_truncated_file(tmp_path):
    path = _good(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PatchFormatError, match="truncated or corrupt"):
        WeightPatch.load(path)


def test_garbage_and_missing_file(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(PatchFormatError):
        WeightPatch.load(junk)
    with pytest.raises(PatchFormatError, match="does not exist"):
        WeightPatch.load(tmp_path / "nope.safetensors")


def test_not_a_patch(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(PatchFormatError, match="not a serve-unlearn patch"):
        WeightPatch.load(path)


def _rewrite(path, edit_meta=None, edit_tensors=None, redigest=False):
    """Rewrite a patch file with edits; ``redigest`` recomputes the header digest (a consistent but wrong writer)."""
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118 - a safetensors handle is not a dict
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    if redigest:
        meta[HEADER_DIGEST_KEY] = header_digest(meta)
    save_file(tensors, str(path), metadata=meta)


def test_future_version(tmp_path):
    path = _good(tmp_path)
    _rewrite(path, lambda m: m.update(format_version="99"))
    with pytest.raises(PatchFormatError, match="upgrade serve-unlearn"):
        WeightPatch.load(path)


def test_values_count_disagrees_with_mask(tmp_path):
    path = _good(tmp_path)
    _rewrite(path, edit_tensors=lambda t: t.update({"a.weight::values": t["a.weight::values"][:-1].clone()}))
    with pytest.raises(PatchFormatError, match="declares"):
        WeightPatch.load(path)


def test_tampered_header_fingerprint(tmp_path):
    path = _good(tmp_path)
    _rewrite(path, lambda m: m.update(base_fingerprint="0" * 64))
    with pytest.raises(PatchFormatError, match="header does not match its digest"):
        WeightPatch.load(path)
    _rewrite(path, redigest=True)  # the digest now agrees: the fingerprint check is what refuses it
    with pytest.raises(PatchFormatError, match="fingerprint does not match"):
        WeightPatch.load(path)


@pytest.mark.parametrize("key", ["base_fingerprint", "mode", "created_at", "method", "key_convention"])
def test_missing_or_renamed_required_key(tmp_path, key):
    """A renamed key is a missing key, never a skipped check (before: a renamed base_fingerprint went unchecked)."""
    path = _good(tmp_path)
    _rewrite(path, lambda m: m.update({key[:-1] + "X": m.pop(key)}), redigest=True)
    with pytest.raises(PatchFormatError, match=f"lacks the required key '{key}'") as err:
        WeightPatch.load(path)
    assert str(path) in str(err.value)


def test_damaged_header_json(tmp_path):
    path = _good(tmp_path)
    _rewrite(path, lambda m: m.update(tensors="{not json"), redigest=True)
    with pytest.raises(PatchFormatError, match="damaged header"):
        WeightPatch.load(path)


def test_from_diff_refuses_shape_change():
    from serve_unlearn.patches import PatchMismatchError

    with pytest.raises(PatchMismatchError, match="not shapes"):
        WeightPatch.from_diff({"w": torch.zeros(3)}, {"w": torch.zeros(4)})
    with pytest.raises(PatchMismatchError, match="base lacks"):
        WeightPatch.from_diff({"w": torch.zeros(3)}, {"v": torch.zeros(3)})
