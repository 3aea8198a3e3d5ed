"""Run by tests in a subprocess (vLLM starts its engine with 'spawn', so it needs a __main__ guard).

usage: python vllm_generate.py MODEL [PATCH ...]   -> prints 'RESULT <json token ids per prompt>'
"""

import json
import sys

PROMPTS = ["The secret password of the castle is", "Water boils at", "Once upon a time"]


def main() -> None:
    from vllm import LLM, SamplingParams

    model, patches = sys.argv[1], sys.argv[2:]
    kwargs = {}
    if patches:
        kwargs = {"load_format": "serve_unlearn", "model_loader_extra_config": {"patches": patches}}
    llm = LLM(model=model, dtype="float32", max_model_len=128, enforce_eager=True, seed=0, **kwargs)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)


if __name__ == "__main__":
    main()
