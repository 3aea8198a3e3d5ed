"""Interim enforcement: which prompts a guard refuses (never one whose request the routing already serves), and
the refusal in each route's own response format."""

from __future__ import annotations

import json

import numpy as np

from serve_unlearn.adapters.gate import Gate, GateConfig
from serve_unlearn.adapters.gate_text import Segments
from serve_unlearn.serving.vllm.config import GuardConfig
from serve_unlearn.serving.vllm.guard import Guards, refusal

TOPICS = {"chemistry": "formula", "animals": "elephant"}


def _guards() -> Guards:
    """Guards over two filings, with a keyword scorer standing in for their detectors' calibrated weights."""
    def scorer(texts):
        return np.array([[0.9 if word in t else 0.05 for t in texts] for word in TOPICS.values()])

    guards = Guards(GuardConfig(), GateConfig(policy={"kind": "threshold", "threshold": 0.5}))
    guards.gate = Gate(scorer, list(TOPICS), guards.gate_config)
    return guards


def test_a_flagged_prompt_names_its_filing_and_others_pass():
    guards = _guards()
    try:
        assert guards.flagged(Segments(["What is the formula of salt?"])) == "chemistry"
        assert guards.flagged(Segments(["How heavy is an elephant?"])) == "animals"
        assert guards.flagged(Segments(["Write a haiku about autumn."])) is None
    finally:
        guards.gate.close()


def test_a_filing_the_routing_already_serves_is_left_to_the_routing():
    """Between a version switch and this middleware's next poll the guard is still loaded: it must not answer for
    a request that is in force (its adapter answers), only for the ones still pending."""
    guards = _guards()
    try:
        assert guards.flagged(Segments(["What is the formula of salt?"]), frozenset({"chemistry"})) is None
        assert guards.flagged(Segments(["How heavy is an elephant?"]), frozenset({"chemistry"})) == "animals"
        assert guards.flagged(Segments(["How heavy is an elephant?"]), frozenset(TOPICS)) is None
    finally:
        guards.gate.close()


def test_refusals_in_each_routes_format():
    text = GuardConfig().refusal
    status, kind, body = refusal("/v1/chat/completions", {"model": "m", "n": 2}, text)
    chat = json.loads(body)
    assert (status, kind) == (200, "application/json") and chat["object"] == "chat.completion"
    assert [c["message"]["content"] for c in chat["choices"]] == [text, text] and chat["model"] == "m"

    status, kind, body = refusal("/v1/chat/completions", {"model": "m", "stream": True}, text)
    events = [line[6:] for line in body.decode().split("\n\n") if line.startswith("data: ")]
    assert kind == "text/event-stream" and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

    completion = json.loads(refusal("/v1/completions", {"model": "m"}, text)[2])
    assert completion["object"] == "text_completion" and completion["choices"][0]["text"] == text
    response = json.loads(refusal("/v1/responses", {"model": "m"}, text)[2])
    assert response["output"][0]["content"][0]["text"] == text and response["status"] == "completed"
    message = json.loads(refusal("/v1/messages", {"model": "m"}, text)[2])
    assert message["content"][0]["text"] == text and message["stop_reason"] == "end_turn"
    status, _, body = refusal("/v1/embeddings", {"model": "m"}, text)
    assert status == 451 and json.loads(body)["error"]["code"] == 451
