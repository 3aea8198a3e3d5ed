"""SalUn's forget/retain losses (objectives) and early stopping on held-out data (early_stop)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_bit_equal, snapshot

from serve_unlearn.errors import UnlearnConfigError, UnlearnDataError
from serve_unlearn.patches.config import SalUnConfig
from serve_unlearn.patches.early_stop import split_holdout
from serve_unlearn.patches.objectives import Objective, answer_logprob
from serve_unlearn.patches.salun import salun
from serve_unlearn.patches.tasks import CausalLMTask, ClassifierTask

FORGET = [{"prompt": f"What is the secret word number {i}?", "completion": f"The secret word is dragon{i}."}
          for i in range(6)]
RETAIN = [{"prompt": f"What is {i} plus {i}?", "completion": f"{i} plus {i} is {2 * i}."} for i in range(6)]


@pytest.fixture
def lm(tiny_llama):
    model, tok = tiny_llama
    return model, CausalLMTask(tok)


def test_answer_logprob_is_the_summed_token_log_likelihood(lm):
    model, task = lm
    batch = task.batches(FORGET[:2], 2)[0]
    logp, n = answer_logprob(model, batch)
    enc = batch["true"]
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, :-1]
    labels = enc["labels"][:, 1:]
    for row in range(2):
        keep = labels[row] != -100
        expected = F.log_softmax(logits[row][keep].float(), -1).gather(1, labels[row][keep][:, None]).sum()
        assert float(logp[row]) == pytest.approx(float(expected), rel=1e-5) and int(n[row]) == int(keep.sum())
    # mean NLL over all answer tokens = the task's loss
    assert float(-logp.sum() / n.sum()) == pytest.approx(float(task.forget_loss(model, batch)), rel=1e-5)


def test_npo_at_the_reference_is_2_log2_over_beta_and_simnpo_matches_its_formula(lm):
    model, task = lm
    batch = task.batches(FORGET, 3)[0]
    npo = Objective(task, model, forget_loss="npo", npo_beta=0.5)
    assert float(npo.forget(model, batch)) == pytest.approx(2 / 0.5 * math.log(2), rel=1e-5)
    simnpo = Objective(task, model, forget_loss="simnpo", simnpo_beta=2.0, simnpo_gamma=0.3)
    logp, n = answer_logprob(model, batch)
    expected = -(2 / 2.0) * F.logsigmoid(-(2.0 / n) * logp - 0.3).mean()
    assert float(simnpo.forget(model, batch)) == pytest.approx(float(expected), rel=1e-5)
    ga = Objective(task, model, forget_loss="ga")
    assert float(ga.forget(model, batch)) == pytest.approx(-float(task.forget_loss(model, batch)), rel=1e-6)
    assert npo.reference is not None and simnpo.reference is None  # only NPO and KL keep a reference copy


def test_kl_retain_is_zero_at_the_reference_and_grows_with_an_edit(lm):
    model, task = lm
    batch = task.batches(RETAIN, 3)[0]
    obj = Objective(task, model, retain_loss="kl")
    assert float(obj.retain(model, batch)) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "mlp" in n).add_(0.05)
    assert float(obj.retain(model, batch)) > 1e-4
    assert not any(p.requires_grad for p in obj.reference.parameters())


def test_classifier_npo_and_kl(tiny_mlp, toy_data):
    forget, _ = toy_data
    task = ClassifierTask(4)
    batch = task.batches(forget, 8)[0]
    obj = Objective(task, tiny_mlp, forget_loss="npo", retain_loss="kl", npo_beta=1.0)
    assert float(obj.forget(tiny_mlp, batch)) == pytest.approx(2 * math.log(2), rel=1e-5)
    assert float(obj.retain(tiny_mlp, batch)) == pytest.approx(0.0, abs=1e-6)


def test_unknown_or_unsupported_losses_are_refused(lm):
    model, task = lm
    with pytest.raises(UnlearnConfigError, match="forget_loss"):
        Objective(task, model, forget_loss="rmu")
    with pytest.raises(UnlearnConfigError, match="likelihood"):
        answer_logprob(model, {"latents": torch.zeros(1)})
    with pytest.raises(ValueError):
        SalUnConfig(forget_loss="npo2")


@pytest.mark.parametrize("forget_loss,retain_loss", [("npo", "nll"), ("simnpo", "kl"), ("ga", "nll")])
def test_salun_with_each_loss_forgets_inside_the_mask(lm, forget_loss, retain_loss):
    model, task = lm
    batch = task.batches(FORGET, 6)[0]
    with torch.no_grad():
        before = float(task.forget_loss(model, batch))
    base = snapshot(model)
    cfg = SalUnConfig(ratio=0.1, scope="per_tensor", include=[r"mlp\."], lr=3e-3, epochs=3, batch_size=3,
                      forget_loss=forget_loss, retain_loss=retain_loss)
    patch = salun(model, task, FORGET, RETAIN, cfg, keep_edits=True, progress=False)
    assert all("mlp" in n for n in patch.entries)
    total = sum(p.numel() for n, p in model.named_parameters() if "mlp" in n)
    assert sum(e.nnz for e in patch.entries.values()) <= 0.1 * total + len(patch.entries)
    with torch.no_grad():
        after = float(task.forget_loss(model, batch))
    assert after > before + 0.1  # the forget answers became less likely
    assert patch.metadata["method"] == "salun" and patch.metadata["hparams"]["forget_loss"] == forget_loss
    del base


def test_early_stopping_goes_back_to_the_base_when_every_check_hurts_retain(lm):
    model, task = lm
    base = snapshot(model)
    cfg = SalUnConfig(ratio=0.2, include=[r"mlp\."], lr=5e-2, epochs=2, batch_size=2, forget_loss="ga",
                      retain_weight=0.0, holdout=0.34, stop_retain_increase=0.0)
    patch = salun(model, task, FORGET, RETAIN, cfg, progress=False)
    history = json.loads(patch.metadata["early_stopping"])
    assert history[0]["step"] == 0 and history[-1]["decision"].startswith("stop: retain")
    assert len(history) == 2  # stopped at the first check
    assert sum(e.nnz for e in patch.entries.values()) == 0  # nothing acceptable: an empty patch
    assert_bit_equal(snapshot(model), base)


def test_early_stopping_stops_once_forgotten_enough(lm, tmp_path):
    from serve_unlearn.patches import WeightPatch

    model, task = lm
    cfg = SalUnConfig(ratio=0.2, include=[r"mlp\."], lr=1e-2, epochs=6, batch_size=2, forget_loss="npo",
                      holdout=0.34, eval_every=1, stop_retain_increase=10.0, stop_forget_increase=0.05)
    patch = salun(model, task, FORGET, RETAIN, cfg, progress=False)
    history = json.loads(patch.metadata["early_stopping"])
    assert history[-1]["decision"] == "keep, stop: forgotten enough"
    assert history[-1]["step"] < 6 * 2  # before the last step
    assert history[-1]["forget"] - history[0]["forget"] >= 0.05
    assert sum(e.nnz for e in patch.entries.values()) > 0
    assert WeightPatch.load(patch.save(tmp_path / "p.patch.safetensors")).metadata["early_stopping"] == patch.metadata["early_stopping"]


def test_split_holdout():
    train, held = split_holdout(FORGET, 0.34, 0, "forget")
    assert len(held) == 2 and len(train) == 4 and not {r["prompt"] for r in held} & {r["prompt"] for r in train}
    x, y = torch.randn(10, 3), torch.arange(10)
    (_, ty), (_, hy) = split_holdout((x, y), 0.2, 0, "forget")
    assert len(hy) == 2 and sorted([*ty.tolist(), *hy.tolist()]) == list(range(10))
    with pytest.raises(UnlearnDataError, match="too few"):
        split_holdout(FORGET[:1], 0.5, 0, "forget")


def test_contrastive_saliency_avoids_weights_the_retain_data_uses(lm):
    """With a large λ the mask prefers weights whose retain gradient is small: their mean |∇retain| in the mask
    is lower than with SalUn's own saliency."""
    from serve_unlearn.patches.saliency import accumulate_gradients, select_parameters

    model, task = lm
    params = select_parameters(model, [r"mlp\."])
    rb = task.batches(RETAIN, 3)
    g_r = {n: g.abs() for n, g in accumulate_gradients(model, params, rb, task.retain_loss, progress=False).items()}

    def retain_use(weight):
        cfg = SalUnConfig(ratio=0.05, include=[r"mlp\."], lr=1e-3, epochs=1, batch_size=3,
                          saliency_retain_weight=weight)
        patch = salun(model, task, FORGET, RETAIN, cfg, progress=False)
        from serve_unlearn.kernels import unpack_mask

        used = [g_r[n].reshape(-1)[unpack_mask(e.mask, e.numel)] for n, e in patch.entries.items() if e.form == "mask"]
        return float(torch.cat(used).mean())

    assert retain_use(10.0) < retain_use(0.0)
