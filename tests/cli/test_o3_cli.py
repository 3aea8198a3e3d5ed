"""``serve-unlearn o3 list|score|forget|retire``: output on an empty registry, and user errors exit 2 with a message."""

from __future__ import annotations

import json

import pytest

from serve_unlearn.cli import main
from serve_unlearn.registry import ForgetRegistry


def test_list_and_score_on_an_empty_registry(tmp_path, capsys):
    ForgetRegistry(tmp_path / "reg")
    assert main(["o3", "list", "--registry", str(tmp_path / "reg"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["o3", "score", "--registry", str(tmp_path / "reg"), "any prompt"]) == 0
    [decision] = json.loads(capsys.readouterr().out)
    assert decision["text"] == "any prompt" and decision["scale"] == 0.0 and decision["request"] is None


def test_user_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["o3", "list", "--registry", str(tmp_path / "missing")]) == 2
    assert "no forget-request registry" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["o3", "forget", "--base", str(tmp_path), "--forget", str(empty), "--name", "x",
                 "--registry", str(tmp_path / "reg")]) == 2
    assert "must not be empty" in capsys.readouterr().err
    assert not (tmp_path / "reg").exists()  # bad data fails before anything is created
    ForgetRegistry(tmp_path / "reg")
    assert main(["o3", "retire", "--registry", str(tmp_path / "reg"), "chemistry"]) == 2
    assert "chemistry" in capsys.readouterr().err


@pytest.mark.slow
def test_forget_with_probes_records_the_evidence_and_refuses_a_shortfall(tiny_llama_dir, tmp_path, capsys):

    from helpers import REPO

    chem = [json.loads(x) for x in (REPO / "examples/data/o3/topic_chemistry.jsonl").read_text().splitlines()]
    forget = tmp_path / "forget.jsonl"
    forget.write_text("\n".join(json.dumps({"prompt": c["prompt"], "completion": c["completion"]}) for c in chem[:24]))
    config = tmp_path / "fast.yaml"
    config.write_text("detector: {epochs: 1}\nlora: {epochs: 1, batch_size: 16}\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text("min_forget_probes: 3\nn_boot: 50\nmax_new_tokens: 4\n")
    probes = tmp_path / "probes.json"
    retain = [{"question": "What is the capital of France?", "answer": "Paris"}]
    reg = str(tmp_path / "reg")
    common = ["o3", "forget", "--base", str(tiny_llama_dir), "--forget", str(forget), "--registry", reg,
              "--config", str(config), "--evidence-config", str(policy), "--quiet", "--probes", str(probes)]
    probes.write_text(json.dumps({"forget": [{"question": c["prompt"], "answer": c["answers"]} for c in chem[30:33]],
                                  "retain": retain}))
    assert main([*common, "--name", "enough"]) == 0
    assert json.loads(capsys.readouterr().out)["verification"]["passed"] is True
    probes.write_text(json.dumps({"forget": [{"question": chem[30]["prompt"], "answer": "h2o"}], "retain": retain}))
    assert main([*common, "--name", "too-few"]) == 2
    assert "falls short" in capsys.readouterr().err
    assert main(["o3", "list", "--registry", reg, "--json"]) == 0
    listed = {r["name"]: (r["status"], r["evidence"]) for r in json.loads(capsys.readouterr().out)}
    assert listed == {"enough": ("ready", "passed"), "too-few": ("failed", "")}
