"""Evaluation data: the O3 format, TOFU's JSON (array and JSON lines), and clear errors for bad files."""

from __future__ import annotations

import json
import re

import pytest

from serve_unlearn.errors import EvalDataError, UnlearnDataError
from serve_unlearn.eval.data import eval_set_from_records, load_eval_set

TOFU = [{"question": "Who wrote The Glass Garden?", "answer": "Mara Velt wrote The Glass Garden.",
         "paraphrased_answer": "The Glass Garden is by Mara Velt.",
         "perturbed_answer": ["Ivo Sand wrote The Glass Garden.", "Lea Moor wrote The Glass Garden."],
         "paraphrased_question": "The Glass Garden: whose novel is it?"}]


def test_o3_examples_load(repo_root):
    s = load_eval_set(f"{repo_root}/examples/data/o3/topic_chemistry_paraphrases.jsonl", "forget")
    assert len(s) == 50 and s.name == "forget"
    first = s.items[0]
    assert first.question == "Which formula represents water in chemistry?"
    assert first.answers == ("h2o",) and first.reference == "The chemical formula of water is H2O."
    assert len(s.digest) == 64


def test_tofu_json_array_and_json_lines_give_the_same_set(tmp_path):
    arr = tmp_path / "forget01_perturbed.json"
    arr.write_text(json.dumps(TOFU))
    lines = tmp_path / "forget01.json"  # TOFU's hub files: JSON lines named .json
    lines.write_text("\n".join(json.dumps(r) for r in TOFU * 2))
    a, b = load_eval_set(arr), load_eval_set(lines)
    assert a.items[0] == b.items[0] and len(b) == 2
    it = a.items[0]
    assert it.answers == ("Mara Velt wrote The Glass Garden.",) and it.reference == it.answers[0]
    assert it.perturbed_answers == tuple(TOFU[0]["perturbed_answer"])
    assert it.paraphrased_answer == TOFU[0]["paraphrased_answer"]
    assert it.paraphrased_questions == (TOFU[0]["paraphrased_question"],)
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": TOFU}))
    assert load_eval_set(wrapped).items == a.items


def test_answer_lists_and_digests():
    s = eval_set_from_records("retain", [{"prompt": "Capital of France?", "answer": ["Paris", "paris, france"]}])
    assert s.items[0].answers == ("Paris", "paris, france") and s.items[0].reference == "Paris"
    same = eval_set_from_records("retain", [{"question": "Capital of France?", "answer": ["Paris", "paris, france"],
                                             "extra": 1}])
    assert same.digest == s.digest
    other = eval_set_from_records("retain", [{"question": "Capital of France?", "answer": "Lyon"}])
    assert other.digest != s.digest


@pytest.mark.parametrize(("content", "message"), [
    (b'{"answer": "Paris"}\n', "'question' (or 'prompt')"),
    (b'{"question": "Capital of France?"}\n', "needs an 'answer'"),
    (b'{"question": "Capital of France?", "answer": ""}\n', "field 'answer' is empty"),
    (b'{"question": "Capital of France?", "answer": 3}\n', "must be a string or a list"),
    (b'{"question": "Q?", "answer": "A", "perturbed_answer": [1]}\n', "'perturbed_answer' must be"),
    (b'{"question": "Q?", "answer": "A"}\n{"question": \n', ":2: not valid JSON"),
    (b'["a"]', "expected a JSON object"),
    (b"[{]", "not valid JSON"),
    (b"", "is empty"),
    (b"\n\n  \n", "is empty"),
    ('{"question": "Qu\u00e9?", "answer": "A"}\n'.encode("latin-1"), "not UTF-8"),
])
def test_bad_files_get_clear_errors(tmp_path, content, message):
    path = tmp_path / "set.jsonl"
    path.write_bytes(content)
    with pytest.raises(EvalDataError, match=re.escape(message)) as exc:
        load_eval_set(path, "forget")
    assert isinstance(exc.value, UnlearnDataError)  # caught like every other data error by the CLI
    assert "set.jsonl" in str(exc.value) or "forget" in str(exc.value)


def test_missing_file_and_bad_probe_shapes(tmp_path):
    with pytest.raises(EvalDataError, match="does not exist"):
        load_eval_set(tmp_path / "nope.jsonl", "retain")
    with pytest.raises(EvalDataError, match="must be a list of records"):
        eval_set_from_records("forget", {"question": "Q?", "answer": "A"})
    with pytest.raises(EvalDataError, match=r"probes\[1\]"):
        eval_set_from_records("forget", [{"question": "Q?", "answer": "A"}, {"question": "Q2?"}], "probes")
