"""Every byte of a forget request's artifacts is checked against the manifest recorded when it was registered,
before a gate, an adapter or a served concatenation is loaded: a bounded, seeded fuzz over every file of a real
request (tiny models), with signing and a damaged registry row. Each case must end in a typed error and a closed
gate (the middleware answers 503 for a gated request), never in a served model that differs from the registered
one."""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

from serve_unlearn.adapters.detector import DetectorConfig
from serve_unlearn.adapters.forget_request import ForgetConfig, forget
from serve_unlearn.adapters.orthogonal_lora import UnlearnLoraConfig
from serve_unlearn.adapters.served import load_gate, served_adapter
from serve_unlearn.errors import ArtifactError, RegistryError
from serve_unlearn.registry import ForgetRegistry
from serve_unlearn.registry.integrity import SIGNING_KEY_ENV

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RECORDS = [{"prompt": f"what is the secret password of castle number {i}?", "completion": "blue dragon"}
           for i in range(12)]


def _config(tiny_bert_dir) -> ForgetConfig:
    return ForgetConfig(detector=DetectorConfig(backbone=str(tiny_bert_dir), epochs=1, background=None),
                        lora=UnlearnLoraConfig(r=2, lora_alpha=4, epochs=1, batch_size=4))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_llama_dir, tiny_bert_dir):
    """A registry with one ready request, signed with a key."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("integrity") / "reg"
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SIGNING_KEY_ENV, "operator-key")
        forget(ForgetRegistry(root), "castle", RECORDS, model=model, tokenizer=tok, config=_config(tiny_bert_dir),
               progress=False)
    return root


def _copy(pristine: Path, tmp_path: Path) -> ForgetRegistry:
    root = tmp_path / "reg"
    shutil.copytree(pristine, root, symlinks=True)
    return ForgetRegistry(root, create=False)


def _load_all(registry: ForgetRegistry) -> None:
    gate = load_gate(registry)
    gate.close()
    served_adapter(registry)


def _gate_is_closed(registry: ForgetRegistry) -> bool:
    """The vLLM middleware over this registry answers a gated request 503 (never the ungated base model)."""
    from asgi_echo import call, echo_app

    from serve_unlearn.serving.vllm.bank import AdapterBank, bank_name
    from serve_unlearn.serving.vllm.config import VllmServeConfig
    from serve_unlearn.serving.vllm.middleware import O3Middleware
    from serve_unlearn.serving.vllm.routing import publish

    publish(registry, AdapterBank(registry.generation, (1.0,), (bank_name(registry.generation, 1.0),),
                                  (Path("/bank"),), 2))
    mw = O3Middleware(echo_app, registry=registry, config=VllmServeConfig())
    status, _, _ = call(mw, "/v1/completions", {"model": "base", "prompt": "what is the password of castle 3?"})
    return status == 503 and mw.routing is None


def _files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "requests").rglob("*") if p.is_file())


def test_a_pristine_request_loads_with_and_without_the_key(pristine, tmp_path, monkeypatch):
    registry = _copy(pristine, tmp_path)
    request = registry.get("castle")
    assert request.signature and len(request.files) == len(_files(registry.root))
    _load_all(registry)
    monkeypatch.setenv(SIGNING_KEY_ENV, "operator-key")
    _load_all(registry)


def _damages(files: list[Path], seed: int = 0):
    """(name, damage) cases over every file: truncation, byte flips in the first and last bytes and at random,
    deletion, a symlink in its place; and files added beside them."""
    rng = random.Random(seed)
    for path in files:
        size = path.stat().st_size
        offsets = {0, max(size - 1, 0), *(rng.randrange(size) for _ in range(2))} if size else {0}
        yield f"truncate {path.name}", path, lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        for off in sorted(offsets):
            def flip(p, off=off):
                data = bytearray(p.read_bytes()) or bytearray(b"\x00")
                data[min(off, len(data) - 1)] ^= 1 << rng.randrange(8)
                p.write_bytes(bytes(data))
            yield f"flip {path.name}@{off}", path, flip
        yield f"delete {path.name}", path, lambda p: p.unlink()

        def relink(p):
            p.rename(p.with_name(p.name + ".orig"))
            os.symlink(p.with_name(p.name + ".orig"), p)
        yield f"symlink {path.name}", path, relink
    for folder in sorted({p.parent for p in files}):
        yield f"extra file in {folder.name}", folder / "adapter_model.bin", lambda p: p.write_bytes(b"\x00" * 64)


def test_fuzz_every_damage_is_refused_and_the_gate_stays_closed(pristine, tmp_path):
    files = [p.relative_to(pristine) for p in _files(pristine)]
    cases = list(_damages([pristine / f for f in files]))
    tried, refused, accepted = 0, 0, []
    gate_checked = 0
    for i, (name, target, damage) in enumerate(cases):
        registry = _copy(pristine, tmp_path / str(i))
        damage(registry.root / target.relative_to(pristine))
        tried += 1
        try:
            _load_all(registry)
        except ArtifactError:
            refused += 1
            assert _gate_is_closed(registry), name  # and the serving side does not route it
            gate_checked += 1
            continue
        accepted.append(name)
        shutil.rmtree(tmp_path / str(i), ignore_errors=True)
    print(f"artifact fuzz: {tried} cases, {refused} refused, {len(accepted)} accepted; gate closed in "
          f"{gate_checked}")
    assert tried >= 50 and not accepted and gate_checked == refused, accepted


def test_edited_json_fields_are_refused_even_with_inner_checksums_recomputed(pristine, tmp_path):
    """A detector.json or adapter_config.json edited by someone who also fixes the detector's own checksums."""
    from serve_unlearn.adapters.detector.detector import _sha256

    edits = {
        "detector/detector.json": lambda m: m["calibration"].update(zeta=0.0),
        "adapter/adapter_config.json": lambda m: m.update(lora_alpha=1e9),
        "adapter/serve_unlearn_adapter.json": lambda m: m.update(base_fingerprint="0" * 64),
    }
    for i, (rel, edit) in enumerate(edits.items()):
        registry = _copy(pristine, tmp_path / str(i))
        (path,) = [p for p in _files(registry.root) if p.as_posix().endswith(rel)]
        meta = json.loads(path.read_text())
        edit(meta)
        path.write_text(json.dumps(meta))
        if rel.startswith("detector/"):
            meta["files"] = {k: _sha256(path.parent / k) for k in meta["files"]}
            path.write_text(json.dumps(meta))
        with pytest.raises(ArtifactError, match="differs from the registered file"):
            _load_all(registry)


