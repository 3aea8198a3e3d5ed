"""The harness on a fixed fake target (every answer, weight and log-probability chosen here), its numbers
checked against hand-computed values; the reports written from them; the baselines on the tiny Llama."""

from __future__ import annotations

import json
import math

import pytest

from serve_unlearn.eval.data import eval_set_from_records
from serve_unlearn.eval.harness import EvalConfig, evaluate
from serve_unlearn.eval.report import load_report, merge_reports, write_report
from serve_unlearn.eval.targets import AnswerScores, Generation

FORGET = [{"question": "q1", "answer": "h2o", "completion": "water is h2o", "paraphrased_question": "q1 reworded"},
          {"question": "q2", "answer": "co2"},
          {"question": "q3", "answer": "nacl", "completion": "nacl is salt"}]
RETAIN = [{"question": "r1", "answer": "paris", "paraphrased_answer": "paris city", "perturbed_answer": ["lyon"]},
          {"question": "r2", "answer": "4"}]
HOLDOUT = [{"question": "h1", "answer": "x"}, {"question": "h2", "answer": "y"}]
REPLIES = {"q1": ("It is H2O.", 0.9), "q2": ("I'm sorry, I don't know the answer to that.", 0.8),
           "q3": ("salt", 0.4), "q1 reworded": ("H2O", 0.9), "r1": ("Paris", 0.5), "r2": ("4", 0.1),
           "h1": ("no", 0.2), "h2": ("no", 0.3)}
LOGPROBS = {("q1", "water is h2o"): [-1.0, -1.0], ("q2", "co2"): [-0.5], ("q3", "nacl is salt"): [-2.0, -4.0],
            ("r1", "paris"): [-0.1], ("r2", "4"): [-0.2], ("h1", "x"): [-3.0], ("h2", "y"): [-1.5],
            ("r1", "paris city"): [-1.0], ("r1", "lyon"): [-2.0]}


class FixedTarget:
    name = "fixed"

    def generate(self, chats, max_new_tokens):
        out = []
        for chat in chats:
            q = chat[-1]["content"]
            text, weight = REPLIES[q]
            out.append(Generation(text, 2, 1.0 if q == "q3" else 0.1, weight))
        return out

    def score(self, chats, answers):
        return [AnswerScores(LOGPROBS[(c[-1]["content"], a)]) for c, a in zip(chats, answers)]

    def describe(self):
        return {"kind": "fixed"}

    def close(self):
        pass


def _sets():
    return {"forget": eval_set_from_records("forget", FORGET), "retain": eval_set_from_records("retain", RETAIN),
            "holdout": eval_set_from_records("holdout", HOLDOUT)}


@pytest.fixture(scope="module")
def result():
    return evaluate(FixedTarget(), _sets(), EvalConfig(n_boot=200))


def test_generation_metrics_match_hand_counts(result):
    f, r = result["sets"]["forget"], result["sets"]["retain"]
    assert f["accuracy"]["mean"] == pytest.approx(1 / 3) and r["accuracy"]["mean"] == 1.0
    assert f["refusal_rate"]["mean"] == pytest.approx(1 / 3)
    # ROUGE-L recall: "water is h2o" vs "it is h2o" 2/3, "co2" vs a refusal 0, "nacl is salt" vs "salt" 1/3
    assert f["rouge_l_recall"]["mean"] == pytest.approx((2 / 3 + 0 + 1 / 3) / 3)
    assert f["paraphrase_accuracy"]["mean"] == 1.0 and f["paraphrase_accuracy"]["n"] == 1
    lo, hi = f["accuracy"]["ci"]
    assert 0 <= lo <= 1 / 3 <= hi <= 1
    assert [row["correct"] for row in f["items"]] == [True, False, False]


def test_probability_metrics_match_hand_values(result):
    f, r = result["sets"]["forget"], result["sets"]["retain"]
    assert f["answer_probability"]["mean"] == pytest.approx((math.exp(-1) + math.exp(-0.5) + math.exp(-3)) / 3)
    # truth ratio of r1: exp(-2 - (-1)) = e^-1; truth score 1 - e^-1
    assert r["truth_ratio"]["mean"] == pytest.approx(math.exp(-1))
    assert r["truth_ratio"]["truth_score"] == pytest.approx(1 - math.exp(-1))
    assert f["truth_ratio"] is None


