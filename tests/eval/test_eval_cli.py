"""``serve-unlearn eval`` on the tiny Llama: a plain and a patched checkpoint with a guardrail baseline, compared
side by side; bad data stops before a model loads; ``eval verify`` with the operator key."""

from __future__ import annotations

import json

import pytest
import torch

from serve_unlearn.cli import main
from serve_unlearn.eval.verification import sign_record

FORGET = [{"question": "What is the chemical formula of water?", "answer": "H2O"},
          {"question": "What is the chemical formula of carbon dioxide?", "answer": ["CO2", "carbon dioxide"]}]
RETAIN = [{"question": "What color is the sky?", "answer": "blue", "perturbed_answer": ["green", "red"]}]


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture
def data(tmp_path):
    return {"forget": _write(tmp_path / "forget.jsonl", FORGET), "retain": _write(tmp_path / "retain.jsonl", RETAIN),
            "holdout": _write(tmp_path / "holdout.jsonl", [{"question": "Who wrote Hamlet?", "answer": "Shakespeare"}])}


def test_run_patched_with_a_baseline_and_compare(tiny_llama_dir, data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from serve_unlearn.patches import WeightPatch

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    edited = {k: v.clone() for k, v in base.state_dict().items()}
    edited["lm_head.weight"] += 0.5 * torch.randn_like(edited["lm_head.weight"])
    patch = tmp_path / "p.patch.safetensors"
    WeightPatch.from_diff(base.state_dict(), edited, method="test").save(patch)
    common = ["eval", "--forget", str(data["forget"]), "--retain", str(data["retain"]), "--holdout",
              str(data["holdout"]), "--max-new-tokens", "4", "--quiet"]
    assert main([*common, "--model-dir", str(tiny_llama_dir), "--name", "base", "--out", str(tmp_path / "a"),
                 "--baseline", "guardrail", "--guardrail-topic", "chemistry"]) == 0
    assert main([*common, "--model-dir", str(tiny_llama_dir), "--patch", str(patch), "--name", "patched",
                 "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    assert [t["target"] for t in a["targets"]] == ["base", "base+guardrail"]
    assert a["targets"][1]["describe"]["system_prompt"].count("chemistry") == 2
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    (t,) = b["targets"]
    assert t["describe"]["patches"][0]["path"] == str(patch)
    assert t["sets"]["retain"]["truth_ratio"]["n"] == 1
    assert t["sets"]["forget"]["answer_probability"]["mean"] != a["targets"][0]["sets"]["forget"][
        "answer_probability"]["mean"]  # the patch changed the model
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 0
    md = (tmp_path / "c" / "report.md").read_text()
    assert "| base | forget |" in md and "| patched | forget |" in md and "| base+guardrail |" in md


def test_bad_data_and_missing_targets_are_one_line_errors(tiny_llama_dir, data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"question": "Qu\xe9?", "answer": "a"}\n')
    assert main(["eval", "--forget", str(bad), "--retain", str(data["retain"]), "--model-dir", str(tiny_llama_dir),
                 "--out", str(tmp_path / "x")]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert main(["eval", "--forget", str(data["forget"]), "--retain", str(data["retain"]),
                 "--out", str(tmp_path / "x")]) == 2
    assert "give one target" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_verify_command(tmp_path, monkeypatch, capsys):
    doc = sign_record({"kind": "serve-unlearn/verification-record/1", "passed": False, "flagged": True,
                       "request": {"name": "chemistry"}}, b"k1")
    path = tmp_path / "record.json"
    path.write_text(json.dumps(doc))
    monkeypatch.setenv("SERVE_UNLEARN_SIGNING_KEY", "k1")
    assert main(["eval", "verify", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verified"] is True and out["flagged"] is True
    monkeypatch.setenv("SERVE_UNLEARN_SIGNING_KEY", "k2")
    assert main(["eval", "verify", str(path)]) == 2
    assert "does not match" in capsys.readouterr().err
