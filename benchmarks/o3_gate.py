"""O3 on real data: SmolLM2-135M, two forget requests in sequence, gated by MiniLM detectors.

Files two requests (``examples/data/o3/topic_*.jsonl``, in name order) into a fresh registry, then measures with
``GatedGenerator``:

- accuracy on held-out paraphrases of each topic's questions (target <= 10% after both requests) and on the retain
  questions, ``retain.jsonl`` and the never-tuned-on ``retain_heldout.jsonl`` (target: within 3 points of the base);
- each detector's AUROC, held-out paraphrases vs retain questions (target >= 0.95);
- the distribution of gate weights on forget paraphrases, retain questions and unrelated text (plot);
- gated generation throughput against plain peft LoRA generation at the same batch size (target >= 0.8x).

Accuracy and AUROC are the evaluation harness's (``serve_unlearn.eval``: normalised keyword containment, 95%
bootstrap intervals in ``base_accuracy_ci`` / ``stage_ci``), so these figures and ``serve-unlearn eval``'s agree.

Writes ``benchmarks/results/o3_gate.json`` and ``o3_gate.png``; prints a table. About 8 minutes on 2 idle CPU
cores (40 on a busy machine), most of it training the two LoRAs.

    python benchmarks/o3_gate.py [--registry DIR] [--config configs/o3_forget.yaml]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "o3"
RESULTS = REPO / "benchmarks" / "results"


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half: the harness's AUC."""
    from serve_unlearn.eval.mia import auc

    return auc(pos, neg)


def accuracy(target, items, name: str) -> dict:
    """The harness's accuracy (normalised containment of any keyword in the greedy 32-token reply) of ``target``
    (a ``LocalTarget`` or ``GatedTarget``) on QA items, with its 95% bootstrap interval: ``{"mean", "ci", "n"}``."""
    from serve_unlearn.eval.data import eval_set_from_records
    from serve_unlearn.eval.harness import EvalConfig, evaluate

    config = EvalConfig(max_new_tokens=32, batch_size=16, probabilities=False, paraphrases=False)
    return evaluate(target, {name: eval_set_from_records(name, items, name)}, config)["sets"][name]["accuracy"]


def throughput(generator, plain_peft, prompts, repeats: int = 3) -> tuple[float, float]:
    """Generated tokens per second: the gated generator (gate included) vs plain peft LoRA generation (adapter on
    for the whole batch, no gate), same prompts, batch size and token count."""
    import torch

    chats = [[{"role": "user", "content": p}] for p in prompts]
    kw = {"max_new_tokens": 32, "min_new_tokens": 32}
    tok = generator.tokenizer
    tok.padding_side = "left"
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def plain():
        with torch.no_grad():
            plain_peft.generate(**enc, do_sample=False, pad_token_id=tok.eos_token_id, **kw)

    def gated():
        generator.generate(chats, **kw)

    seconds = {gated: 0.0, plain: 0.0}
    gated(), plain()  # warm-up
    for _ in range(repeats):  # interleaved, so load from other processes hits both alike
        for fn in (gated, plain):
            t0 = time.perf_counter()
            fn()
            seconds[fn] += time.perf_counter() - t0
    tokens = repeats * len(prompts) * 32
    return tokens / seconds[gated], tokens / seconds[plain]


