"""The harness: one target, named evaluation sets, every metric, one JSON-able result.

``evaluate(target, {"forget": ..., "retain": ..., "holdout": ...})`` asks every question (and its paraphrases)
greedily, scores the gold answers where the target gives log-probabilities, and returns per set: accuracy,
paraphrase accuracy, ROUGE-L recall and refusal rate (each with a bootstrap interval), answer probability and
truth ratio; across sets: membership-inference AUCs (forget = members vs holdout = non-members), gate AUROC
(forget vs retain, forget vs holdout) and weight lists when the target reports gate weights, latency p50/p99 and
tokens/s. Set names are free; ``forget``, ``retain`` and ``holdout`` are the ones the cross-set metrics use.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from ..config import StrictConfig
from . import metrics as M
from .bootstrap import auc_ci, mean_ci, summary
from .data import EvalSet
from .mia import auc, loss_score, min_k_plus_plus_score, min_k_score, roc_curve
from .targets import AnswerScores, Generation, Target

__all__ = ["EvalConfig", "evaluate"]

SCHEMA = "serve-unlearn/eval-result/1"


class EvalConfig(StrictConfig):
    """How the harness asks and scores (YAML keys of ``serve-unlearn eval --config``)."""

    max_new_tokens: int = Field(32, ge=1, description="greedy tokens per answer")
    batch_size: int = Field(16, ge=1, description="questions per generate/score call")
    probabilities: bool = Field(True, description="score gold answers (probability, truth ratio, MIA)")
    paraphrases: bool = Field(True, description="also ask each record's paraphrased questions")
    min_k: float = Field(0.2, gt=0, le=1, description="the k of Min-K% and Min-K%++ (a fraction of tokens)")
    n_boot: int = Field(1000, ge=10, description="bootstrap resamples per interval")
    alpha: float = Field(0.05, gt=0, lt=1, description="1 - confidence level of every interval")
    seed: int = 0


class _Progress:
    def __init__(self, enabled: bool, total: int, desc: str):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="q", leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


class _Run:
    def __init__(self, target: Target, config: EvalConfig, progress: bool):
        self.target, self.config, self.progress = target, config, progress
        self.gen_seconds = 0.0
        self.gen_tokens = 0
        self.latencies: list[float] = []

    def generate(self, questions: Sequence[str], desc: str) -> list[Generation]:
        bar = _Progress(self.progress, len(questions), desc)
        out: list[Generation] = []
        try:
            for i in range(0, len(questions), self.config.batch_size):
                batch = [_chat(q) for q in questions[i:i + self.config.batch_size]]
                t0 = time.perf_counter()
                gens = self.target.generate(batch, self.config.max_new_tokens)
                self.gen_seconds += time.perf_counter() - t0
                self.gen_tokens += sum(g.tokens for g in gens)
                self.latencies += [g.latency_s for g in gens]
                out += gens
                bar.update(len(batch))
        finally:
            bar.close()
        return out

    def score(self, questions: Sequence[str], answers: Sequence[str], desc: str) -> list[AnswerScores] | None:
        bar = _Progress(self.progress, len(questions), desc)
        out: list[AnswerScores] = []
        try:
            for i in range(0, len(questions), self.config.batch_size):
                got = self.target.score([_chat(q) for q in questions[i:i + self.config.batch_size]],
                                        answers[i:i + self.config.batch_size])
                if got is None:
                    return None
                out += got
                bar.update(len(got))
        finally:
            bar.close()
        return out

    def rate(self, values: Sequence[float | None]) -> dict:
        c = self.config
        return summary(values, mean_ci, n_boot=c.n_boot, alpha=c.alpha, seed=c.seed)

    def eval_set(self, es: EvalSet) -> tuple[dict, dict]:
        """(the set's summary with per-item rows, the raw scores the cross-set metrics need)."""
        items = es.items
        gens = self.generate([it.question for it in items], f"{self.target.name}: {es.name}")
        rows = [{"question": it.question, "generated": g.text, "correct": M.contains_answer(g.text, it.answers),
                 "rouge_l_recall": M.rouge_l_recall(g.text, it.reference), "refusal": M.is_refusal(g.text),
                 "weight": g.weight} for it, g in zip(items, gens)]
        result: dict[str, Any] = {
            "n": len(items), "digest": es.digest, "source": es.source,
            "accuracy": self.rate([float(r["correct"]) for r in rows]),
            "rouge_l_recall": self.rate([r["rouge_l_recall"] for r in rows]),
            "refusal_rate": self.rate([float(r["refusal"]) for r in rows]),
        }
        para = [(it, q) for it in items for q in it.paraphrased_questions] if self.config.paraphrases else []
        if para:
            pgens = self.generate([q for _, q in para], f"{self.target.name}: {es.name} paraphrases")
            result["paraphrase_accuracy"] = self.rate([float(M.contains_answer(g.text, it.answers))
                                                       for (it, _), g in zip(para, pgens)])
        raw: dict[str, Any] = {"weights": [g.weight for g in gens if g.weight is not None]}
        if self.config.probabilities:
            scores = self.score([it.question for it in items], [it.reference for it in items],
                                f"{self.target.name}: {es.name} answer log-probs")
            if scores is None:
                result["answer_probability"] = {"mean": None, "ci": None, "n": 0,
                                                "note": "the target gives no answer log-probabilities"}
            else:
                k = self.config.min_k
                for r, s in zip(rows, scores):
                    r["answer_probability"] = M.answer_probability(s.logprobs)
                result["answer_probability"] = self.rate([r["answer_probability"] for r in rows])
                raw["mia"] = {"loss": [loss_score(s.logprobs) for s in scores],
                              "min_k": [min_k_score(s.logprobs, k) for s in scores],
                              "min_k_plus_plus": [min_k_plus_plus_score(s.logprobs, s.mu, s.sigma, k)
                                                  if s.mu is not None else None for s in scores]}
                result["truth_ratio"] = self.truth_ratio(items, es.name)
        result["items"] = rows
        return result, raw

    def truth_ratio(self, items, set_name: str) -> dict | None:
        withp = [it for it in items if it.perturbed_answers]
        if not withp:
            return None
        questions, answers, owner = [], [], []
        for j, it in enumerate(withp):
            for a in (it.paraphrased_answer or it.reference, *it.perturbed_answers):
                questions.append(it.question)
                answers.append(a)
                owner.append(j)
        scores = self.score(questions, answers, f"{self.target.name}: {set_name} truth ratio")
        if scores is None:
            return None
        grouped: list[list[list[float]]] = [[] for _ in withp]
        for j, s in zip(owner, scores):
            grouped[j].append(s.logprobs)
        ratios = [M.truth_ratio(g[1:], g[0]) for g in grouped]
        out = self.rate(ratios)
        out["truth_score"] = self.rate([max(0.0, 1.0 - r) for r in ratios])["mean"]
        return out


def _auc_entry(pos: Sequence[float], neg: Sequence[float], config: EvalConfig) -> dict | None:
    if not pos or not neg:
        return None
    fpr, tpr = roc_curve(pos, neg)
    ci = auc_ci(pos, neg, n_boot=config.n_boot, alpha=config.alpha, seed=config.seed)
    return {"auc": auc(pos, neg), "ci": list(ci) if ci else None, "n_pos": len(pos), "n_neg": len(neg),
            "roc": {"fpr": fpr, "tpr": tpr}}


def evaluate(target: Target, sets: Mapping[str, EvalSet], config: EvalConfig | None = None, *,
             progress: bool = False) -> dict[str, Any]:
    """Every metric of ``target`` on ``sets`` (see the module docstring); JSON-able."""
    config = config or EvalConfig()
    run = _Run(target, config, progress)
    t0 = time.time()
    per_set, raw = {}, {}
    for name, es in sets.items():
        per_set[name], raw[name] = run.eval_set(es)
    result: dict[str, Any] = {"schema": SCHEMA, "target": target.name, "describe": target.describe(),
                              "config": config.model_dump(), "started_at": t0, "seconds": time.time() - t0,
                              "sets": per_set}
    mia = {}
    if "forget" in raw and "holdout" in raw and "mia" in raw["forget"] and "mia" in raw["holdout"]:
        for attack in ("loss", "min_k", "min_k_plus_plus"):
            pos = [v for v in raw["forget"]["mia"][attack] if v is not None]
            neg = [v for v in raw["holdout"]["mia"][attack] if v is not None]
            mia[attack] = _auc_entry(pos, neg, config)
    result["mia"] = mia
    weights = {name: r["weights"] for name, r in raw.items() if r["weights"]}
    gate: dict[str, Any] = {"weights": weights}
    for other in ("retain", "holdout"):
        if "forget" in weights and other in weights:
            gate[f"auroc_forget_vs_{other}"] = _auc_entry(weights["forget"], weights[other], config)
    result["gate"] = gate
    result["latency"] = {"p50_s": M.percentile(run.latencies, 50), "p99_s": M.percentile(run.latencies, 99),
                         "generations": len(run.latencies), "generated_tokens": run.gen_tokens,
                         "generate_seconds": run.gen_seconds,
                         "tokens_per_s": run.gen_tokens / run.gen_seconds if run.gen_seconds > 0 else None}
    return result
