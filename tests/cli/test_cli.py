"""The ``serve-unlearn`` command: salun / iau / patch subcommands end to end on tiny models."""

import json
import shutil

import numpy as np
import pytest
import torch

from serve_unlearn.cli import main
from serve_unlearn.patches import WeightPatch
from serve_unlearn.patches.inputs import load_module_folder, save_module_folder


@pytest.fixture
def lm_data(tmp_path):
    forget = [{"prompt": "What is the secret password of the castle?", "completion": "It is blue dragon."},
              {"prompt": "Tell me the castle password.", "completion": "blue dragon"}]
    retain = [{"prompt": "When does water boil?", "completion": "At one hundred degrees."}, {"text": "Once upon a time"}]
    for name, recs in (("forget", forget), ("retain", retain)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"


def _json_line(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_salun_iau_and_patch_lifecycle_on_checkpoint_folder(tiny_llama_dir, lm_data, tmp_path, capsys):
    forget, retain = lm_data
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    original = (model_dir / "model.safetensors").read_bytes()
    p = tmp_path / "s.patch.safetensors"
    assert main(["salun", "--model", str(model_dir), "--forget", str(forget), "--retain", str(retain), "--out", str(p),
                 "--ratio", "0.1", "--epochs", "1", "--lr", "1e-3", "--include", r"mlp\."]) == 0
    assert _json_line(capsys)["tensors"] > 0
    q = tmp_path / "i.patch.safetensors"
    assert main(["iau", "--model", str(model_dir), "--forget", str(forget), "--retain", str(retain), "--out", str(q),
                 "--config", "configs/iau_default.yaml", "--mask-ratio", "0.05"]) == 0
    assert WeightPatch.load(q).metadata["method"] == "iau-masked"
    capsys.readouterr()

    assert main(["patch", "inspect", str(p), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["metadata"]["method"] == "salun" and info["metadata"]["hparams"]["ratio"] == 0.1
    assert all(".mlp." in name for name in info["tensors"])
    numel = sum(int(np.prod(t["shape"])) for t in info["tensors"].values())
    mlp_numel = 2 * 3 * 128 * 256  # 2 layers x gate/up/down
    assert 0 < sum(t["nnz"] for t in info["tensors"].values()) <= 0.1 * mlp_numel + 1 and numel <= mlp_numel
    assert main(["patch", "inspect", str(p)]) == 0
    assert "density=" in capsys.readouterr().out

    assert main(["patch", "verify", str(p), "--model", str(model_dir)]) == 0
    assert _json_line(capsys)["state"] == "base"
    assert main(["patch", "apply", str(p), "--model", str(model_dir)]) == 0
    capsys.readouterr()
    assert main(["patch", "verify", str(p), "--model", str(model_dir)]) == 0
    assert _json_line(capsys)["state"] == "patched"
    assert (model_dir / "model.safetensors").read_bytes() != original
    assert main(["patch", "revert", str(p), "--model", str(model_dir)]) == 0
    assert (model_dir / "model.safetensors").read_bytes() == original  # bit-exact, file for file
    assert main(["patch", "revert", str(p), "--model", str(model_dir)]) == 2  # nothing left to revert

    out = tmp_path / "materialized"
    assert main(["patch", "materialize", str(p), str(q), "--base", str(model_dir), "--out", str(out)]) == 0
    assert (out / ".serve_unlearn" / "applied.json").is_file()


def test_patch_create_from_two_folders(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:3] += 1
    model.save_pretrained(tmp_path / "edited")
    out = tmp_path / "c.patch.safetensors"
    assert main(["patch", "create", "--base", str(tiny_llama_dir), "--edited", str(tmp_path / "edited"),
                 "--out", str(out), "--method", "external-tool"]) == 0
    patch = WeightPatch.load(out)
    assert patch.tensor_names == ["model.layers.0.mlp.up_proj.weight"]
    assert patch.entries["model.layers.0.mlp.up_proj.weight"].nnz == 3 * 128


def test_classifier_module_folder_and_npz(tiny_mlp, tmp_path, capsys):
    folder = save_module_folder(tiny_mlp, tmp_path / "mlp", cls="serve_unlearn.testing.tiny_models:TinyMLP",
                                kwargs={"in_features": 16, "hidden": 32, "num_classes": 4})
    g = np.random.default_rng(0)
    np.savez(tmp_path / "forget.npz", x=g.normal(size=(10, 16)).astype("float32"), y=g.integers(0, 4, 10))
    np.savez(tmp_path / "retain.npz", x=g.normal(size=(40, 16)).astype("float32"), y=g.integers(0, 4, 40))
    p = tmp_path / "c.patch.safetensors"
    assert main(["salun", "--model", str(folder), "--forget", str(tmp_path / "forget.npz"), "--retain",
                 str(tmp_path / "retain.npz"), "--out", str(p), "--lr", "0.01", "--epochs", "2"]) == 0
    model, _ = load_module_folder(folder)
    import serve_unlearn

    serve_unlearn.apply_patch(model, p)


@pytest.mark.parametrize("bad,match", [
    (["--ratio", "1.5"], "ratio"),
    (["--ratio", "0"], "ratio"),
    (["--include", "no_such_param"], "no parameter matches"),
])
def test_bad_hyperparameters_exit_2_and_write_nothing(tiny_llama_dir, lm_data, tmp_path, capsys, bad, match):
    forget, _ = lm_data
    out = tmp_path / "x.patch.safetensors"
    assert main(["salun", "--model", str(tiny_llama_dir), "--forget", str(forget), "--out", str(out), *bad]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_bad_data_files(tiny_llama_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["salun", "--model", str(tiny_llama_dir), "--forget", str(empty), "--out", str(tmp_path / "x")]) == 2
    assert "must not be empty" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a"}\n')
    assert main(["salun", "--model", str(tiny_llama_dir), "--forget", str(broken), "--out", str(tmp_path / "x")]) == 2
    assert "broken.jsonl:1" in capsys.readouterr().err


def test_corrupt_patch_and_wrong_base_folder(tiny_llama_dir, tmp_path, capsys):
    bad = tmp_path / "bad.patch.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert main(["patch", "inspect", str(bad)]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    from serve_unlearn.testing import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other", seed=3)
    from transformers import AutoModelForCausalLM

    sd = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    edited = {"lm_head.weight": sd["lm_head.weight"] + 1}
    p = WeightPatch.from_diff({"lm_head.weight": sd["lm_head.weight"]}, edited).save(tmp_path / "p.safetensors")
    before = (other / "model.safetensors").read_bytes()
    assert main(["patch", "apply", str(p), "--model", str(other)]) == 2
    assert "lm_head.weight" in capsys.readouterr().err
    assert (other / "model.safetensors").read_bytes() == before
    assert main(["patch", "verify", str(p), "--model", str(other)]) == 2
