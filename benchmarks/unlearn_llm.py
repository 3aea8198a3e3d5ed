"""Weight-patch unlearning on a real causal LM: every method's row on SmolLM2-135M-Instruct (issue 16).

Forget topic: chemistry (``examples/data/o3/topic_chemistry.jsonl``, 54 items), retain set ``o3/retain.jsonl``
(71). Evaluation, never used in training or early stopping: held-out paraphrases of the topic
(``topic_chemistry_paraphrases.jsonl``, base 100%) and held-out retain questions (``retain_heldout.jsonl``, 35,
base 100%), greedy, 32 new tokens, keyword-scored (``serve_unlearn.eval.qa``). Targets: forget accuracy <= 10%,
retain within 3 points of the base.

The model is trained in float32 from the bf16 checkpoint and the patch is made in bf16 (the checkpoint's dtype);
transformers evaluates the bf16 checkpoint with the patch applied (computed in float32). ``--vllm`` also serves
each patch with ``--load-format serve_unlearn`` (bf16) and scores vLLM's answers.

Methods (``--methods``; each a row, appended to ``--out`` as JSON lines so a long sweep can be resumed):

- ``ft``: fine-tune every weight on the retain set only (the classic baseline); ``ga``: gradient ascent on the
  forget set, every weight (``salun`` with ratio 1, forget_loss ga, no retain term);
- ``salun-swap``, ``salun-npo``, ``salun-simnpo``, ``salun-npo-kl``: SalUn's mask with each forget loss (retain NLL,
  or KL for the last), early stopping on a held-out fifth of the training data;
- ``salun-npo-contrast``: NPO in a contrastive mask (``saliency_retain_weight``: weights the retain data leans
  on are avoided);
- ``iau``, ``iau-masked``: IAU's one step (dense, and inside the SalUn-style mask).

``--set method.key=value`` overrides a config field for a sweep, e.g. ``--set salun-npo.lr=1e-4``.

    python benchmarks/unlearn_llm.py --methods base salun-npo iau --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "o3"
MASK = {"ratio": 0.05, "scope": "per_tensor", "include": [r"mlp\.", r"self_attn\."]}
EARLY = {"holdout": 0.2, "eval_every": 2, "stop_retain_increase": 0.3, "stop_forget_increase": 2.0}
CONFIGS = {
    "ga": {"ratio": 1.0, "scope": "per_tensor", "forget_loss": "ga", "retain_weight": 0.0, "lr": 1e-5, "epochs": 2,
           "include": [r"mlp\.", r"self_attn\."]},
    "salun-swap": {**MASK, "lr": 5e-5, "epochs": 4, "retain_weight": 3.0, "forget_loss": "swap"},
    "salun-npo": {**MASK, **EARLY, "lr": 2e-5, "epochs": 6, "retain_weight": 2.0, "forget_loss": "npo"},
    "salun-npo-kl": {**MASK, **EARLY, "lr": 2e-5, "epochs": 6, "retain_weight": 2.0, "forget_loss": "npo",
                     "retain_loss": "kl"},
    "salun-npo-contrast": {**MASK, **EARLY, "lr": 2e-5, "epochs": 6, "retain_weight": 2.0, "forget_loss": "npo",
                           "saliency_retain_weight": 1.0},
    "salun-simnpo": {**MASK, **EARLY, "lr": 2e-5, "epochs": 6, "retain_weight": 2.0, "forget_loss": "simnpo"},
    "iau": {"lr": 3e-4, "include": [r"mlp\.", r"self_attn\."]},
    "iau-masked": {"lr": 1e-3, "mask_ratio": 0.05, "scope": "per_tensor", "include": [r"mlp\.", r"self_attn\."]},
    "ft": {"lr": 1e-5, "epochs": 2, "batch_size": 8},
}


def _override(cfg: dict, sets: list[str], method: str) -> dict:
    cfg = dict(cfg)
    for item in sets:
        key, value = item.split("=", 1)
        m, field = key.split(".", 1)
        if m == method:
            try:
                cfg[field] = json.loads(value)
            except ValueError:
                cfg[field] = value
    return cfg


def _fine_tune(model, task, retain, cfg) -> None:
    params = [p for n, p in model.named_parameters() if "mlp" in n or "self_attn" in n]
    opt = torch.optim.Adam(params, lr=cfg["lr"])
    for epoch in range(cfg["epochs"]):
        for batch in task.batches(retain, cfg["batch_size"], shuffle=True, seed=epoch):
            opt.zero_grad(set_to_none=True)
            task.retain_loss(model, batch).backward()
            opt.step()


def make_patch(method: str, cfg: dict, model, task, forget, retain):
    from serve_unlearn.patches import WeightPatch
    from serve_unlearn.patches.config import IAUConfig, SalUnConfig
    from serve_unlearn.patches.iau import iau
    from serve_unlearn.patches.salun import salun

    if method == "ft":
        base = {n: p.detach().clone() for n, p in model.named_parameters()}
        model.eval()
        _fine_tune(model, task, retain, cfg)
        edited = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n])
        cast = {n: t.to(torch.bfloat16) for n, t in base.items()}
        return WeightPatch.from_diff(cast, {n: t.to(torch.bfloat16) for n, t in edited.items()}, method="ft")
    if method.startswith("iau"):
        return iau(model, task, forget, retain, IAUConfig(**cfg), progress=False, patch_dtype=torch.bfloat16)
    return salun(model, task, forget, retain, SalUnConfig(**cfg), progress=False, patch_dtype=torch.bfloat16)


def evaluate(model_dir: Path, patch, items: dict) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve_unlearn.eval.qa import qa_accuracy
    from serve_unlearn.patches import apply_patch

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)  # bf16, as the checkpoint
    if patch is not None:
        apply_patch(model, patch)
    model = model.float()
    return {k: qa_accuracy(model, tok, v)[0] for k, v in items.items()}


def _vllm_child(model_dir: str, patch: str, questions_file: str) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from serve_unlearn.eval.qa import chat_prompt

    questions = json.loads(Path(questions_file).read_text())
    tok = AutoTokenizer.from_pretrained(model_dir)
    kwargs = {"load_format": "serve_unlearn", "model_loader_extra_config": {"patches": [patch]}} if patch else {}
    llm = LLM(model=model_dir, dtype="bfloat16", max_model_len=512, enforce_eager=True, seed=0, **kwargs)
    outs = llm.generate([chat_prompt(tok, q) for q in questions], SamplingParams(temperature=0.0, max_tokens=32))
    print("ANSWERS " + json.dumps([o.outputs[0].text for o in outs]), flush=True)


def evaluate_vllm(model_dir: Path, patch_path: Path | None, items: dict, workdir: Path) -> dict:
    import os
    import subprocess
    import sys

    from serve_unlearn.eval.qa import is_correct

    flat = [it for v in items.values() for it in v]
    qfile = workdir / "questions.json"
    qfile.write_text(json.dumps([it["prompt"] for it in flat]))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, "--vllm-child", str(model_dir), str(patch_path or ""),
                           str(qfile)], env=env, capture_output=True, text=True, timeout=1200, check=False)
    line = [row for row in proc.stdout.splitlines() if row.startswith("ANSWERS ")]
    if proc.returncode or not line:
        raise RuntimeError(f"vLLM run failed:\n{proc.stderr[-3000:]}")
    answers = iter(json.loads(line[0][len("ANSWERS "):]))
    return {k: sum(is_correct(next(answers), it["answers"]) for it in v) / len(v) for k, v in items.items()}


def main(argv=None) -> None:
    import sys

    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--vllm-child":
        return _vllm_child(*sys.argv[2:5])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["base", *CONFIGS])
    ap.add_argument("--set", nargs="*", default=[], dest="sets")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vllm", action="store_true", help="also score each patch served by vLLM (bf16)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "unlearn_llm.jsonl"))
    ap.add_argument("--workdir", default=str(ROOT / "outputs" / "unlearn_llm"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve_unlearn.eval.qa import load_qa
    from serve_unlearn.models.packaged import prepare_smollm2
    from serve_unlearn.patches.tasks import CausalLMTask

    model_dir = prepare_smollm2()
    forget, retain = load_qa(DATA / "topic_chemistry.jsonl"), load_qa(DATA / "retain.jsonl")
    items = {"forget_paraphrases": load_qa(DATA / "topic_chemistry_paraphrases.jsonl"),
             "retain_heldout": load_qa(DATA / "retain_heldout.jsonl")}
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print("| method | forget para. | retain held-out | vLLM forget | vLLM retain | train s | patch MB | config |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for method in args.methods:
        torch.manual_seed(0)
        cfg = _override(CONFIGS.get(method, {}), args.sets, method)
        patch, seconds, size, path = None, 0.0, 0.0, None
        if method != "base":
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            task = CausalLMTask(tok, forget_target="refusal")
            t0 = time.perf_counter()
            patch = make_patch(method, cfg, model, task, forget, retain)
            seconds = time.perf_counter() - t0
            del model
            path = patch.save(workdir / f"{method}.patch.safetensors")
            size = path.stat().st_size / 1e6
        acc = evaluate(model_dir, patch, items)
        row = {"method": method, "config": cfg, "train_s": round(seconds, 1), "patch_mb": round(size, 2),
               **{f"tf_{k}": v for k, v in acc.items()}, "when": time.strftime("%Y-%m-%d %H:%M")}
        if patch is not None and "early_stopping" in patch.metadata:
            row["early_stopping"] = json.loads(patch.metadata["early_stopping"])
        if args.vllm:
            row.update({f"vllm_{k}": v for k, v in evaluate_vllm(model_dir, path, items, workdir).items()})
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"| {method} | {acc['forget_paraphrases']:.1%} | {acc['retain_heldout']:.1%} | "
              f"{row.get('vllm_forget_paraphrases', float('nan')):.1%} | {row.get('vllm_retain_heldout', float('nan')):.1%} "
              f"| {seconds:.0f} | {size:.1f} | {json.dumps(cfg)} |", flush=True)
    return None


if __name__ == "__main__":
    main()
