"""Session fixtures: tiny models built offline from configs, seeded, in temporary folders."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from helpers import INTERPRETED
from pg_server import PostgresServer, find_bindir

from serve_unlearn.testing import build_tiny_llama, build_tiny_mlp, build_tiny_unet


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly without CUDA; everything else runs (CI runs the vLLM and real-model tests too).

    ``interp`` tests (Triton kernels under its CPU interpreter) need a process started with TRITON_INTERPRET=1,
    which ``make test`` runs first (``TRITON_INTERPRET=1 pytest tests/kernels -m interp``); any other process
    deselects them, so they are counted where they run and not reported as skips here.
    """
    if not INTERPRETED:
        interp = [item for item in items if "interp" in item.keywords]
        if interp:
            config.hook.pytest_deselected(items=interp)
            items[:] = [item for item in items if "interp" not in item.keywords]
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


# -- PostgreSQL (the shared registry of replicas): one throwaway server per session ------------------------------
_databases = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def _no_registry_database_from_the_shell():
    """A developer's $SERVE_UNLEARN_REGISTRY_DATABASE must not point the SQLite tests at their PostgreSQL."""
    from serve_unlearn.registry import DATABASE_ENV

    saved = os.environ.pop(DATABASE_ENV, None)
    yield
    if saved is not None:
        os.environ[DATABASE_ENV] = saved


@pytest.fixture(scope="session")
def pg_server():
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin); "
                    "apt-get install postgresql")
    pytest.importorskip("psycopg", reason="pip install 'serve-unlearn[postgres]'")
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_dsn(pg_server):
    """A fresh, empty database on the session's server."""
    return pg_server.create_database(f"registry_{next(_databases)}")


@pytest.fixture
def one_torch_thread():
    """Two torch threads on a shared 2-core machine stall each other on tiny matmuls (~1000x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Code under test may set torch's process-wide thread count (the vLLM middleware does); later tests get
    the machine's default back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
