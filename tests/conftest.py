"""Session fixtures: tiny models built offline from configs, seeded, in temporary folders."""

from __future__ import annotations

import os

import pytest
import torch

from serve_unlearn.testing import build_tiny_llama, build_tiny_mlp, build_tiny_unet


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly without CUDA; everything else runs (CI runs the vLLM and real-model tests too)."""
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer fp32 Llama (head_dim 64, vLLM-CPU compatible) with a local BPE tokenizer and chat template."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama_bf16_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-bf16"), dtype=torch.bfloat16)


@pytest.fixture
def tiny_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture
def tiny_mlp():
    return build_tiny_mlp(seed=0, in_features=16, hidden=32, num_classes=4)


@pytest.fixture
def tiny_unet():
    return build_tiny_unet(seed=0)


@pytest.fixture
def toy_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 16, generator=g)
    y = torch.randint(0, 4, (120,), generator=g)
    return (x[:20], y[:20]), (x[20:], y[20:])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer BERT encoder (no MLM head, like MiniLM) with a local WordPiece tokenizer."""
    from serve_unlearn.testing.tiny_models import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
