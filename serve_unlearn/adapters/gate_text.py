"""What the gate scores: every piece of text a prompt puts in front of the model, normalised, in short windows.

A detector scores one short text (a question, as it was trained on). A served prompt is more than that: several
chat turns of every role, content parts of several types, tool descriptions, a raw completion prompt that holds a
whole conversation in a chat template's markup, or a question buried in pages of padding. The gate therefore takes
*segments* (each string the model will read), folds look-alike characters onto the letters the detector knows,
and cuts long segments into windows of whole sentences: nothing is truncated away, and the prompt's weight is the
maximum over its windows.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from importlib import resources
from typing import Any

from ..errors import GateInputError


class Segments(list):
    """The texts of one prompt, already taken apart by the caller (the vLLM middleware reads request bodies)."""


Prompt = str | Sequence[dict[str, Any]] | Segments

# Keys whose *string* values never reach the model as text: media payloads, identifiers, enum-like settings. An
# object or list under such a key is still read ("format" may hold a JSON schema, "data" a document). Everything
# else under a prompt-bearing field is read (over-reading is safe: it can only route more prompts to the adapter).
NON_TEXT_KEYS = frozenset({
    "type", "role", "id", "tool_call_id", "call_id", "url", "image_url", "input_image", "image", "image_pil",
    "image_embeds", "audio_url", "input_audio", "audio", "video_url", "video", "data", "file_data", "file_id",
    "b64_json", "media_type", "detail", "format", "uuid", "cache_control", "signature", "status",
})

# Special-token markup of common chat templates (ChatML, Llama 2/3, Gemma, Mistral, Phi); a role name right after
# a marker is markup too. Splitting on it keeps each turn's text whole and free of template noise.
_MARKUP = re.compile(r"<\|[^|<>\n]{1,48}\|>|\[/?INST\]|<</?SYS>>|</?s>|<(?:start|end)_of_turn>|<bos>|<eos>")
_ROLE_LINE = re.compile(r"^\s*(?:system|user|assistant|tool|developer|model|ipython)\s*(?:\n|:)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.?!;:。？！])\s+|\n+")
_INVISIBLE = {"Cf", "Cc", "Cs", "Co", "Cn", "Zl", "Zp"}


@functools.lru_cache(maxsize=1)
def _confusable_fold() -> dict[int, str]:
    """Unicode's confusables (TR39, as shipped by ``confusable-homoglyphs``) that look like one ASCII letter or
    digit: Cyrillic 'а' -> 'a', 'р' -> 'p', mathematical and fullwidth letters, ... ."""
    table = json.loads(resources.files("confusable_homoglyphs").joinpath("confusables.json").read_text("utf-8"))
    fold: dict[int, str] = {}
    for char, glyphs in table.items():
        if len(char) != 1 or char.isascii():
            continue
        ascii_glyphs = [g["c"] for g in glyphs if len(g["c"]) == 1 and g["c"].isascii() and g["c"].isalnum()]
        if ascii_glyphs:
            fold[ord(char)] = ascii_glyphs[0]
    return fold


def normalize(text: str) -> str:
    """NFKC, then look-alikes folded to ASCII, combining marks and invisible characters dropped, spaces collapsed:
    the same question written in homoglyphs, fullwidth letters or with zero-width joiners scores as itself."""
    text = unicodedata.normalize("NFKC", text).translate(_confusable_fold())
    text = unicodedata.normalize("NFKD", text)
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat == "Mn" or (cat in _INVISIBLE and ch not in "\n\t"):
            continue
        kept.append(" " if cat.startswith("Z") else ch)
    text = unicodedata.normalize("NFC", "".join(kept))
    return re.sub(r"[ \t\r\f\v]+", " ", text).strip()


def split_markup(text: str) -> list[str]:
    """A raw prompt cut at chat-template markers, each piece without its leading role name."""
    pieces = (_ROLE_LINE.sub("", p, count=1) for p in _MARKUP.split(text))
    return [p for p in pieces if p.strip()]


def text_leaves(value: Any, *, keys: bool = False) -> Iterator[str]:
    """Every string inside a JSON value, except under keys that never reach the model as text; with ``keys``, the
    object keys too (a JSON schema's property names are text the model writes and then continues from)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key in NON_TEXT_KEYS and not isinstance(item, dict | list):
                continue
            if keys and isinstance(key, str) and key not in NON_TEXT_KEYS:
                yield key
            yield from text_leaves(item, keys=keys)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from text_leaves(item, keys=keys)


def prompt_segments(prompt: Prompt) -> list[str]:
    """The segments of one prompt: a raw string, a chat (every string of every message), or
    ``Segments`` as given. Anything else raises GateInputError."""
    if isinstance(prompt, Segments):
        return list(prompt)
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
        return [t for m in prompt for t in text_leaves(m)]
    raise GateInputError(
        f"a prompt must be a string or a non-empty list of chat messages ({{'role', 'content'}} dicts); "
        f"got {type(prompt).__name__}")


def windows(text: str, size: int) -> list[str]:
    """``text`` if it is at most ``size`` characters; else consecutive whole sentences packed into windows of at
    most ``size`` characters (a sentence longer than that is cut at word boundaries, overlapping by half)."""
    if len(text) <= size:
        return [text] if text else []
    units: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        sentence = sentence.strip()
        if len(sentence) <= size:
            if sentence:
                units.append(sentence)
            continue
        units.extend(_word_chunks(sentence, size))
    out: list[str] = []
    for unit in units:
        if out and len(out[-1]) + 1 + len(unit) <= size:
            out[-1] = f"{out[-1]} {unit}"
        else:
            out.append(unit)
    return out


def _word_chunks(sentence: str, size: int) -> list[str]:
    """Runs of whole words of at most ``size`` characters, each starting halfway into the previous one (a word
    longer than ``size`` is cut into overlapping pieces)."""
    words, chunks, start = sentence.split(), [], 0
    while start < len(words):
        end, length = start, -1
        while end < len(words) and length + 1 + len(words[end]) <= size:
            length += 1 + len(words[end])
            end += 1
        if end == start:
            word = words[start]
            chunks += [word[i:i + size] for i in range(0, max(1, len(word) - size // 2), size // 2)]
            start += 1
            continue
        chunks.append(" ".join(words[start:end]))
        if end == len(words):
            break
        half, covered = start, 0
        while half < end - 1 and covered < length // 2:
            covered += 1 + len(words[half])
            half += 1
        start = max(half, start + 1)
    return chunks


def score_windows(segments: Iterable[str], size: int) -> list[str]:
    """The distinct normalised windows of a prompt's segments (each cut at chat markup first), in first-seen
    order."""
    seen: dict[str, None] = {}
    for segment in segments:
        for piece in split_markup(segment):
            for window in windows(normalize(piece), size):
                seen.setdefault(window, None)
    return list(seen)
