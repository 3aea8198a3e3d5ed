"""Verification records: a candidate (a real MiniLM detector and a LoRA in plain folders, as a request's staging
leaves them) against its probes on the tiny Llama, the default policy refusing a request that forgets nothing,
and HMAC signing that fails after any changed byte."""

from __future__ import annotations

import json

import pytest
import torch

from serve_unlearn.adapters.gate import GateConfig
from serve_unlearn.errors import EvalDataError, EvidenceError
from serve_unlearn.eval.verification import (
    VerificationPolicy,
    sign_record,
    verify_candidate,
    verify_record,
    verify_record_file,
)

KEY = b"operator-key"
GATE = GateConfig.validate_dict({"policy": {"kind": "threshold", "threshold": 0.5}})


def _adapter(model, folder, *, random: bool):
    import copy

    from peft import LoraConfig, get_peft_model

    from serve_unlearn.adapters.orthogonal_lora import base_model_fingerprint, write_adapter_info

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=32, target_modules="all-linear", init_lora_weights=not random)
    get_peft_model(copy.deepcopy(model), lora).save_pretrained(folder)
    write_adapter_info(folder, requests=["chemistry"], base_fingerprint=base_model_fingerprint(model))
    return folder


@pytest.fixture(scope="module")
def candidate(tiny_llama_dir, tmp_path_factory, repo_root):
    """(model, tokenizer, detector folder, random adapter, no-op adapter, probes whose answers are what the base
    model says: the base answers every probe)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve_unlearn.adapters.detector import DetectorConfig, OODDetector
    from serve_unlearn.eval.qa import load_qa
    from serve_unlearn.eval.targets import LocalTarget

    tmp = tmp_path_factory.mktemp("verify")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    chem = [it["prompt"] for it in load_qa(f"{repo_root}/examples/data/o3/topic_chemistry.jsonl")][:24]
    OODDetector.train(chem, DetectorConfig(epochs=1), progress=False).save(tmp / "detector")
    para = [it["prompt"] for it in load_qa(f"{repo_root}/examples/data/o3/topic_chemistry_paraphrases.jsonl")][:8]
    retain = [it["prompt"] for it in load_qa(f"{repo_root}/examples/data/o3/retain_heldout.jsonl")][:8]
    base = LocalTarget(model, tok)

    def probes(questions):
        gens = base.generate([[{"role": "user", "content": q}] for q in questions], 8)
        return [{"question": q, "answer": g.text} for q, g in zip(questions, gens) if g.text.strip()]

    return {"model": model, "tok": tok, "detector": tmp / "detector",
            "random": _adapter(model, tmp / "random", random=True), "noop": _adapter(model, tmp / "noop", random=False),
            "probes": {"forget": probes(para), "retain": probes(retain)}}


def _verify(c, adapter, policy=None):
    return verify_candidate(model=c["model"], tokenizer=c["tok"], detector_dir=c["detector"], adapter_dir=c[adapter],
                            probes=c["probes"], policy=policy or VerificationPolicy(max_new_tokens=8),
                            gate_config=GATE, request={"name": "chemistry", "id": "r1"})


@pytest.mark.real_model
@pytest.mark.slow
def test_a_candidate_that_forgets_passes_and_leaves_the_model_unchanged(candidate):
    from serve_unlearn.adapters.orthogonal_lora import base_model_fingerprint

    before = base_model_fingerprint(candidate["model"])
    rec = _verify(candidate, "random")
    assert rec.base["forget"]["accuracy"]["mean"] == 1.0 and rec.base["retain"]["accuracy"]["mean"] == 1.0
    assert rec.candidate["forget"]["accuracy"]["mean"] <= 0.25
    assert rec.deltas["retain_accuracy_drop"] == 0.0  # retain probes gated to the base model, bit for bit
    assert rec.passed and not rec.flagged and rec.put_in_force and rec.reasons == []
    assert rec.gate["auroc_forget_vs_retain"] > 0.9
    assert rec.model_fingerprint == before == base_model_fingerprint(candidate["model"])
    assert set(rec.artifacts) == {"detectors", "adapter"}
    assert "adapter/adapter_model.safetensors" in rec.artifacts["adapter"]["files"]
    assert rec.probes["forget"]["n"] == len(candidate["probes"]["forget"])
    assert "generated" not in rec.to_json()  # no generated text in a record
    doc = json.loads(rec.to_json())
    assert doc["request"] == {"name": "chemistry", "id": "r1"} and doc["kind"].startswith("serve-unlearn/")


@pytest.mark.real_model
@pytest.mark.slow
def test_a_candidate_that_forgets_nothing_is_refused_by_default_and_flagged_on_request(candidate):
    rec = _verify(candidate, "noop")
    assert rec.candidate["forget"]["accuracy"]["mean"] == 1.0
    assert not rec.passed and not rec.flagged and not rec.put_in_force
    assert any("max_forget_accuracy" in r for r in rec.reasons)
    flag = _verify(candidate, "noop", VerificationPolicy(max_new_tokens=8, on_shortfall="flag"))
    assert not flag.passed and flag.flagged and flag.put_in_force


@pytest.mark.real_model
@pytest.mark.slow
def test_probes_are_required(candidate):
    c = candidate
    with pytest.raises(EvalDataError, match="both non-empty"):
        verify_candidate(model=c["model"], tokenizer=c["tok"], detector_dir=c["detector"], adapter_dir=c["noop"],
                         probes={"forget": c["probes"]["forget"], "retain": []})


RECORD = {"kind": "serve-unlearn/verification-record/1", "passed": True, "probes": {"forget": {"n": 3}},
          "candidate": {"forget": {"accuracy": {"mean": 0.125}}}, "note": "caf\u00e9"}


def test_signed_record_verifies_and_any_changed_byte_fails(tmp_path, monkeypatch):
    signed = sign_record(RECORD, KEY)
    verify_record(signed, KEY)
    verify_record(json.loads(json.dumps(signed, indent=3)), KEY)  # formatting is not signed, content is
    with pytest.raises(EvidenceError, match="does not match"):
        verify_record(signed, b"another key")
    with pytest.raises(EvidenceError, match="not signed"):
        verify_record(RECORD, KEY)
    with pytest.raises(EvidenceError, match="not a serve-unlearn verification record"):
        verify_record({**signed, "kind": "x"}, KEY)
    path = tmp_path / "record.json"
    raw = json.dumps(signed, indent=2, ensure_ascii=False).encode()
    path.write_bytes(raw)
    monkeypatch.setenv("SERVE_UNLEARN_SIGNING_KEY", KEY.decode())
    assert verify_record_file(path)["passed"] is True
    significant = [i for i, b in enumerate(raw) if chr(b) not in " \n"]
    for i in significant[::3]:  # every third byte that is not formatting: one changed byte each time
        damaged = bytearray(raw)
        damaged[i] ^= 0x01
        path.write_bytes(bytes(damaged))
        with pytest.raises(EvidenceError):
            verify_record_file(path)
    monkeypatch.delenv("SERVE_UNLEARN_SIGNING_KEY")
    with pytest.raises(EvidenceError, match="SERVE_UNLEARN_SIGNING_KEY"):
        verify_record_file(path)
