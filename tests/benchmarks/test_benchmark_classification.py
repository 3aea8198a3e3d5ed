"""The digits unlearning benchmark end to end on one seed with tiny epochs, and its MIA metric."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    path = ROOT / "benchmarks" / "unlearn_classification.py"
    spec = importlib.util.spec_from_file_location("unlearn_classification", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_svc_mia_separates_members_from_non_members(bench):
    rng = np.random.default_rng(0)
    members = 1.0 - rng.uniform(0.0, 0.01, 200)  # trained-on samples: near-certain
    non_members = rng.uniform(0.2, 0.9, 200)  # held-out samples: clearly less confident
    assert bench.svc_mia(members, non_members, 1.0 - rng.uniform(0.0, 0.01, 50)) < 10.0
    assert bench.svc_mia(members, non_members, rng.uniform(0.2, 0.9, 50)) > 90.0
    half = np.concatenate([1.0 - rng.uniform(0.0, 0.01, 25), rng.uniform(0.2, 0.9, 25)])
    assert bench.svc_mia(members, non_members, half) == pytest.approx(50.0, abs=10.0)


def test_one_seed_pipeline(bench, tmp_path):
    setup = bench.Setup(recipe=bench.Recipe(epochs=4), tune_repeats=1)
    grids = {m: [{"lr": 1e-4, "epochs": 1}, {"lr": 1e-3, "epochs": 1}] for m in ("FT", "GA", "RL", "SalUn")}
    grids["IAU"] = [{"lr": 1e-4}, {"lr": 1e-3}]
    lines = []
    res = bench.run_benchmark(1, tmp_path, setup=setup, grids=grids, log=lines.append)

    assert res["original"]["train_acc"] > 80.0  # the tiny recipe still learns digits
    for method in bench.METHODS + ["Original"]:
        assert f"| {method} |" in res["table"]
        row = res["per_seed"][0][method]
        for col in bench.COLUMNS:
            assert math.isfinite(row[col]), (method, col)
        for metric in bench.METRICS:
            assert 0.0 <= row[metric] <= 100.0, (method, metric)
    assert res["per_seed"][0]["Retrain"]["Avg. Gap"] == 0.0
    for method, grid in grids.items():
        assert res["hyperparameters"][method] in grid
        assert len(res["tuning_trials_seed0"][method]) == len(grid)
    # SalUn's patch stays inside its 50% mask; IAU's adam1 step is dense
    assert 0.0 < res["patch_info"][0]["SalUn"]["patch_nnz_frac"] <= 0.5 + 1e-6
    assert res["patch_info"][0]["IAU"]["patch_nnz_frac"] > 0.5
    saved = json.loads((tmp_path / "unlearn_classification.json").read_text())
    assert saved["summary"]["SalUn"]["Avg. Gap"][0] == pytest.approx(res["summary"]["SalUn"]["Avg. Gap"][0])
    assert (tmp_path / "unlearn_classification.png").stat().st_size > 1000
    assert any(line.startswith("seed 0:") for line in lines)


def test_mia_efficacy_on_a_model(bench):
    torch.manual_seed(0)
    train, test = bench.load_digits_split()
    forget, retain, idx = bench.forget_retain_split(train, 0.1, seed=0)
    assert len(forget[1]) + len(retain[1]) == len(train[1]) and len(set(idx.tolist())) == len(idx)
    model = bench.new_model(0, 32)
    bench.train_classifier(model, train, epochs=3, lr=3e-3, batch_size=64, seed=0)
    mia = bench.mia_efficacy(model, forget, retain, test)
    assert 0.0 <= mia <= 100.0
    metrics = bench.evaluate(model, forget, retain, test)
    assert metrics["UA"] == pytest.approx(100.0 - bench.accuracy(model, forget))
    assert metrics["MIA"] == mia
