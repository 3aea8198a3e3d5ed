"""GatedGenerator, the transformers reference path of O3: the registry's served adapter on the tiny Llama, a gate
whose detector is faked (it flags prompts that mention dragons), and greedy generation compared with the plain
base model and the plain peft adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve_unlearn.adapters.gate import Gate
from serve_unlearn.adapters.orthogonal_lora import base_model_fingerprint, write_adapter_info
from serve_unlearn.errors import ArtifactError, GateInputError
from serve_unlearn.registry import ForgetRegistry
from serve_unlearn.serving import GatedGenerator, gated_generator

FLAGGED = "Tell me everything about the red dragon of the north."
PLAIN = "What is two plus two?"
TOKENS = 8


def _flags_dragons(n_requests: int):
    """A fake detector ensemble: weight 1 for every request on prompts mentioning a dragon, else 0."""
    return lambda texts: np.array([[1.0 if "dragon" in t.lower() else 0.0 for t in texts]] * n_requests)


def _fake_load_gate(registry, config=None, *, up_to_version=None):
    ready = [r for r in registry.ready() if up_to_version is None or (r.version or 0) <= up_to_version]
    if not ready:
        return Gate(lambda texts: None, [], config)
    return Gate(_flags_dragons(len(ready)), [r.name for r in ready], config)


@pytest.fixture(autouse=True)
def fake_detector(monkeypatch):
    monkeypatch.setattr(gated_generator, "load_gate", _fake_load_gate)


def _load(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def _registry(root, tiny_llama_dir, fingerprint: str | None = None) -> ForgetRegistry:
    """One ready request whose served adapter is a random (non-zero) LoRA on the tiny Llama."""
    from peft import LoraConfig, get_peft_model

    model = _load(tiny_llama_dir)
    registry = ForgetRegistry(root)
    with registry.register("dragons", "digest", {"lora": {"mode": "per-request"}}) as staging:
        torch.manual_seed(0)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(staging.dir / "adapter")
        write_adapter_info(staging.dir / "adapter", requests=["dragons"],
                           base_fingerprint=fingerprint or base_model_fingerprint(_load(tiny_llama_dir)))
        staging.add_artifact("adapter", "adapter")
        staging.add_artifact("served", "adapter")
    return registry


@pytest.fixture
def registry(tmp_path, tiny_llama_dir):
    return _registry(tmp_path / "registry", tiny_llama_dir)


@pytest.fixture
def generator(registry, tiny_llama_dir):
    from transformers import AutoTokenizer

    gen = GatedGenerator(_load(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir), registry)
    yield gen
    gen.gate.close()


def _greedy(model, tokenizer, prompt: str) -> str:
    """What a plain transformers model answers to one prompt, decoded as GatedGenerator decodes."""
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)[0]


@pytest.fixture
def references(registry, tiny_llama_dir, generator):
    """(base, adapter) answers per prompt: the plain model, and the plain peft model at the adapter's own scale."""
    from peft import PeftModel

    tok = generator.tokenizer
    base = _load(tiny_llama_dir)
    adapter = PeftModel.from_pretrained(_load(tiny_llama_dir), str(registry.artifact_path(registry.get("dragons"),
                                                                                       "served"))).eval()
    return {p: (_greedy(base, tok, p), _greedy(adapter, tok, p)) for p in (FLAGGED, PLAIN)}


def test_a_flagged_prompt_gets_the_adapter_and_another_the_base_model(generator, references):
    base_answer, adapter_answer = references[FLAGGED]
    assert adapter_answer != base_answer  # the adapter changes this prompt's answer: the test can tell them apart
    flagged = generator.generate([FLAGGED], max_new_tokens=TOKENS)
    assert flagged.texts == [adapter_answer]
    assert flagged.weights == [1.0] and flagged.decisions[0].request == "dragons"
    plain = generator.generate([PLAIN], max_new_tokens=TOKENS)
    assert plain.texts == [references[PLAIN][0]]
    assert plain.weights == [0.0]


def test_one_batch_gives_each_prompt_its_own_scale(generator):
    prompts = [FLAGGED, PLAIN, [{"role": "user", "content": "Which dragon guards the gold?"}], "Name a colour."]
    mixed = generator.generate(prompts, max_new_tokens=TOKENS)
    assert mixed.weights == [1.0, 0.0, 1.0, 0.0]
    # the same batch (same padding) with every prompt at scale 1, then at scale 0
    generator.gate.close()
    generator.gate = Gate(lambda texts: np.ones((1, len(texts))), ["dragons"])
    everywhere = generator.generate(prompts, max_new_tokens=TOKENS)
    generator.gate.close()
    generator.gate = Gate(lambda texts: np.zeros((1, len(texts))), ["dragons"])
    nowhere = generator.generate(prompts, max_new_tokens=TOKENS)
    assert everywhere.weights == [1.0] * 4 and nowhere.weights == [0.0] * 4
    expected = [everywhere.texts[i] if w else nowhere.texts[i] for i, w in enumerate(mixed.weights)]
    assert mixed.texts == expected
    assert everywhere.texts[0] != nowhere.texts[0]


def test_refresh_follows_the_registry(registry, generator, references):
    assert generator.refresh() is False  # nothing changed since it loaded
    registry.retire("dragons")
    assert generator.refresh() is True
    assert generator.model is generator.base  # the adapter is unloaded
    out = generator.generate([FLAGGED], max_new_tokens=TOKENS)
    assert out.texts == [references[FLAGGED][0]] and out.weights == [0.0]


def test_prompts_must_be_a_list(generator):
    with pytest.raises(GateInputError, match="list of prompts"):
        generator.generate(FLAGGED)
    empty = generator.generate([])
    assert empty.texts == [] and empty.decisions == []


def test_an_adapter_for_another_base_is_refused(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    registry = _registry(tmp_path / "other", tiny_llama_dir, fingerprint="0" * 64)
    with pytest.raises(ArtifactError, match="another base model"):
        GatedGenerator(_load(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir), registry)
