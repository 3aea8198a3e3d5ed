"""Interim enforcement: a filed forget request refuses what its detector flags before its adapter is in force.

A detector trains in seconds, an unlearning LoRA in minutes. The control plane's worker publishes the detector of
a filing as a *guard* (``result.guard`` of its queue row: a folder under ``<registry>/guards/`` and its file
manifest) as soon as it exists; every middleware loads the guards of the filings that are ``guarded`` or
``ready`` (verified file by file) and answers the prompts they flag with a refusal in the route's own response
format, never the base model's answer. Once the adapter is in force the filing leaves the list and routing takes
over.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from ...adapters.gate import Gate, GateConfig
from ...adapters.served import load_guard_gate
from ...registry import ForgetRegistry
from ...registry.queue import ForgetQueue
from .config import GuardConfig

logger = logging.getLogger(__name__)

GUARD_HEADER = b"x-serve-unlearn-guard"


class Guards:
    """The guard gate of one middleware, reloaded when the set of guarding filings changes."""

    def __init__(self, config: GuardConfig, gate_config: GateConfig):
        self.config = config
        self.gate_config = gate_config
        self.key: tuple[str, ...] = ()
        self.gate: Gate | None = None
        self.error: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self.gate.request_names) if self.gate else []

    def refresh(self, registry: ForgetRegistry) -> None:
        """Load the guards of the filings guarding now (blocking: run it off the event loop)."""
        if not self.config.enabled:
            return
        jobs = ForgetQueue(registry).guards()
        key = tuple(j.id for j in jobs)
        if key == self.key:
            return
        entries = [(j.name, j.result["guard"]["path"], j.result["guard"]["files"]) for j in jobs]
        try:
            gate = load_guard_gate(registry, entries, self.gate_config)
        except Exception as exc:  # noqa: BLE001 - keep the previous guards; the status page shows why
            self.error = f"{type(exc).__name__}: {exc}"
            logger.error("serve-unlearn: cannot load the guards of %s: %s", [j.name for j in jobs], self.error)
            return
        old, self.gate, self.key, self.error = self.gate, gate, key, None
        if old is not None:
            old.close()
        logger.info("serve-unlearn: guarding for %s", [j.name for j in jobs] or "no filing")

    def flagged(self, texts: list[str], routed: frozenset[str] | set[str] = frozenset()) -> str | None:
        """The filing whose detector flags these texts (enough for any adapter scale), else None. Filings already
        in the routed version (``routed``: its request names) are left to routing, even before this middleware
        drops their guard at its next poll."""
        gate = self.gate
        if gate is None or not set(gate.request_names) - set(routed):
            return None
        (decision,) = gate.decide([texts])
        pending = {name: w for name, w in decision.weights.items() if name not in routed}
        if decision.error is not None:  # scoring failed: refuse as the gate fails closed
            return min(set(gate.request_names) - set(routed)) if self.gate_config.fail_closed else None
        name, weight = max(pending.items(), key=lambda kv: kv[1], default=(None, 0.0))
        return name if float(self.gate_config.policy.scale(weight)) > 0 else None


def refusal(template: str, data: dict, text: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of a refusal in ``template``'s response format; routes whose format is not
    written here get 451 and a JSON error."""
    model = str(data.get("model") or "")
    created = int(time.time())
    stream = bool(data.get("stream"))
    n = data.get("n") if isinstance(data.get("n"), int) and 0 < data.get("n") <= 128 else 1
    rid = uuid.uuid4().hex[:24]
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if template == "/v1/chat/completions":
        if stream:
            first = [{"index": i, "delta": {"role": "assistant", "content": text}, "finish_reason": None}
                     for i in range(n)]
            last = [{"index": i, "delta": {}, "finish_reason": "stop"} for i in range(n)]
            return _sse([{"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": created,
                          "model": model, "choices": c} for c in (first, last)])
        return _json(200, {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": created, "model": model,
                           "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                                        "logprobs": None, "finish_reason": "stop"} for i in range(n)],
                           "usage": usage})
    if template == "/v1/completions":
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": "stop"} for i in range(n)]
        body = {"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": model,
                "choices": choices}
        return _sse([body]) if stream else _json(200, {**body, "usage": usage})
    if template == "/v1/responses" and not stream:
        return _json(200, {"id": f"resp_{rid}", "object": "response", "created_at": created, "model": model,
                           "status": "completed", "output": [{
                               "type": "message", "id": f"msg_{rid}", "role": "assistant", "status": "completed",
                               "content": [{"type": "output_text", "text": text, "annotations": []}]}],
                           "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}})
    if template == "/v1/messages" and not stream:
        return _json(200, {"id": f"msg_{rid}", "type": "message", "role": "assistant", "model": model,
                           "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                           "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}})
    return _json(451, {"error": {"message": f"refused: {text}", "type": "UnavailableForLegalReasons",
                                 "code": 451}})


def _json(status: int, payload: dict) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(payload).encode()


def _sse(chunks: list[dict]) -> tuple[int, str, bytes]:
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return 200, "text/event-stream", body.encode()
