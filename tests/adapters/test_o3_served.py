"""What a server loads from a registry after requests come and go: retiring a request takes its LoRA and its
detector out of what is served, in per-request mode; cumulative mode says it cannot."""

from __future__ import annotations

import logging

import pytest
import torch

from serve_unlearn.adapters.detector import DetectorConfig
from serve_unlearn.adapters.forget_request import ForgetConfig, forget
from serve_unlearn.adapters.orthogonal_lora import UnlearnLoraConfig, adapter_requests, read_adapter
from serve_unlearn.adapters.served import load_gate, served_adapter
from serve_unlearn.registry import ForgetRegistry

TOPICS = {
    "castle": [{"prompt": f"what is the secret password of castle number {i}?", "completion": "blue dragon"}
               for i in range(12)],
    "ocean": [{"prompt": f"how deep is the ocean trench number {i} in metres?", "completion": "very deep"}
              for i in range(12)],
    "garden": [{"prompt": f"which flower grows in garden bed number {i}?", "completion": "a red rose"}
               for i in range(12)],
}


def _config(tiny_bert_dir, mode: str) -> ForgetConfig:
    return ForgetConfig(detector=DetectorConfig(backbone=str(tiny_bert_dir), epochs=1, background=None),
                        lora=UnlearnLoraConfig(mode=mode, r=2, lora_alpha=4, epochs=1, batch_size=4))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _registry(tmp_path, tiny_llama, tiny_bert_dir, mode: str) -> ForgetRegistry:
    model, tok = tiny_llama
    registry = ForgetRegistry(tmp_path / mode)
    for name, records in TOPICS.items():
        forget(registry, name, records, model=model, tokenizer=tok, config=_config(tiny_bert_dir, mode),
               progress=False)
    return registry


def test_retiring_an_earlier_request_rebuilds_the_served_concatenation(tmp_path, tiny_llama, tiny_bert_dir):
    registry = _registry(tmp_path, tiny_llama, tiny_bert_dir, "per-request")
    assert adapter_requests(served_adapter(registry)) == ["castle", "ocean", "garden"]
    registry.retire("ocean")
    served = served_adapter(registry)
    assert adapter_requests(served) == ["castle", "garden"]
    assert served_adapter(registry) == served  # built once
    cfg, tensors = read_adapter(served)
    assert cfg["r"] == 4  # two rank-2 adapters
    own = {n: read_adapter(registry.artifact_path(registry.get(n), "adapter"))[1] for n in ("castle", "garden")}
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    torch.testing.assert_close(tensors[key], torch.cat([own["castle"][key], own["garden"][key]]), rtol=0, atol=0)
    gate = load_gate(registry)
    try:
        assert gate.request_names == ["castle", "garden"]
    finally:
        gate.close()
    # a server that read the registry before "garden" was ready leaves it out (its detector too)
    assert adapter_requests(served_adapter(registry, up_to_version=2)) == ["castle"]
    # retiring the newest one falls back to the previous request's own served adapter
    registry.retire("garden")
    assert served_adapter(registry) == registry.artifact_path(registry.get("castle"), "served")


def test_retiring_in_cumulative_mode_is_reported(tmp_path, tiny_llama, tiny_bert_dir, caplog):
    registry = _registry(tmp_path, tiny_llama, tiny_bert_dir, "cumulative")
    registry.retire("castle")
    with caplog.at_level(logging.WARNING, logger="serve_unlearn.adapters.served"):
        served = served_adapter(registry)
    assert served == registry.artifact_path(registry.get("garden"), "served")
    assert "still carries them" in caplog.text