def test_cross_set_metrics_match_hand_values(result):
    # loss scores forget -1, -0.5, -3 vs holdout -3, -1.5: 4.5 of 6 pairs
    assert result["mia"]["loss"]["auc"] == pytest.approx(0.75)
    assert result["mia"]["min_k_plus_plus"] is None  # the fake target gives no mu/sigma
    # gate weights forget .9 .8 .4 vs retain .5 .1: 5 of 6 pairs
    assert result["gate"]["auroc_forget_vs_retain"]["auc"] == pytest.approx(5 / 6)
    assert result["gate"]["weights"]["forget"] == [0.9, 0.8, 0.4]
    lat = result["latency"]
    assert lat["generations"] == 8 and lat["generated_tokens"] == 16
    assert lat["p50_s"] == pytest.approx(0.1) and lat["p99_s"] == pytest.approx(0.1 + 0.93 * 0.9)


def test_reports_are_written_and_merge(result, tmp_path):
    second = json.loads(json.dumps(result))
    second["target"] = "fixed-2"
    paths = write_report(tmp_path / "a", [result])
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") == 3 and "http://" not in html and "https://" not in html
    md = paths["md"].read_text()
    assert "| fixed | forget | 3 | 33.3% [" in md and "0.750 [" in md
    assert load_report(tmp_path / "a")["targets"][0]["sets"]["retain"]["accuracy"]["mean"] == 1.0
    write_report(tmp_path / "b", [second])
    merged = merge_reports([tmp_path / "a", tmp_path / "b" / "report.json"])
    assert [t["target"] for t in merged] == ["fixed", "fixed-2"]
    with pytest.raises(Exception, match="share a name"):
        write_report(tmp_path / "c", [result, result])


def test_baselines_on_the_tiny_llama(tiny_llama):
    """The embedding filter refuses forget-like prompts without calling the model and passes the rest through
    unchanged; the guardrail's system prompt reaches the model (its answers and log-probabilities change)."""
    from serve_unlearn.eval.baselines import EmbeddingFilterTarget, GuardrailTarget
    from serve_unlearn.eval.targets import LocalTarget

    model, tok = tiny_llama
    plain = LocalTarget(model, tok, "plain")
    chem = ["What is the chemical formula of water?", "What is the chemical formula of carbon dioxide?",
            "What is the chemical symbol for gold?", "What is the chemical formula of table salt?"]
    filt = EmbeddingFilterTarget(plain, chem, quantile=0.05)
    chats = [[{"role": "user", "content": q}] for q in ("What is the chemical formula of methane?",
                                                        "Write a haiku about autumn leaves.")]
    gens = filt.generate(chats, 6)
    assert gens[0].weight > filt.threshold > gens[1].weight
    assert gens[0].tokens == 0 and gens[0].text == filt.refusal
    assert gens[1].text == plain.generate(chats[1:], 6)[0].text
    guard = GuardrailTarget(plain, topic="chemistry")
    s_plain = plain.score(chats, ["CH4", "Leaves fall"])
    s_guard = guard.score(chats, ["CH4", "Leaves fall"])
    assert s_plain[0].logprobs != s_guard[0].logprobs
    assert filt.score(chats, ["CH4", "Leaves fall"])[0].logprobs == s_plain[0].logprobs


def test_embedding_filter_threshold_is_the_leave_one_out_quantile():
    """Fixed embeddings: forget prompts a, b, c with nearest other cosines .8, .8, 0; the 5% quantile of
    [0, .8, .8] (linear interpolation) is 0.08."""
    import numpy as np

    from serve_unlearn.eval.baselines import EmbeddingFilterTarget

    vectors = {"a": [1, 0, 0], "b": [0.8, 0.6, 0], "c": [0, 0, 1], "near b": [0.6, 0.8, 0], "away": [0, -1, 0]}
    filt = EmbeddingFilterTarget(FixedTarget(), ["a", "b", "c"], quantile=0.05,
                                 embedder=lambda texts: np.array([vectors[t] for t in texts], dtype=float))
    assert filt.threshold == pytest.approx(0.08)
    chats = [[{"role": "user", "content": t}] for t in ("near b", "away")]
    assert filt.similarity(chats).tolist() == pytest.approx([0.96, 0.0])
    assert EmbeddingFilterTarget(FixedTarget(), ["a", "b", "c"], quantile=0.5,
                                 embedder=filt.embed).threshold == pytest.approx(0.8)
