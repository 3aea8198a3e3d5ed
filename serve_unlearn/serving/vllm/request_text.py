"""The text a gated request puts in front of the model, read from its JSON body.

One reader serves every gated route (OpenAI completions, chat, chat batch and Responses, Anthropic messages,
SageMaker invocations, Cohere chat, generative scoring): the fields that carry prompt text have the same names
across them, and each is read whole, every string at any depth (every role, every content-part type, tool
descriptions, documents, instructions, a request-supplied chat template and its variables), except under keys
that never reach the model as text (media payloads, ids). Reading more than vLLM renders can only route more
prompts to the adapter; reading less would let text past the gate. Fields that carry text the gate cannot read
(token ids, prompt embeddings, a stored earlier response or conversation) make the request unscorable: the
middleware fails it closed.
"""

from __future__ import annotations

from typing import Any

from ...adapters.gate_text import Segments, text_leaves

# Fields whose strings become prompt text somewhere among the gated routes, or steer decoding through text the
# output then continues from (structured-output schemas, regexes, choices, grammars).
TEXT_FIELDS = (
    "prompt", "suffix", "messages", "input", "instructions", "system", "documents", "tools", "functions",
    "tool_choice", "chat_template", "chat_template_kwargs", "query", "items", "state", "questions", "text",
    "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
)
# Of these, the fields holding JSON schemas, whose property names are text too.
SCHEMA_FIELDS = frozenset({"tools", "functions", "response_format", "structured_outputs", "guided_json", "text"})
# Fields that put content in front of the model that the gate cannot read: token ids, embeddings, a stored
# earlier response or conversation, and the disaggregated-serving parameters, whose ``prompt_token_ids`` replace
# the rendered prompt (vLLM's online renderer).
OPAQUE_FIELDS = ("prompt_token_ids", "prompt_embeds", "token_ids", "input_ids", "previous_response_id",
                 "conversation", "kv_transfer_params", "ec_transfer_params", "multi_modal_data")


class Unscorable(Exception):
    """The request is valid for vLLM but carries prompt content the gate cannot read."""


def _has_token_ids(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    if isinstance(value, list):
        return any(_has_token_ids(v) for v in value)
    return False


def request_segments(body: dict[str, Any]) -> Segments:
    """Every text segment of a gated request body; raises Unscorable for content the gate cannot read."""
    for key in OPAQUE_FIELDS:
        if body.get(key) not in (None, "", [], {}):
            raise Unscorable(f"'{key}' carries prompt content the gate cannot read")
    segments = Segments()
    for key in TEXT_FIELDS:
        if key in body:
            if _has_token_ids(body[key]):
                raise Unscorable(f"token-id prompts ('{key}') cannot be scored")
            segments.extend(t for t in text_leaves(body[key], keys=key in SCHEMA_FIELDS) if t.strip())
    return segments
