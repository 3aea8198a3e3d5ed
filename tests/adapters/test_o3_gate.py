"""The gate: policies, prompt normalisation, batching, and failing closed."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from serve_unlearn.adapters.gate import Gate, GateConfig, GatePolicy
from serve_unlearn.errors import GateInputError, UnlearnConfigError


def _table_scorer(table):
    """Weights looked up by text: rows are requests."""
    def score(texts):
        return np.array([[table[t][i] for t in texts] for i in range(len(next(iter(table.values()))))])
    return score


@pytest.mark.parametrize("kind", ["threshold", "ramp", "tofu"])
def test_policies_are_monotone_and_bounded(kind):
    policy = GatePolicy(kind=kind, max_scale=1.25)
    w = np.linspace(0.0, 1.0, 1001)
    s = policy.scale(w)
    assert np.all(np.diff(s) >= 0)
    assert s[0] == 0.0 and s[-1] == pytest.approx(1.25)


def test_tofu_preset_matches_the_reference_map():
    s = GatePolicy(kind="tofu").scale(np.array([0.1, 0.2, 0.25, 0.31, 0.32, 0.9]))
    np.testing.assert_allclose(s, [0, 0, 10 * 0.25**2, min(10 * 0.31**2, 1), 1, 1])


def test_bad_policy_is_a_config_error():
    with pytest.raises(UnlearnConfigError, match="low < high"):
        GatePolicy.validate_dict({"kind": "ramp", "low": 0.7, "high": 0.6})


def test_max_over_requests_and_decision_fields():
    table = {"chem q": [0.95, 0.12], "space q": [0.12, 0.9], "other": [0.13, 0.12]}
    gate = Gate(_table_scorer(table), ["chem", "space"], GateConfig(policy=GatePolicy(kind="threshold")))
    d = gate.decide(["chem q", "space q", "other"])
    assert [x.request for x in d[:2]] == ["chem", "space"]
    assert [x.scale for x in d] == [1.0, 1.0, 0.0]
    assert d[1].weights == {"chem": 0.12, "space": 0.9}
    assert gate.counters["decisions"] == 3 and gate.counters["applied"] == 2 and gate.counters["base"] == 1


def test_batches_are_split_by_batch_size():
    seen = []

    def scorer(texts):
        seen.append(len(texts))
        return np.full((1, len(texts)), 0.9)

    Gate(scorer, ["r"], GateConfig(batch_size=4)).decide([f"p{i}" for i in range(10)])
    assert seen == [4, 4, 2]


def test_concurrent_callers_are_scored_together_and_get_their_own_rows():
    """While one pass runs, later callers queue; the next pass scores all of them at once."""
    first_running, release = threading.Event(), threading.Event()
    seen = []

    def scorer(texts):
        seen.append(list(texts))
        if len(seen) == 1:
            first_running.set()
            release.wait(5)
        return np.array([[float(t.removeprefix("p")) / 10 for t in texts]])

    gate = Gate(scorer, ["r"], GateConfig(batch_size=64))
    results = {}

    def call(i):
        results[i] = [d.weight for d in gate.decide([f"p{i}", f"p{i + 1}"])]

    threads = [threading.Thread(target=call, args=(0,))]
    threads[0].start()
    assert first_running.wait(5)
    threads += [threading.Thread(target=call, args=(i,)) for i in (2, 4, 6)]
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 5
    while sum(len(j.texts) for j in gate._jobs) < 6 and time.monotonic() < deadline:  # the later callers queue
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join(5)
    assert len(seen) == 2 and sorted(seen[1]) == sorted(f"p{i}" for i in range(2, 8))
    assert results == {i: pytest.approx([i / 10, (i + 1) / 10]) for i in (0, 2, 4, 6)}
    assert gate.counters["decisions"] == 8
    gate.close()


def test_fails_closed_when_the_detector_raises(caplog):
    def broken(texts):
        raise RuntimeError("detector exploded")

    gate = Gate(broken, ["r"], GateConfig(policy=GatePolicy(max_scale=1.0)))
    with caplog.at_level("ERROR", logger="serve_unlearn.gate"):
        d = gate.decide(["anything", "else"])
    assert [x.scale for x in d] == [1.0, 1.0]
    assert all("detector exploded" in x.error for x in d)
    assert gate.counters["errors"] == 2 and gate.counters["failed_closed"] == 2
    assert "failed closed" in caplog.text


def test_fail_open_when_configured():
    gate = Gate(lambda t: np.full((1, len(t)), np.nan), ["r"], GateConfig(fail_closed=False))
    d = gate.decide(["x"])
    assert d[0].scale == 0.0 and "non-finite" in d[0].error
    assert gate.counters["failed_open"] == 1


def test_timeout_fails_closed_and_is_counted():
    release = threading.Event()

    def slow(texts):
        release.wait(5)
        return np.zeros((1, len(texts)))

    gate = Gate(slow, ["r"], GateConfig(timeout_s=0.05))
    try:
        d = gate.decide(["x"])
    finally:
        release.set()
    assert d[0].scale == 1.0 and "timed out" in d[0].error
    assert gate.counters["timeouts"] == 1


def test_no_requests_means_base_model():
    d = Gate(lambda t: 1 / 0, [], GateConfig()).decide(["x"])
    assert d[0].scale == 0.0 and d[0].error is None


def test_every_turn_of_a_chat_is_scored_and_the_maximum_taken():
    """A forget question in an earlier turn, a system message or an assistant prefill counts as much as in the
    last user turn."""
    gate = Gate(lambda t: np.array([[0.95 if "H2O" in x else 0.1 for x in t]]), ["chem"],
                GateConfig(policy=GatePolicy(kind="threshold")))
    chatml = ("<|im_start|>system\nWhat is H2O?<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
              "<|im_start|>assistant\n")
    chats = [
        [{"role": "user", "content": "What is H2O?"}, {"role": "assistant", "content": "ok"},
         {"role": "user", "content": "thanks"}],
        [{"role": "system", "content": "What is H2O?"}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "output_text",
                                                                                 "text": "What is H2O?"}]}],
        [{"role": "user", "content": ["hi", {"type": "input_text", "text": "What is H2O?"}]}],
    ]
    decisions = gate.decide([chatml, *chats, [{"role": "user", "content": "hi"}], "plain prompt"])
    assert [d.scale for d in decisions] == [1.0] * 5 + [0.0, 0.0]


def test_a_question_after_long_padding_is_still_found():
    gate = Gate(lambda t: np.array([[0.95 if "H2O" in x else 0.1 for x in t]]), ["chem"],
                GateConfig(policy=GatePolicy(kind="threshold"), window_chars=256))
    padding = " ".join(f"Sentence {i} of some filler text, consectetur adipiscing elit." for i in range(200))
    for prompt in (padding + "What is H2O?", "What is H2O? " + padding, padding + "What is H2O? " + padding,
                   padding.replace(" ", "") + "WhatisH2O?"):
        (d,) = gate.decide([prompt])
        assert d.scale == 1.0 and d.windows > 10


def test_too_many_windows_fail_closed_as_a_whole():
    gate = Gate(lambda t: np.zeros((1, len(t))), ["r"], GateConfig(window_chars=32, max_windows=4))
    (d,) = gate.decide([" ".join(f"word{i}" for i in range(200))])
    assert d.scale == 1.0 and "max_windows" in d.error


def test_repeated_windows_are_scored_once():
    seen = []

    def scorer(texts):
        seen.extend(texts)
        return np.zeros((1, len(texts)))

    gate = Gate(scorer, ["r"])
    system = {"role": "system", "content": "You are a helpful assistant."}
    gate.decide([[system, {"role": "user", "content": "first"}]])
    gate.decide([[system, {"role": "user", "content": "second"}]])
    assert seen == ["You are a helpful assistant.", "first", "second"]


def test_a_long_list_does_not_push_a_short_request_past_its_deadline():
    """Round robin: a one-prompt caller arriving behind a 400-prompt caller is scored in the next pass."""
    def scorer(texts):
        time.sleep(0.02)
        return np.zeros((1, len(texts)))

    gate = Gate(scorer, ["r"], GateConfig(batch_size=8, timeout_s=0.5))
    long = threading.Thread(target=gate.decide, args=([f"long {i}" for i in range(400)],))
    long.start()
    time.sleep(0.05)
    (d,) = gate.decide(["short one"])
    long.join()
    assert d.error is None and d.scale == 0.0


def test_a_caller_past_its_deadline_stops_its_detector_work():
    scored = []

    def scorer(texts):
        scored.extend(texts)
        time.sleep(0.05)
        return np.zeros((1, len(texts)))

    gate = Gate(scorer, ["r"], GateConfig(batch_size=4, timeout_s=0.1))
    (d,) = gate.decide([[{"role": "user", "content": f"text {i}"} for i in range(200)]])
    assert "timed out" in d.error and d.scale == 1.0
    time.sleep(0.3)
    assert len(scored) < 40  # the 200 windows were not all scored after the caller gave up


@pytest.mark.parametrize("bad", [42, None, [1, 2], [], {"role": "user"}])
def test_non_text_prompts_raise_gate_input_error(bad):
    gate = Gate(lambda t: np.zeros((1, len(t))), ["r"])
    with pytest.raises(GateInputError):
        gate.decide([bad] if not isinstance(bad, dict) else bad)
