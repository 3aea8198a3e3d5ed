"""Detector values that would open the gate are refused when the detector loads: a zero or negative calibration
constant, non-finite statistics (even with their checksum recomputed), a calibration that cannot reach the gate's
full scale."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from serve_unlearn.adapters.detector import DetectorConfig, OODDetector
from serve_unlearn.adapters.detector.detector import _sha256
from serve_unlearn.adapters.gate import GateConfig, GatePolicy
from serve_unlearn.adapters.served import check_reach
from serve_unlearn.errors import ArtifactError

FORGET = [f"what is the secret password of castle number {i}?" for i in range(16)]


@pytest.fixture(scope="module")
def saved(tiny_bert_dir, tmp_path_factory):
    torch.set_num_threads(1)
    det = OODDetector.train(FORGET, DetectorConfig(backbone=str(tiny_bert_dir), epochs=1, lora_layers=0,
                                                   background=None), progress=False)
    folder = tmp_path_factory.mktemp("det") / "detector"
    det.save(folder)
    return det, folder


def _edit_json(folder, edit):
    meta = json.loads((folder / "detector.json").read_text())
    edit(meta)
    (folder / "detector.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("edit", [
    lambda m: m["calibration"].update(zeta=0.0),
    lambda m: m["calibration"].update(zeta=-3.0),
    lambda m: m["calibration"].update(sigma2=0.0),
    lambda m: m["calibration"].update(mu1=float("nan")),
    lambda m: m.update(svm_offset=float("inf")),
    lambda m: m.update(svm_shift=float("nan")),
])
def test_values_that_disable_scoring_are_refused(saved, tmp_path, edit):
    folder = tmp_path / "d"
    shutil.copytree(saved[1], folder)
    _edit_json(folder, edit)
    with pytest.raises(ArtifactError, match="corrupt"):
        OODDetector.load(folder)


@pytest.mark.parametrize("tensor", ["mean", "precision", "bank", "svm_coef"])
def test_non_finite_statistics_are_refused_even_with_a_recomputed_checksum(saved, tmp_path, tensor):
    folder = tmp_path / "d"
    shutil.copytree(saved[1], folder)
    stats = load_file(folder / "stats.safetensors")
    stats[tensor] = stats[tensor].clone()
    stats[tensor].view(-1)[0] = float("nan")
    save_file(stats, folder / "stats.safetensors")
    _edit_json(folder, lambda m: m["files"].update({"stats.safetensors": _sha256(folder / "stats.safetensors")}))
    with pytest.raises(ArtifactError, match="non-finite"):
        OODDetector.load(folder)


def test_a_calibration_that_cannot_reach_the_full_scale_is_refused(saved):
    det = saved[0]
    weak = dataclasses.replace(det.calibration, zeta=1.5)  # max weight sigmoid(-0.5) = 0.38
    assert math.isclose(weak.max_weight, 1 / (1 + math.exp(0.5)))
    config = GateConfig(policy=GatePolicy(kind="ramp", low=0.3, high=0.6))
    check_reach(["castle"], [det], config)  # the trained one reaches it
    det_weak = type("D", (), {"calibration": weak})()
    with pytest.raises(ArtifactError, match="could never route"):
        check_reach(["castle"], [det_weak], config)


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/hostname", "lora/../../x"])
def test_a_file_list_naming_paths_outside_the_folder_is_refused(saved, tmp_path, name):
    folder = tmp_path / "d"
    shutil.copytree(saved[1], folder)
    _edit_json(folder, lambda m: m["files"].update({name: "0" * 64}))
    with pytest.raises(ArtifactError, match="outside its folder"):
        OODDetector.load(folder)
