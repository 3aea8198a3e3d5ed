"""``serve-unlearn o3 list|score|forget|retire``: output on an empty registry, and user errors exit 2 with a message."""

from __future__ import annotations

import json

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
