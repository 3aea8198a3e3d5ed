"""O3 gate routing on real data: which prompts the gate sends to an unlearning adapter, with and without a system
prompt.

Trains only the *detectors* of the two forget requests of ``examples/data/o3`` (one per ``topic_*.jsonl``, on all
of its prompts, as ``forget_request.forget`` does; no unlearning LoRA, no SmolLM2), with the ``detector:`` section
of ``configs/o3_forget.yaml`` and ``lora_layers`` from ``--lora-layers``. The gate over them is built as
``served.load_gate`` builds it (``Gate(DetectorEnsemble(detectors).weights, names, config)``) with the ``gate:``
section of ``configs/vllm.yaml`` (the only config file that has one; its values are also ``GateConfig()``'s
defaults: ramp 0.3 -> 0.6, window_chars 256, cache_size 4096).

Measured per ``--lora-layers`` variant, for every prompt as a bare user message and behind each system prompt
(``SYSTEM_PROMPTS``: the one-line "helpful assistant", a three-sentence customer-support prompt, and, for
information only, a science-tutor prompt that is close to one forget topic):

- per topic AUROC: that topic's held-out paraphrases vs ``retain.jsonl``, on the request's own weight
  (``decision.weights[topic]``; target >= 0.95);
- the share of paraphrases routed to an adapter (``decision.scale > 0``; and to their own request's), and the share
  of ``retain.jsonl``, ``retain_heldout.jsonl`` and ``unrelated.txt`` prompts routed to an adapter (targets: as low
  as possible, and not higher with a system prompt than without);
- each system prompt's own weights (the gate takes the max over a prompt's windows, so a system prompt whose
  weight stays at or below the policy's ``low`` changes no routing at all).

Writes ``benchmarks/results/o3_gate_routing.json`` and prints tables. A few minutes on 2 CPU cores.

    python benchmarks/o3_gate_routing.py [--lora-layers 1,0] [--config configs/o3_forget.yaml]
                                         [--gate-config configs/vllm.yaml] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "o3"
RESULTS = REPO / "benchmarks" / "results"

SYSTEM_PROMPTS = {
    "none": None,
    "helpful": "You are a helpful assistant.",
    "support": ("You are a friendly customer-support assistant for Acme Home, an online store that sells furniture, "
                "kitchenware and home electronics. Answer questions about orders, deliveries, returns and warranties "
                "politely and in a few sentences. If you cannot help, apologise and offer to connect the customer "
                "with a human agent."),
    # information only (not a target): a deployment whose own instructions touch a forget topic
    "science_tutor": ("You are a patient tutor who helps high-school students with their science homework. "
                      "Explain each answer step by step and check that the student understood it."),
}
TARGET_FORMS = ("none", "helpful", "support")


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


def chat(system: str | None, prompt: str) -> list[dict[str, str]]:
    user = [{"role": "user", "content": prompt}]
    return user if system is None else [{"role": "system", "content": system}, *user]


def gate_config(path: str):
    """The ``gate:`` section of a YAML file (e.g. configs/vllm.yaml), or the whole file as a GateConfig."""
    import yaml

    from serve_unlearn.adapters.gate import GateConfig

    data = yaml.safe_load(Path(path).read_text()) or {}
    section = data["gate"] if isinstance(data, dict) and "gate" in data else data
    return GateConfig.validate_dict(section or {}, where=f"{path} (gate)")


def variant(lora_layers: int | None, forget_sets: dict, detector_config, gconfig, sets: dict) -> dict:
    from serve_unlearn.adapters.detector import DetectorEnsemble, OODDetector
    from serve_unlearn.adapters.gate import Gate

    config = detector_config.model_copy(update={"lora_layers": lora_layers})
    dets, train_s = [], {}
    for topic, items in forget_sets.items():
        t0 = time.perf_counter()
        dets.append(OODDetector.train([it["prompt"] for it in items], config, progress=False))
        train_s[topic] = time.perf_counter() - t0
    topics = list(forget_sets)
    gate = Gate(DetectorEnsemble(dets).weights, topics, gconfig)
    out: dict = {"detector_config": config.model_dump(mode="json"), "train_seconds": train_s,
                 "system_prompt_weights": {}, "forms": {}}
    try:
        for form, system in SYSTEM_PROMPTS.items():
            if system is not None:
                d = gate.decide([[{"role": "system", "content": system}]])[0]
                out["system_prompt_weights"][form] = {"weights": d.weights, "scale": d.scale, "windows": d.windows}
            row: dict = {"auroc": {}, "routed": {}, "routed_to_own": {}, "mean_scale": {}, "weights": {}}
            decided = {}
            for name, prompts in sets.items():
                decisions = gate.decide([chat(system, p) for p in prompts])
                if any(d.error for d in decisions):
                    raise RuntimeError(f"gate failed on {name}: {decisions[0].error}")
                decided[name] = decisions
                row["routed"][name] = float(np.mean([d.scale > 0 for d in decisions]))
                row["mean_scale"][name] = float(np.mean([d.scale for d in decisions]))
                row["weights"][name] = [round(d.weight, 5) for d in decisions]
                row.setdefault("scales", {})[name] = [round(d.scale, 5) for d in decisions]
            for topic in topics:
                key = f"{topic}_paraphrases"
                pos = np.array([d.weights[topic] for d in decided[key]])
                neg = np.array([d.weights[topic] for d in decided["retain"]])
                row["auroc"][topic] = auroc(pos, neg)
                row["routed_to_own"][key] = float(np.mean([d.scale > 0 and d.request == topic
                                                           for d in decided[key]]))
            out["forms"][form] = row
    finally:
        gate.close()
    bare = out["forms"]["none"]["scales"]
    for form, row in out["forms"].items():  # prompts routed behind this system prompt but not without one
        if form != "none":
            row["newly_routed"] = {k: int(sum(s > 0 and not b > 0 for s, b in zip(ss, bare[k])))
                                   for k, ss in row["scales"].items()}
    out["load_avg_after"] = os.getloadavg()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lora-layers", default="1,0", help="comma-separated variants: all, or a layer count")
    ap.add_argument("--config", default=str(REPO / "configs" / "o3_forget.yaml"),
                    help="ForgetConfig YAML; its detector: section is used (lora_layers overridden)")
    ap.add_argument("--gate-config", default=str(REPO / "configs" / "vllm.yaml"),
                    help="YAML with a gate: section (or a bare GateConfig)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (training and scoring)")
    args = ap.parse_args()

    import torch

    from serve_unlearn.adapters.forget_request import ForgetConfig
    from serve_unlearn.eval.qa import load_qa

    torch.set_num_threads(args.threads)
    topics = sorted(p for p in DATA.glob("topic_*.jsonl") if not p.stem.endswith("_paraphrases"))
    forget_sets = {p.stem.removeprefix("topic_"): load_qa(p) for p in topics}
    sets = {f"{t}_paraphrases": [it["prompt"] for it in load_qa(DATA / f"topic_{t}_paraphrases.jsonl")]
            for t in forget_sets}
    sets["retain"] = [it["prompt"] for it in load_qa(DATA / "retain.jsonl")]
    sets["retain_heldout"] = [it["prompt"] for it in load_qa(DATA / "retain_heldout.jsonl")]
    sets["unrelated"] = [line.strip() for line in (DATA / "unrelated.txt").read_text().splitlines() if line.strip()]
    detector_config = ForgetConfig.from_yaml(args.config).detector
    gconfig = gate_config(args.gate_config)

    results: dict = {"config": str(Path(args.config).resolve().relative_to(REPO)),
                     "gate_config_file": str(Path(args.gate_config).resolve().relative_to(REPO)),
                     "gate_config": gconfig.model_dump(mode="json"), "threads": args.threads,
                     "torch": torch.__version__, "system_prompts": SYSTEM_PROMPTS,
                     "set_sizes": {k: len(v) for k, v in sets.items()},
                     "load_avg_start": os.getloadavg(), "variants": {}}
    for spec in args.lora_layers.split(","):
        t0 = time.perf_counter()
        results["variants"][spec] = variant(None if spec == "all" else int(spec), forget_sets, detector_config,
                                            gconfig, sets)
        results["variants"][spec]["seconds"] = time.perf_counter() - t0
    results["load_avg_end"] = os.getloadavg()

    names = list(forget_sets)
    print(f"\nO3 gate routing on examples/data/o3 (gate: {results['gate_config_file']} gate:, policy "
          f"{gconfig.policy.kind} {gconfig.policy.low}->{gconfig.policy.high}; routed = scale > 0)")
    print("| LoRA layers | system prompt | " + " | ".join(f"AUROC {t}" for t in names) + " | "
          + " | ".join(f"{t} paraphrases routed (own)" for t in names)
          + " | retain routed | retain_heldout routed | unrelated routed |")
    print("|---|---|" + "---|" * (2 * len(names) + 3))
    for spec, v in results["variants"].items():
        for form, row in v["forms"].items():
            n = {k: len(w) for k, w in row["weights"].items()}
            para = " | ".join(f"{row['routed'][f'{t}_paraphrases']:.1%} ({row['routed_to_own'][f'{t}_paraphrases']:.1%})"
                              for t in names)
            rest = " | ".join(f"{row['routed'][k]:.1%} ({round(row['routed'][k] * n[k])}/{n[k]})"
                              for k in ("retain", "retain_heldout", "unrelated"))
            label = form if form in TARGET_FORMS else f"{form} (info)"
            print(f"| {spec} | {label} | " + " | ".join(f"{row['auroc'][t]:.3f}" for t in names)
                  + f" | {para} | {rest} |")
    print("\nSystem prompts alone (weight per request; routed when the max is above the policy's low):")
    print("| LoRA layers | system prompt | windows | " + " | ".join(f"w {t}" for t in names)
          + " | scale | prompts newly routed behind it (retain / retain_heldout / unrelated) |")
    print("|---|---|---|" + "---|" * (len(names) + 2))
    for spec, v in results["variants"].items():
        for form, s in v["system_prompt_weights"].items():
            newly = v["forms"][form]["newly_routed"]
            print(f"| {spec} | {form} | {s['windows']} | " + " | ".join(f"{s['weights'][t]:.3f}" for t in names)
                  + f" | {s['scale']:.2f} | {newly['retain']} / {newly['retain_heldout']} / {newly['unrelated']} |")
    start, end = ("/".join(f"{x:.2f}" for x in results[k]) for k in ("load_avg_start", "load_avg_end"))
    print(f"load average (1/5/15 min) at start {start}, at end {end}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "o3_gate_routing.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS / 'o3_gate_routing.json'}")


if __name__ == "__main__":
    main()
