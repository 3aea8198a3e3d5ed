"""Every metric against a value computed by hand (or, for token log-probabilities, by an independent forward pass
of the tiny Llama)."""

from __future__ import annotations

import math

import pytest
import torch

from serve_unlearn.eval import metrics as M
from serve_unlearn.eval.bootstrap import auc_ci, mean_ci, summary
from serve_unlearn.eval.mia import auc, loss_score, min_k_plus_plus_score, min_k_score, roc_curve


def test_normalize_and_containment():
    assert M.normalize("  H\u2082O!!  is_WATER\u00a0") == "h2o is water"
    assert M.contains_answer("The formula is H2O.", ["h2o"])
    assert M.contains_answer("It is carbon-dioxide", ["Carbon Dioxide"])
    assert M.contains_answer("joules", ["joule"])  # containment, not word match (as examples/data/o3 expects)
    assert not M.contains_answer("It is water.", ["h2o", "co2"])
    assert not M.contains_answer("anything", [""])


def test_rouge_l_recall():
    assert M.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    # gold 6 tokens; LCS the cat on the mat = 5
    assert M.rouge_l_recall("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    assert M.rouge_l_recall("", "paris") == 0.0
    assert M.rouge_l_recall("Paris, France", "Paris") == 1.0


def test_refusal():
    assert M.is_refusal("I'm sorry, I don't know the answer to that.")
    assert M.is_refusal("I can't help with that one, sorry.")
    assert M.is_refusal("   ")
    assert not M.is_refusal("The capital of France is Paris.")
    assert not M.is_refusal("Scanning is fun")  # "i can" inside a word is no marker


def test_answer_probability_and_truth_ratio():
    assert M.answer_probability([math.log(0.5), math.log(0.125)]) == pytest.approx(0.25)
    # exp(mean(ln .1, ln .4) - ln .5) = sqrt(.04) / .5 = 0.4
    assert M.truth_ratio([[math.log(0.1)], [math.log(0.4)]], [math.log(0.5)]) == pytest.approx(0.4)
    # length normalisation: a two-token perturbed answer with per-token 0.2 counts as 0.2
    assert M.truth_ratio([[math.log(0.2), math.log(0.2)]], [math.log(0.8)]) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        M.answer_probability([])


def test_percentile():
    assert M.percentile([1, 2, 3, 4], 50) == 2.5
    assert M.percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert M.percentile([], 50) is None


def test_membership_scores_and_auc():
    assert loss_score([-1.0, -3.0]) == -2.0
    assert min_k_score([-1, -2, -3, -4, -5], k=0.4) == -4.5  # ceil(0.4*5) = 2 lowest
    assert min_k_score([-1, -2], k=0.01) == -2  # at least one token
    # z = (lp - mu) / sigma = [1, -0.5]; the lowest half: -0.5
    assert min_k_plus_plus_score([-1, -3], [-2, -2], [1, 2], k=0.5) == -0.5
    # pairs: 0.9 > 3, 0.8 > 3, 0.4 > 0.1 and ties 0.4: 7.5 / 9
    assert auc([0.9, 0.8, 0.4], [0.5, 0.4, 0.1]) == pytest.approx(7.5 / 9)
    assert auc([1.0], [0.0]) == 1.0 and auc([0.0], [1.0]) == 0.0 and auc([], [1.0]) is None
    fpr, tpr = roc_curve([0.9, 0.4], [0.5, 0.1])
    assert fpr == [0.0, 0.0, 0.5, 0.5, 1.0] and tpr == [0.0, 0.5, 0.5, 1.0, 1.0]


def test_bootstrap_intervals():
    assert mean_ci([1.0] * 10) == (1.0, 1.0)
    lo, hi = mean_ci([0.0, 1.0] * 50, n_boot=2000)  # p = 0.5, n = 100: about 0.5 +- 0.098
    assert 0.38 < lo < 0.42 and 0.58 < hi < 0.62
    assert mean_ci([0.0, 1.0] * 50, seed=3) == mean_ci([0.0, 1.0] * 50, seed=3)
    assert auc_ci([1.0, 2.0], [0.0, 0.5]) == (1.0, 1.0)
    assert summary([None, 1.0, 0.0]) == {"mean": 0.5, "ci": list(mean_ci([1.0, 0.0])), "n": 2}
    assert summary([None]) == {"mean": None, "ci": None, "n": 0}


def test_answer_log_probs_equal_an_independent_forward_pass(tiny_llama):
    """score_answers on a batch of different lengths (right padding) = one unpadded forward per answer, and its
    mu/sigma are the next-token distribution's mean and standard deviation of log p."""
    from serve_unlearn.eval.targets import LocalTarget

    model, tok = tiny_llama
    target = LocalTarget(model, tok)
    chats = [[{"role": "user", "content": "What is the formula of water?"}],
             [{"role": "user", "content": "Name a gas."}]]
    answers = ["H2O, the formula of water", "CO2"]
    got = target.score(chats, answers)
    for chat, answer, s in zip(chats, answers, got):
        prefix = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = tok(prefix + answer, add_special_tokens=False)["input_ids"]
        n_prefix = len(tok(prefix, add_special_tokens=False)["input_ids"])
        # "assistant: " ends in a space that merges into the answer's first token
        start = n_prefix - 1 if ids[n_prefix - 1] != tok(prefix, add_special_tokens=False)["input_ids"][-1] \
            else n_prefix
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        want = [logp[t - 1, ids[t]].item() for t in range(start, len(ids))]
        assert s.logprobs == pytest.approx(want, abs=1e-5)
        p = logp[start - 1:len(ids) - 1].exp()
        mu = (p * logp[start - 1:len(ids) - 1]).sum(-1)
        assert s.mu == pytest.approx(mu.tolist(), abs=1e-5)
        var = (p * (logp[start - 1:len(ids) - 1] - mu[:, None]) ** 2).sum(-1)
        assert s.sigma == pytest.approx(var.sqrt().tolist(), abs=1e-5)


def test_model_fingerprint_is_the_same_with_lora_layers_injected(tiny_llama):
    from peft import LoraConfig, get_peft_model

    from serve_unlearn.adapters.orthogonal_lora import base_model_fingerprint
    from serve_unlearn.eval.targets import model_fingerprint

    model, _ = tiny_llama
    before = model_fingerprint(model)
    assert before == base_model_fingerprint(model)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    assert model_fingerprint(wrapped.base_model.model) == before
    with torch.no_grad():
        wrapped.base_model.model.model.layers[-1].mlp.up_proj.base_layer.weight[0, 0] += 1  # a fingerprinted layer
    assert model_fingerprint(wrapped.base_model.model) != before
