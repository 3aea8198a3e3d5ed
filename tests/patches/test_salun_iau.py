"""SalUn and IAU: hard masks, thresholds, step rules, losses per model kind, and bad input."""

import pytest
import torch
from helpers import assert_bit_equal, bits, snapshot

from serve_unlearn.errors import UnlearnConfigError, UnlearnDataError
from serve_unlearn.patches import apply_patch
from serve_unlearn.patches.config import IAUConfig, SalUnConfig
from serve_unlearn.patches.iau import gradient_restriction_loss, iau
from serve_unlearn.patches.saliency import saliency_masks
from serve_unlearn.patches.salun import salun, train_masked
from serve_unlearn.patches.tasks import CausalLMTask, ClassifierTask, DiffusionTask


@pytest.mark.parametrize("optimizer,momentum", [("adam", 0.0), ("sgd", 0.9)])
def test_hard_mask_nothing_outside_moves(tiny_mlp, toy_data, optimizer, momentum):
    """Bit-equality outside the mask: no weight decay, momentum or Adam state leaks."""
    forget, retain = toy_data
    task = ClassifierTask(4)
    params = dict(tiny_mlp.named_parameters())
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in params.items()}
    before = snapshot(tiny_mlp)
    batches = (task.batches(forget, 8), task.batches(retain, 8))
    train_masked(tiny_mlp, params, masks, task, lambda epoch: batches, lr=0.05, epochs=3, retain_weight=1.0,
                 optimizer=optimizer, momentum=momentum, progress=False)
    after = snapshot(tiny_mlp)
    moved = 0
    for n, m in masks.items():
        assert torch.equal(bits(after[n])[~m], bits(before[n])[~m]), n
        moved += int((bits(after[n])[m] != bits(before[n])[m]).sum())
    assert moved > 0


