"""Per-answer metrics: normalised containment, ROUGE-L recall, refusal, answer probability, truth ratio, latency.

Each function scores one item (or one set of timings); the harness averages them and bootstraps the intervals.
Formulas (also in the README):

- ``normalize(s)``: NFKC, lower case, every run of characters that are not letters or digits becomes one space.
- accuracy: ``1`` when ``normalize(a)`` is a substring of ``normalize(generated)`` for any accepted answer ``a``.
- ROUGE-L recall: ``LCS(gold, generated) / |gold|`` over the whitespace tokens of the normalised texts.
- refusal: the normalised reply contains one of :data:`REFUSAL_MARKERS` (or is empty).
- answer probability (length-normalised): ``exp(mean_t log p(a_t | q, a_<t))`` over the answer's tokens.
- truth ratio (TOFU): ``R = exp(mean_j lbar(perturbed_j) - lbar(paraphrased))``, ``lbar`` the mean token
  log-probability; ``truth score = max(0, 1 - R)`` (TOFU's "higher is better" form for retain sets).
- latency: the ``q``-th percentile by linear interpolation (numpy's default).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

from ..causal_lm import REFUSALS

__all__ = ["REFUSAL_MARKERS", "answer_probability", "contains_answer", "is_refusal", "lcs_length", "normalize",
           "percentile", "rouge_l_recall", "truth_ratio"]

_NON_WORD = re.compile(r"[^\w]+|_+")

# Phrases a reply that declines to answer contains, normalised; the O3 adapters' own refusals (causal_lm.REFUSALS)
# are added below so a refusal this project trains is always recognised.
_MARKERS = ("i don t know", "i do not know", "i m sorry", "i am sorry", "i cannot", "i can t", "i won t",
            "i am not able to", "i m not able to", "i m unable", "i am unable", "unable to answer",
            "i don t have that information", "i do not have that information", "cannot help with",
            "can t help with", "not able to answer", "i must decline", "i can not", "as an ai")


def normalize(text: str) -> str:
    """NFKC, lower case, each run of non-word characters (and underscores) one space, stripped."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_NON_WORD.sub(" ", text).split())


REFUSAL_MARKERS: tuple[str, ...] = tuple(dict.fromkeys([*_MARKERS, *(normalize(r) for r in REFUSALS)]))


def contains_answer(generated: str, answers: Iterable[str]) -> bool:
    """Normalised containment: any accepted answer, normalised, is a substring of the normalised reply."""
    text = normalize(generated)
    return any(a and a in text for a in (normalize(x) for x in answers))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(|a|·|b|) time, O(|b|) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l_recall(generated: str, gold: str) -> float:
    """ROUGE-L recall: LCS over the normalised whitespace tokens, divided by the gold answer's token count."""
    ref = normalize(gold).split()
    if not ref:
        return 0.0
    return lcs_length(ref, normalize(generated).split()) / len(ref)


def is_refusal(generated: str) -> bool:
    """The reply declines (contains a refusal marker) or says nothing."""
    text = normalize(generated)
    if not text:
        return True
    padded = f" {text} "
    return any(f" {m} " in padded for m in REFUSAL_MARKERS)


def mean_logprob(token_logprobs: Sequence[float]) -> float:
    if len(token_logprobs) == 0:
        raise ValueError("an answer with no tokens has no probability")
    return float(np.mean(np.asarray(token_logprobs, dtype=np.float64)))


def answer_probability(token_logprobs: Sequence[float]) -> float:
    """Length-normalised answer probability: the geometric mean of the answer tokens' probabilities."""
    return float(np.exp(mean_logprob(token_logprobs)))


def truth_ratio(perturbed: Sequence[Sequence[float]], paraphrased: Sequence[float]) -> float:
    """TOFU's truth ratio R: the geometric mean over perturbed (wrong) answers of their length-normalised
    probability, divided by the length-normalised probability of the paraphrased (true) answer."""
    if not perturbed:
        raise ValueError("the truth ratio needs at least one perturbed answer")
    wrong = float(np.mean([mean_logprob(p) for p in perturbed]))
    return float(np.exp(wrong - mean_logprob(paraphrased)))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100, linear interpolation); None for no values."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))
