"""apply / revert / stack / materialize on transformers, diffusers and plain torch models."""

import pytest
import torch
from helpers import assert_bit_equal, bits, snapshot

import serve_unlearn
from serve_unlearn.patches import (
    PatchMismatchError,
    PatchStateError,
    WeightPatch,
    apply_patch,
    materialize,
    revert_patch,
    stack_patches,
)


def _edit(sd, names, density=0.2, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in sd.items()}
    for n in names:
        m = torch.rand(out[n].shape, generator=g) < density
        out[n][m] += scale * torch.randn(int(m.sum()), generator=g).to(out[n].dtype)
    return out


def _targets(tiny_llama, tiny_unet, tiny_mlp):
    model, _ = tiny_llama
    return {
        "transformers": (model, ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"]),
        "diffusers": (tiny_unet, ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                                  "conv_in.weight"]),
        "torch": (tiny_mlp, ["net.0.weight", "net.4.bias"]),
    }


@pytest.mark.parametrize("kind", ["transformers", "diffusers", "torch"])
def test_apply_revert_bit_exact(kind, tiny_llama, tiny_unet, tiny_mlp, tmp_path):
    model, names = _targets(tiny_llama, tiny_unet, tiny_mlp)[kind]
    base = snapshot(model)
    edited = _edit(base, names)
    path = WeightPatch.from_diff(base, edited, method="test").save(tmp_path / "p.safetensors")
    serve_unlearn.apply_patch(model, path)
    assert_bit_equal(snapshot(model), edited)
    serve_unlearn.revert_patch(model, path)
    assert_bit_equal(snapshot(model), base)


def test_patched_transformers_model_changes_output(tiny_llama, tmp_path):
    model, tok = tiny_llama
    ids = tok("The secret password", return_tensors="pt").input_ids
    before = model(ids).logits
    base = snapshot(model)
    patch = WeightPatch.from_diff(base, _edit(base, ["model.layers.0.mlp.down_proj.weight"], scale=5.0))
    undo = apply_patch(model, patch)
    assert not torch.allclose(model(ids).logits, before)
    revert_patch(model, patch, undo=undo)
    assert torch.equal(model(ids).logits, before)


def test_wrong_base_names_first_tensor_and_leaves_model_unchanged(tiny_mlp):
    base = snapshot(tiny_mlp)
    patch = WeightPatch.from_diff(base, _edit(base, ["net.0.weight", "net.2.weight"]))
    with torch.no_grad():
        tiny_mlp.net[2].weight[0, 0] += 1.0  # the model now differs from the patch's base in net.2.weight only
    before = snapshot(tiny_mlp)
    with pytest.raises(PatchMismatchError, match=r"'net\.2\.weight' differs from the base"):
        apply_patch(tiny_mlp, patch)
    assert_bit_equal(snapshot(tiny_mlp), before)  # net.0.weight was checked to fit but never written


def test_shape_dtype_and_unknown_name_errors(tiny_mlp):
    base = snapshot(tiny_mlp)
    patch = WeightPatch.from_diff(base, _edit(base, ["net.0.weight"]))
    other = torch.nn.Sequential()
    other.net = torch.nn.Sequential(torch.nn.Linear(17, 32))
    with pytest.raises(PatchMismatchError, match="another model architecture"):
        apply_patch(other, patch)
    half = snapshot(tiny_mlp)
    half["net.0.weight"] = half["net.0.weight"].half()
    with pytest.raises(PatchMismatchError, match="load the model with dtype=float32"):
        apply_patch(half, patch)
    with pytest.raises(PatchMismatchError, match="not in the model"):
        apply_patch({"x": torch.zeros(1)}, patch)


def test_double_apply_and_revert_without_apply(tiny_mlp):
    base = snapshot(tiny_mlp)
    patch = WeightPatch.from_diff(base, _edit(base, ["net.0.weight"]))
    with pytest.raises(PatchStateError, match="not applied"):
        revert_patch(tiny_mlp, patch)
    apply_patch(tiny_mlp, patch)
    patched = snapshot(tiny_mlp)
    with pytest.raises(PatchStateError, match="already applied"):
        apply_patch(tiny_mlp, patch)
    assert_bit_equal(snapshot(tiny_mlp), patched)