def _memorize(model, forget, retain, steps=300):
    x, y = torch.cat([forget[0], retain[0]]), torch.cat([forget[1], retain[1]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert (model(forget[0]).argmax(-1) == forget[1]).float().mean() > 0.9


def test_salun_patch_touches_only_mask_and_restores_model(tiny_mlp, toy_data):
    forget, retain = toy_data
    _memorize(tiny_mlp, forget, retain)
    base = snapshot(tiny_mlp)
    patch = salun(tiny_mlp, ClassifierTask(4), forget, retain,
                  SalUnConfig(ratio=0.2, lr=0.05, epochs=5, batch_size=8, optimizer="sgd"), progress=False)
    assert_bit_equal(snapshot(tiny_mlp), base)  # restored
    total = sum(v.numel() for v in base.values())
    assert sum(e.nnz for e in patch.entries.values()) <= 0.2 * total + 1
    assert patch.metadata["method"] == "salun" and "forget_digest" in patch.metadata
    x, y = forget
    acc_before = (tiny_mlp(x).argmax(-1) == y).float().mean()
    apply_patch(tiny_mlp, patch)
    assert (tiny_mlp(x).argmax(-1) == y).float().mean() < acc_before - 0.3  # the forget set is forgotten
    rx, ry = retain
    assert (tiny_mlp(rx).argmax(-1) == ry).float().mean() > 0.8  # the retain set is not


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_threshold_kthvalue_and_histogram_agree(scope):
    g = torch.Generator().manual_seed(0)
    sal = {"a": torch.rand(300, 200, generator=g), "b": torch.rand(1000, generator=g) * 3}
    k = saliency_masks(sal, 0.1, scope=scope, threshold="kthvalue")
    h = saliency_masks(sal, 0.1, scope=scope, threshold="histogram")
    total = sum(v.numel() for v in sal.values())
    nk, nh = sum(int(m.sum()) for m in k.values()), sum(int(m.sum()) for m in h.values())
    assert nk == pytest.approx(0.1 * total, abs=2)
    assert nh == pytest.approx(nk, rel=0.01)
    assert all(m.dtype == torch.bool for m in k.values())
    if scope == "global":  # the larger-scale tensor dominates a global ranking
        assert k["b"].float().mean() > k["a"].float().mean()
    else:
        assert float(k["a"].float().mean()) == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_bad_ratio(ratio, tiny_mlp, toy_data):
    with pytest.raises(UnlearnConfigError):
        saliency_masks({"a": torch.rand(10)}, ratio)
    with pytest.raises(UnlearnConfigError):
        SalUnConfig.validate_dict({"ratio": ratio})


def test_empty_forget_set_leaves_model_unchanged(tiny_mlp, toy_data):
    _, retain = toy_data
    before = snapshot(tiny_mlp)
    empty = (torch.zeros(0, 16), torch.zeros(0, dtype=torch.long))
    with pytest.raises(UnlearnDataError, match="empty"):
        salun(tiny_mlp, ClassifierTask(4), empty, retain, progress=False)
    with pytest.raises(UnlearnDataError, match="empty"):
        iau(tiny_mlp, ClassifierTask(4), empty, retain, progress=False)
    assert_bit_equal(snapshot(tiny_mlp), before)


def test_retain_groups_cover_the_retain_set_each_epoch():
    from serve_unlearn.patches.salun import retain_groups

    groups = retain_groups(3, list(range(10)))
    assert [b for g in groups for b in g] == list(range(10)) and all(groups)
    assert retain_groups(4, ["a", "b"]) == [["a"], ["b"], ["a"], ["b"]]
    assert retain_groups(2, []) == [[], []]


def test_salun_leaves_callers_random_state(tiny_mlp, toy_data):
    forget, retain = toy_data
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    salun(tiny_mlp, ClassifierTask(4), forget, retain, SalUnConfig(epochs=1), progress=False)
    iau(tiny_mlp, ClassifierTask(4), forget, retain, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_include_matching_nothing(tiny_mlp, toy_data):
    forget, retain = toy_data
    with pytest.raises(UnlearnConfigError, match="no parameter matches"):
        salun(tiny_mlp, ClassifierTask(4), forget, retain, SalUnConfig(include=["nope"]), progress=False)


def test_iau_adam1_is_one_fresh_adam_step(tiny_mlp, toy_data):
    """The reference: accumulate ∇mean_r − ∇mean_f, then a single step of a fresh Adam."""
    forget, retain = toy_data
    ref = snapshot(tiny_mlp)
    clone = type(tiny_mlp)(16, 32, 4)
    clone.load_state_dict(ref)
    opt = torch.optim.Adam(clone.parameters(), lr=1e-3)
    torch.nn.functional.cross_entropy(clone(retain[0]), retain[1]).backward()
    (-torch.nn.functional.cross_entropy(clone(forget[0]), forget[1])).backward()
    opt.step()
    patch = iau(tiny_mlp, ClassifierTask(4), forget, retain, IAUConfig(lr=1e-3, batch_size=7), progress=False)
    assert patch.metadata["method"] == "iau"
    assert_bit_equal(snapshot(tiny_mlp), ref)  # the model itself is untouched
    apply_patch(tiny_mlp, patch)
    for n, p in clone.state_dict().items():
        assert torch.allclose(tiny_mlp.state_dict()[n], p, atol=1e-6), n


def test_iau_sgd_and_masked(tiny_mlp, toy_data):
    forget, retain = toy_data
    dense = iau(tiny_mlp, ClassifierTask(4), forget, retain, IAUConfig(step="sgd", lr=0.1), progress=False)
    masked = iau(tiny_mlp, ClassifierTask(4), forget, retain, IAUConfig(mask_ratio=0.05), progress=False)
    assert masked.metadata["method"] == "iau-masked"
    total = sum(p.numel() for p in tiny_mlp.parameters())
    assert sum(e.nnz for e in masked.entries.values()) <= 0.05 * total + 1
    assert sum(e.nnz for e in dense.entries.values()) > 0.5 * total


def test_gradient_restriction_loss_matches_manual(tiny_mlp, toy_data):
    x, y = toy_data[1]
    params = list(tiny_mlp.parameters())
    loss = torch.nn.functional.cross_entropy(tiny_mlp(x), y)
    total = gradient_restriction_loss(loss, params, alpha=0.01)
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(tiny_mlp(x), y), params)
    assert float(total.detach()) == pytest.approx(float(loss.detach()) + 0.01 * sum(float(g.norm()) for g in grads), rel=1e-5)
    total.backward()  # differentiable (double backprop)
    assert all(p.grad is not None for p in params)


def test_causal_lm_salun_bf16_checkpoint(tiny_llama_bf16_dir):
    """Trained in float32 on a bf16 checkpoint; the bf16 patch touches only masked layer weights and reproduces
    the trained model on the checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_bf16_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_bf16_dir, dtype=torch.float32)
    forget = [{"prompt": "What is the secret password of the castle?", "completion": "It is blue dragon."}] * 4
    retain = [{"prompt": "When does water boil?", "completion": "At one hundred degrees."}] * 4
    task = CausalLMTask(tok)
    enc = task.batches(forget, 4)[0]
    cfg = SalUnConfig(ratio=0.05, scope="per_tensor", include=[r"mlp\.", r"self_attn\."], lr=1e-2, epochs=4,
                      batch_size=4)
    with torch.no_grad():
        refusal_before = float(task.unlearn_loss(model, enc))
    patch = salun(model, task, forget, retain, cfg, patch_dtype=torch.bfloat16, keep_edits=True, progress=False)
    assert all(e.dtype == torch.bfloat16 and "layers" in n for n, e in patch.entries.items())
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_llama_bf16_dir)
    assert bf16.dtype == torch.bfloat16
    apply_patch(bf16, patch)
    with torch.no_grad():
        trained, patched = float(task.unlearn_loss(model, enc)), float(task.unlearn_loss(bf16, enc))
    assert trained < refusal_before - 0.2  # training made the refusal more likely
    assert patched == pytest.approx(trained, abs=0.02)  # and the bf16 patch carries that to the checkpoint


def test_causal_lm_task_masks_prompt_tokens(tiny_llama):
    _, tok = tiny_llama
    task = CausalLMTask(tok, forget_target="random-answer")
    recs = [{"prompt": "q1", "completion": "alpha"}, {"prompt": "q2", "completion": "beta"}, {"text": "plain"}]
    b = task.batches(recs, 3)[0]
    labels = b["true"]["labels"][0]
    prompt_len = len(tok(tok.apply_chat_template([{"role": "user", "content": "q1"}], tokenize=False,
                                                 add_generation_prompt=True), add_special_tokens=False).input_ids)
    assert (labels[:prompt_len] == -100).all() and (labels[prompt_len:] != -100).any()
    swapped = tok.decode(b["swapped"]["input_ids"][0][b["swapped"]["labels"][0] != -100])
    assert "beta" in swapped  # another record's answer


def test_diffusion_salun_on_unet(tiny_unet):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    forget = {"latents": torch.randn(4, 4, 16, 16, generator=g), "cond": torch.randn(4, 7, 32, generator=g),
              "target_cond": torch.randn(4, 7, 32, generator=g)}
    retain = {"latents": torch.randn(4, 4, 16, 16, generator=g), "cond": torch.randn(4, 7, 32, generator=g)}
    task = DiffusionTask(sched, guidance=7.5, uncond=torch.zeros(1, 7, 32))
    base = snapshot(tiny_unet)
    patch = salun(tiny_unet, task, forget, retain,
                  SalUnConfig(ratio=0.1, lr=1e-3, epochs=2, batch_size=2, retain_weight=0.5), progress=False)
    assert_bit_equal(snapshot(tiny_unet), base)
    total = sum(v.numel() for k, v in base.items() if v.is_floating_point())
    assert 0 < sum(e.nnz for e in patch.entries.values()) <= 0.1 * total + 1
    apply_patch(tiny_unet, patch)  # diffusers key names round-trip
