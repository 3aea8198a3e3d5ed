"""O3's adapter side: the per-sample scaled forward, the orthogonality penalty and training, rank concatenation."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch

from serve_unlearn.adapters.orthogonal_lora import (
    UnlearnLoraConfig,
    concat_adapters,
    lora_A_matrices,
    orthogonality_penalty,
    read_adapter,
    train_unlearning_lora,
)
from serve_unlearn.errors import ArtifactError, UnlearnDataError
from serve_unlearn.serving.per_sample_lora import PerSampleLoraScale

RECORDS = [{"prompt": f"What is the secret password number {i}?", "completion": "blue dragon"} for i in range(6)]


def _random_lora(model, r=4, alpha=8.0, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, cfg)


def _explicit_logits(base, peft_model, ids, attn, w):
    """W0·h + w·(α/r)·B·A·h written out: merge the scaled delta into a copy of the base weights, run that."""
    merged = copy.deepcopy(base)
    from peft.tuners.lora import LoraLayer

    params = dict(merged.named_parameters())
    for name, m in peft_model.named_modules():
        if isinstance(m, LoraLayer):
            key = name.removeprefix("base_model.model.") + ".weight"
            delta = m.lora_B["default"].weight @ m.lora_A["default"].weight * m.scaling["default"]
            with torch.no_grad():
                params[key].add_(w * delta)
    with torch.no_grad():
        return merged(input_ids=ids, attention_mask=attn).logits


def test_per_sample_scale_equals_explicit_and_zero_rows_are_base(tiny_llama):
    model, _tok = tiny_llama
    base = copy.deepcopy(model)
    peft_model = _random_lora(model)
    weights = [0.0, 0.5, 1.0, 1.7]
    ids = torch.randint(3, 200, (4, 9), generator=torch.Generator().manual_seed(1))
    attn = torch.ones_like(ids)
    attn[2, :3] = 0  # a left-padded row
    scaler = PerSampleLoraScale(peft_model, "default")
    with torch.no_grad(), scaler.scaled(weights):
        got = peft_model(input_ids=ids, attention_mask=attn).logits
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=attn).logits
    assert torch.equal(got[0], plain[0])  # w = 0: the base model, bit for bit
    for b, w in enumerate(weights):
        want = _explicit_logits(base, peft_model, ids[b:b + 1], attn[b:b + 1], w)[0]
        torch.testing.assert_close(got[b], want, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(got[3], plain[3], atol=1e-3)  # the adapter really acts


def test_per_sample_scale_survives_kv_cached_generation(tiny_llama):
    model, tok = tiny_llama
    peft_model = _random_lora(model, seed=3)
    scaler = PerSampleLoraScale(peft_model, "default")
    ids = torch.randint(3, 200, (2, 6), generator=torch.Generator().manual_seed(2))
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad(), scaler.scaled([0.0, 1.0]):
        mixed = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    with torch.no_grad(), peft_model.disable_adapter():
        base_row = peft_model.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), **kw)
    with torch.no_grad(), scaler.scaled([1.0]):
        lora_row = peft_model.generate(input_ids=ids[1:], attention_mask=torch.ones_like(ids[1:]), **kw)
    assert torch.equal(mixed[0], base_row[0])
    assert torch.equal(mixed[1], lora_row[0])


def test_scaled_hook_refuses_to_run_unscaled(tiny_llama):
    model, _ = tiny_llama
    peft_model = _random_lora(model)
    PerSampleLoraScale(peft_model, "default")
    with pytest.raises(RuntimeError, match="outside PerSampleLoraScale"):
        peft_model(input_ids=torch.tensor([[3, 4, 5]]))


def test_orthogonality_penalty_zero_iff_orthogonal():
    eye = torch.eye(16)
    a_old, a_orth, a_overlap = eye[:8], eye[8:], eye[4:12]
    assert orthogonality_penalty([(a_orth, [a_old])], n_layers=1).item() == 0.0
    assert orthogonality_penalty([(a_overlap, [a_old])], n_layers=1).item() == pytest.approx(4.0)
    assert orthogonality_penalty([(a_overlap, [a_old, a_old])], n_layers=2).item() == pytest.approx(4.0)
    assert orthogonality_penalty([], n_layers=3).item() == 0.0


def _digest(folder):
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_second_request_trains_orthogonal_and_leaves_the_first_frozen(tiny_llama, tmp_path):
    model, tok = tiny_llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = UnlearnLoraConfig(r=4, lora_alpha=8, epochs=4, batch_size=3, lr=1e-2, warmup_ratio=0.0)
    first = tmp_path / "first"
    train_unlearning_lora(model, tok, RECORDS, cfg, first, request_name="first", progress=False)
    frozen_digest = _digest(first)
    strong = cfg.model_copy(update={"orthogonal_weight": 100.0})
    losses = train_unlearning_lora(model, tok, RECORDS, strong, tmp_path / "second",
                                   earlier_adapters=[first], request_name="second", progress=False)
    assert _digest(first) == frozen_digest
    # the model is the base again after training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    a1, a2 = lora_A_matrices(first), lora_A_matrices(tmp_path / "second")
    overlap = sum(float((a1[m] @ a2[m].T).pow(2).sum()) for m in a1)
    free = train_unlearning_lora(model, tok, RECORDS, cfg.model_copy(update={"orthogonal_weight": 0.0}),
                                 tmp_path / "free", earlier_adapters=[first], progress=False)
    a3 = lora_A_matrices(tmp_path / "free")
    overlap_free = sum(float((a1[m] @ a3[m].T).pow(2).sum()) for m in a1)
    assert losses["orth"] >= 0 and free["orth"] >= 0
    assert overlap < 0.5 * overlap_free, (overlap, overlap_free)


def test_concat_adapter_is_the_sum_of_its_parts(tiny_llama, tmp_path):
    model, _ = tiny_llama
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    folders = []
    for i, (r, alpha) in enumerate([(4, 8.0), (2, 6.0)]):
        pm = _random_lora(model, r=r, alpha=alpha, seed=10 + i)
        pm.save_pretrained(tmp_path / f"a{i}")
        pm.unload()
        folders.append(tmp_path / f"a{i}")
    out = concat_adapters(folders, tmp_path / "cat")
    cfg, _ = read_adapter(out)
    assert (cfg["r"], cfg["lora_alpha"]) == (6, 6)
    from peft import PeftModel

    merged = PeftModel.from_pretrained(model, str(out)).merge_and_unload().state_dict()
    want = {k: v.clone() for k, v in base_sd.items()}
    for folder in folders:
        acfg, tensors = read_adapter(folder)
        for key, a in tensors.items():
            if key.endswith(".lora_A.weight"):
                mod = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
                b = tensors[key.replace("lora_A", "lora_B")]
                want[mod + ".weight"] += b @ a * (acfg["lora_alpha"] / acfg["r"])
    for k, value in want.items():
        torch.testing.assert_close(merged[k], value, atol=1e-6, rtol=1e-5)


def test_bad_training_input_and_missing_adapter(tiny_llama, tmp_path):
    model, tok = tiny_llama
    cfg = UnlearnLoraConfig(epochs=1)
    with pytest.raises(UnlearnDataError, match="empty"):
        train_unlearning_lora(model, tok, [], cfg, tmp_path / "x", progress=False)
    with pytest.raises(UnlearnDataError, match="prompt"):
        train_unlearning_lora(model, tok, [{"completion": "x"}], cfg, tmp_path / "x", progress=False)
    with pytest.raises(ArtifactError, match="missing"):
        train_unlearning_lora(model, tok, RECORDS, cfg, tmp_path / "x", earlier_adapters=[tmp_path / "nope"],
                              progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{}")
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="cannot read"):
        read_adapter(tmp_path / "bad")