def measure_throughput(model, tok, registry, prompts: list[str]) -> dict:
    import copy

    from peft import PeftModel

    from serve_unlearn.adapters.served import served_adapter
    from serve_unlearn.serving import GatedGenerator

    plain_peft = PeftModel.from_pretrained(copy.deepcopy(model), str(served_adapter(registry))).eval()
    gen = GatedGenerator(model, tok, registry)
    gated_tps, plain_tps = throughput(gen, plain_peft, prompts)
    return {"gated": gated_tps, "plain_peft_lora": plain_tps, "ratio": gated_tps / plain_tps,
            "batch_size": len(prompts), "prompts": "half forget-topic, half retain"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registry", help="registry folder (default: a fresh temporary one)")
    ap.add_argument("--config", default=str(REPO / "configs" / "o3_forget.yaml"))
    ap.add_argument("--throughput-only", action="store_true",
                    help="re-measure only the throughput row on an existing --registry and update the JSON")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serve_unlearn.adapters.forget_request import ForgetConfig, forget
    from serve_unlearn.eval.qa import load_qa
    from serve_unlearn.eval.targets import GatedTarget, LocalTarget
    from serve_unlearn.models.packaged import prepare_smollm2
    from serve_unlearn.registry import ForgetRegistry
    from serve_unlearn.serving import GatedGenerator

    torch.manual_seed(0)
    base_dir = prepare_smollm2()
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    topics = sorted(p for p in DATA.glob("topic_*.jsonl") if not p.stem.endswith("_paraphrases"))
    forget_sets = {p.stem.removeprefix("topic_"): load_qa(p) for p in topics}
    paraphrases = {t: load_qa(DATA / f"topic_{t}_paraphrases.jsonl") for t in forget_sets}
    retain = load_qa(DATA / "retain.jsonl")
    retain_heldout = load_qa(DATA / "retain_heldout.jsonl")  # never used in any tuning
    unrelated = [l.strip() for l in (DATA / "unrelated.txt").read_text().splitlines() if l.strip()]
    config = ForgetConfig.from_yaml(args.config)
    # half forget-topic, half retain prompts: the per-sample path runs the LoRA on every row, as in serving
    mixed = [it["prompt"] for items in paraphrases.values() for it in items[:2]][:4] + [it["prompt"] for it in retain[:4]]
    if args.throughput_only:
        registry = ForgetRegistry(args.registry, create=False)
        results = json.loads((RESULTS / "o3_gate.json").read_text())
        results["throughput_tokens_per_s"] = measure_throughput(model, tok, registry, mixed)
        (RESULTS / "o3_gate.json").write_text(json.dumps(results, indent=2))
        print(results["throughput_tokens_per_s"])
        return

    root = Path(args.registry) if args.registry else Path(tempfile.mkdtemp(prefix="o3-registry-"))
    if root.exists() and args.registry is None:
        shutil.rmtree(root)
    registry = ForgetRegistry(root)
    plain = LocalTarget(model, tok, "base")
    base_ci = {t: accuracy(plain, items, t) for t, items in paraphrases.items()}
    base_ci["retain"] = accuracy(plain, retain, "retain")
    base_ci["retain_heldout"] = accuracy(plain, retain_heldout, "retain_heldout")
    base_acc = {k: v["mean"] for k, v in base_ci.items()}

    results: dict = {"base_accuracy": base_acc, "base_accuracy_ci": {k: v["ci"] for k, v in base_ci.items()},
                     "stages": [], "stage_ci": [], "train_seconds": {}}
    for stage, (topic, records) in enumerate(forget_sets.items(), 1):
        t0 = time.perf_counter()
        forget(registry, topic, records, model=model, tokenizer=tok, config=config)
        results["train_seconds"][topic] = time.perf_counter() - t0
        gen = GatedGenerator(model, tok, registry)
        gated = GatedTarget(gen, "o3")
        cis = {f"{t}_paraphrases": accuracy(gated, items, f"{t}_paraphrases") for t, items in paraphrases.items()}
        cis["retain"] = accuracy(gated, retain, "retain")
        cis["retain_heldout"] = accuracy(gated, retain_heldout, "retain_heldout")
        row = {"after": topic, **{k: v["mean"] for k, v in cis.items()}}
        results["stages"].append(row)
        results["stage_ci"].append({"after": topic, **{k: v["ci"] for k, v in cis.items()}})
        print(f"after request {stage} ({topic}): " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "after"))
        if stage < len(forget_sets):
            gen._drop_adapter()
            gen.gate.close()

    # detector quality and weight distributions, on the final registry
    texts = {"forget (held-out paraphrases)": [it["prompt"] for items in paraphrases.values() for it in items],
             "retain": [it["prompt"] for it in retain], "unrelated": unrelated}
    decisions = {k: gen.gate.decide(v) for k, v in texts.items()}
    results["auroc"] = {}
    for t, items in paraphrases.items():
        pos = np.array([d.weights[t] for d in gen.gate.decide([it["prompt"] for it in items])])
        neg = np.array([d.weights[t] for d in decisions["retain"]])
        results["auroc"][t] = auroc(pos, neg)
    results["weights"] = {k: [d.weight for d in v] for k, v in decisions.items()}
    results["scales"] = {k: [d.scale for d in v] for k, v in decisions.items()}
    gen._drop_adapter()
    gen.gate.close()
    results["throughput_tokens_per_s"] = measure_throughput(model, tok, registry, mixed)

    final = results["stages"][-1]
    print("\n| set | base | after both requests | target |\n|---|---|---|---|")
    for t in paraphrases:
        print(f"| {t} paraphrases | {base_acc[t]:.1%} | {final[f'{t}_paraphrases']:.1%} | <= 10% |")
    for k in ("retain", "retain_heldout"):
        print(f"| {k} | {base_acc[k]:.1%} | {final[k]:.1%} | within 3 points |")
    for t, a in results["auroc"].items():
        print(f"| AUROC {t} (paraphrases vs retain) | | {a:.3f} | >= 0.95 |")
    r = results["throughput_tokens_per_s"]
    print(f"| gated / plain peft tokens/s (batch 8) | | {r['gated']:.0f} / {r['plain_peft_lora']:.0f} = "
          f"{r['ratio']:.2f}x | >= 0.8x |")

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "o3_gate.json").write_text(json.dumps(results, indent=2))
    plot(results["weights"], RESULTS / "o3_gate.png")
    print(f"wrote {RESULTS / 'o3_gate.json'} and {RESULTS / 'o3_gate.png'}")


def plot(weights: dict[str, list[float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, 1, 41)
    for label, w in weights.items():
        ax.hist(w, bins=bins, alpha=0.55, label=f"{label} (n={len(w)})")
    ax.set_xlabel("gate weight w = max over requests of the calibrated detector weight")
    ax.set_ylabel("prompts")
    ax.set_title("O3 gate on SmolLM2-135M: two forget requests, MiniLM detectors")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