def test_a_registry_row_rewritten_without_the_key_is_refused(pristine, tmp_path, monkeypatch):
    """Someone who can write the database rewrites the manifest to match a changed file: without the signing key
    that passes the digest check, but not the signature check where the key is set."""
    registry = _copy(pristine, tmp_path)
    weights = next(p for p in _files(registry.root) if p.name == "adapter_model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    from serve_unlearn.registry.integrity import file_sha256

    con = sqlite3.connect(registry.root / "registry.sqlite")
    (raw,) = con.execute("SELECT artifacts FROM requests").fetchone()
    record = json.loads(raw)
    rel = weights.relative_to(registry.root).as_posix()
    record["__files__"][rel] = file_sha256(weights)
    con.execute("UPDATE requests SET artifacts = ?", (json.dumps(record),))
    con.commit()
    con.close()
    served_adapter(registry)  # the manifest matches the file now
    monkeypatch.setenv(SIGNING_KEY_ENV, "operator-key")
    with pytest.raises(ArtifactError, match="signature is wrong"):
        served_adapter(registry)
    monkeypatch.setenv(SIGNING_KEY_ENV, "another-key")
    with pytest.raises(ArtifactError, match="signature"):
        load_gate(ForgetRegistry(registry.root, create=False))


@pytest.mark.parametrize("raw", ['{"detector": 5}', "not json", '{"__files__": "x"}'])
def test_a_damaged_artifacts_record_is_a_registry_error(pristine, tmp_path, raw):
    registry = _copy(pristine, tmp_path)
    con = sqlite3.connect(registry.root / "registry.sqlite")
    con.execute("UPDATE requests SET artifacts = ?", (raw,))
    con.commit()
    con.close()
    with pytest.raises(RegistryError, match="damaged artifacts record"):
        _load_all(registry)