def test_failure_midway_rolls_back(tiny_mlp, monkeypatch):
    """All or nothing: a write that fails after others succeeded puts the earlier ones back."""
    from serve_unlearn.patches import format as fmt

    base = snapshot(tiny_mlp)
    patch = WeightPatch.from_diff(base, _edit(base, ["net.0.weight", "net.2.weight", "net.4.weight"]))
    real = fmt.masked_apply_
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("simulated")
        return real(*args, **kwargs)

    monkeypatch.setattr(fmt, "masked_apply_", flaky)
    with pytest.raises(MemoryError):
        apply_patch(tiny_mlp, patch)
    monkeypatch.setattr(fmt, "masked_apply_", real)
    assert_bit_equal(snapshot(tiny_mlp), base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_mode_round_trips(tiny_mlp, dtype):
    sd = {k: v.to(dtype) for k, v in snapshot(tiny_mlp).items()}
    edited = _edit(sd, ["net.0.weight"])
    patch = WeightPatch.from_diff(sd, edited, mode="add")
    target = {k: v.clone() for k, v in sd.items()}
    apply_patch(target, patch)
    assert_bit_equal(target, edited)
    revert_patch(target, patch)
    assert_bit_equal(target, sd)


def test_stack_last_wins_and_error_rule(tiny_mlp):
    base = snapshot(tiny_mlp)
    e1 = _edit(base, ["net.0.weight", "net.2.weight"], seed=1)
    e2 = _edit(base, ["net.0.weight"], seed=2)
    p1, p2 = WeightPatch.from_diff(base, e1), WeightPatch.from_diff(base, e2)
    target = {k: v.clone() for k, v in base.items()}
    apply_patch(target, stack_patches([p1, p2]))
    m2 = bits(e2["net.0.weight"]) != bits(base["net.0.weight"])
    expected = torch.where(m2, e2["net.0.weight"], e1["net.0.weight"])
    assert torch.equal(target["net.0.weight"], expected)
    assert torch.equal(target["net.2.weight"], e1["net.2.weight"])
    with pytest.raises(PatchMismatchError, match="overlap"):
        stack_patches([p1, p2], overlap="error")
    other = WeightPatch.from_diff(e1, _edit(e1, ["net.0.weight"], seed=3))  # made on a patched model
    with pytest.raises(PatchMismatchError, match="different models"):
        stack_patches([p1, other])


def test_tied_weights_written_once():
    sd = {"a": torch.zeros(4, 4)}
    sd["b"] = sd["a"]  # two names, one tensor (like tied embeddings)
    edited = {"a": torch.ones(4, 4), "b": torch.ones(4, 4)}
    patch = WeightPatch.from_diff({k: v.clone() for k, v in sd.items()}, edited, mode="add")
    apply_patch(sd, patch)
    assert torch.equal(sd["a"], torch.ones(4, 4))  # added once, not twice


def test_materialize_sharded_checkpoint(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = tiny_llama
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir, max_shard_size="300KB")
    assert len(list(base_dir.glob("*.safetensors"))) > 1
    base = snapshot(model)
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"]
    p1 = WeightPatch.from_diff(base, _edit(base, names[:2], seed=1))
    p2 = WeightPatch.from_diff(base, _edit(base, names[1:], seed=2))
    out = materialize(base_dir, [p1, p2], tmp_path / "patched")
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in base_dir.glob("*.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    expected = {k: v.clone() for k, v in base.items()}
    apply_patch(expected, stack_patches([p1, p2]))
    assert_bit_equal(snapshot(reloaded), expected)
    with pytest.raises(FileExistsError):
        materialize(base_dir, [p1], out)


def test_materialize_wrong_base_leaves_no_folder(tiny_llama, tmp_path):
    model, _ = tiny_llama
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    base = snapshot(model)
    alien = {k: v + 1 for k, v in base.items() if k == "lm_head.weight"}
    patch = WeightPatch.from_diff(alien, _edit(alien, ["lm_head.weight"]))
    with pytest.raises(PatchMismatchError, match="lm_head.weight"):
        materialize(base_dir, patch, tmp_path / "out")
    assert not (tmp_path / "out").exists()
