"""O3 gate latency on CPU: what scoring a batch of prompts costs with 1 and with 5 forget requests.

Trains 5 MiniLM detectors on short synthetic topic texts (astronomy, cooking, football, gardening, personal
finance; cached under ``~/.cache/serve-unlearn/bench/o3_gate_latency``), then times ``DetectorEnsemble.weights``
for 1, 8 and 32 prompts with the first 1 and all 5 detectors. Target: 5 requests cost <= 1.5x one.

It does so for each ``--lora-layers`` variant: ``all`` (O3: LoRA on every layer, so the ensemble repeats the
whole encoder per request in one mixed batch), ``1`` (LoRA on the top layer; the 5 lower layers run once) and
``0`` (no LoRA: one shared pass, the requests differ only in their statistics). For each it also reports AUROCs:
every topic detector's held-out topic texts against the other topics' and general questions (synthetic, easy),
and a detector trained on 30 of the 45 chemistry questions of ``examples/data/smollm2_forget.jsonl``, its 15
held-out ones against the 71 general questions of ``smollm2_retain.jsonl`` (real wording, harder).

It also times the whole gate, ``Gate.decide`` (``Gate(ensemble.weights, names, GateConfig())``: normalisation,
windows, the scoring queue's worker thread, the window cache), for 1, 8 and 32 prompts with 1 and 5 detectors, in
three forms:

- ``bare``: each prompt a one-message chat (the user turn only);
- ``chat``: an ordinary chat, ``[system "You are a helpful assistant.", user prompt]``, on a gate whose window
  cache already holds the system prompt (scored once, on the first call): the serving situation;
- ``chat_cold``: the same chats with the cache disabled (``GateConfig(cache_size=0)``), so every call scores the
  system prompt again (once per call: a call's identical windows are scored once).

Every timed call gets user prompts that gate has never seen (a fresh slice of a pool of distinct questions per
repeat), so only the system prompt can come from the cache. Target for every form: 5 requests <= 1.5x one.

Writes ``benchmarks/results/o3_gate_latency.json`` and ``o3_gate_latency.png`` (per-call p50 against prompts per
call) and prints two tables.

    python benchmarks/o3_gate_latency.py [--lora-layers all,1,0] [--threads 1] [--repeats 30]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
N_TRAIN, N_HELD = 24, 12
SYSTEM_PROMPT = "You are a helpful assistant."
GATE_FORMS = ("bare", "chat", "chat_cold")
WARMUP = 3

TOPICS = {
    "astronomy": (["the planet Mars", "Jupiter's moons", "a red giant star", "the Andromeda galaxy", "a comet's tail",
                   "a black hole", "the rings of Saturn", "a solar eclipse", "a neutron star", "the Milky Way"],
                  ["How far away is {}?", "What is {} made of?", "Can a telescope show {}?", "How did {} form?",
                   "Why do astronomers study {}?", "What would we see near {}?"]),
    "cooking": (["a sourdough loaf", "risotto", "a beef stew", "puff pastry", "a vinaigrette", "fried rice",
                 "a chocolate souffle", "pancakes", "a tomato sauce", "roast chicken"],
                ["How long should I cook {}?", "What goes wrong when making {}?", "Which pan is best for {}?",
                 "What spices suit {}?", "Can I prepare {} a day ahead?", "How do chefs season {}?"]),
    "football": (["a penalty kick", "the offside rule", "a corner kick", "the World Cup final", "a goalkeeper",
                  "a red card", "extra time", "a free kick", "the midfield", "a hat-trick"],
                 ["How does the referee judge {}?", "What is the history of {}?", "Why do coaches worry about {}?",
                  "How do players train for {}?", "When was {} introduced?", "What tactics involve {}?"]),
    "gardening": (["tomato seedlings", "a compost heap", "rose bushes", "clay soil", "a vegetable bed",
                   "aphids on leaves", "tulip bulbs", "a lawn in spring", "fruit trees", "herbs in pots"],
                  ["How often should I water {}?", "When is the best time to plant {}?", "How do I protect {}?",
                   "What fertiliser helps {}?", "Why is {} not growing?", "How do gardeners prune {}?"]),
    "personal finance": (["a retirement account", "a credit card balance", "an index fund", "a mortgage",
                          "an emergency fund", "a monthly budget", "student loans", "compound interest",
                          "a savings account", "income tax returns"],
                         ["How should I plan {}?", "What are the risks of {}?", "Is {} worth it for a young person?",
                          "How do banks handle {}?", "What mistakes do people make with {}?",
                          "How can I improve {}?"]),
}


def topic_texts(topic: str) -> list[str]:
    """N_TRAIN + N_HELD distinct questions of one topic, in a fixed shuffled order."""
    things, templates = TOPICS[topic]
    texts = [t.format(x) for t, x in itertools.product(templates, things)]
    random.Random(topic).shuffle(texts)
    return texts[:N_TRAIN + N_HELD]


def prompts_of(name: str) -> list[str]:
    lines = (REPO / "examples" / "data" / name).read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines if line.strip()]


def general_questions() -> list[str]:
    return prompts_of("smollm2_retain.jsonl")


def chemistry_auroc(lora_layers: int | None) -> float:
    from sklearn.metrics import roc_auc_score

    from serve_unlearn.adapters.detector import DetectorConfig, OODDetector

    chem = prompts_of("smollm2_forget.jsonl")
    order = np.random.default_rng(0).permutation(len(chem))
    train, held = [chem[i] for i in order[:30]], [chem[i] for i in order[30:]]
    det = OODDetector.train(train, DetectorConfig(lora_layers=lora_layers), progress=False)
    general = general_questions()
    labels = np.r_[np.ones(len(held)), np.zeros(len(general))]
    return float(roc_auc_score(labels, np.r_[det.scores(held), det.scores(general)]))


def detectors(lora_layers: int | None, cache: Path, progress: bool):
    """One detector per topic, trained once and reloaded from ``cache`` afterwards."""
    from serve_unlearn.adapters.detector import DetectorConfig, OODDetector
    from serve_unlearn.errors import ArtifactError

    out, seconds = [], {}
    for i, topic in enumerate(TOPICS):
        folder = cache / f"lora_{'all' if lora_layers is None else lora_layers}" / topic.replace(" ", "_")
        try:
            det = OODDetector.load(folder)  # the ensembles below move them all onto one backbone
        except ArtifactError:
            t0 = time.perf_counter()
            det = OODDetector.train(topic_texts(topic)[:N_TRAIN], DetectorConfig(lora_layers=lora_layers, seed=i),
                                    progress=progress)
            seconds[topic] = time.perf_counter() - t0
            det.save(folder)
        out.append(det)
    return out, seconds


def aurocs(dets) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    from serve_unlearn.adapters.detector import DetectorEnsemble

    held = {t: topic_texts(t)[N_TRAIN:] for t in TOPICS}
    general = general_questions()
    scores = DetectorEnsemble(dets).scores([x for t in TOPICS for x in held[t]] + general)
    out = {}
    for i, topic in enumerate(TOPICS):
        labels = np.r_[[float(t == topic) for t in TOPICS for _ in held[t]], np.zeros(len(general))]
        out[topic] = float(roc_auc_score(labels, scores[i]))
    return out


def latency(ensembles: dict, prompts: list[str], repeats: int) -> dict[str, dict[str, float]]:
    """Per-call latency (ms) of scoring ``prompts`` in one batch with each ensemble: wall-clock p50 and p99, and
    the p50 of this process's CPU time. The ensembles' calls alternate, so a neighbour's load on a shared machine
    hits them alike; CPU time (one thread) is what the scoring itself costs, whatever else runs."""
    for ens in ensembles.values():
        for _ in range(3):
            ens.weights(prompts)
    wall: dict = {k: [] for k in ensembles}
    cpu: dict = {k: [] for k in ensembles}
    for _ in range(repeats):
        for k, ens in ensembles.items():
            w0, c0 = time.perf_counter(), time.process_time()
            ens.weights(prompts)
            cpu[k].append((time.process_time() - c0) * 1e3)
            wall[k].append((time.perf_counter() - w0) * 1e3)
    out = {}
    for k in ensembles:
        p50, p99 = np.percentile(wall[k], [50, 99])
        out[k] = {"call_p50_ms": float(p50), "call_p99_ms": float(p99), "call_cpu_p50_ms": float(np.median(cpu[k])),
                  "per_prompt_p50_ms": float(p50) / len(prompts), "per_prompt_p99_ms": float(p99) / len(prompts)}
    return out


def fresh_prompts() -> list[str]:
    """Distinct questions for the gate timings (one fresh slice per call, so no user window is ever cached):
    every topic template with every thing, the example data's questions, and "How do X and Y differ?" for every
    pair of things; shuffled once."""
    pool = [t.format(x) for things, templates in TOPICS.values() for t in templates for x in things]
    for name in ("smollm2_retain.jsonl", "smollm2_forget.jsonl", "o3/retain.jsonl", "o3/retain_heldout.jsonl",
                 "o3/topic_chemistry_paraphrases.jsonl", "o3/topic_animals_paraphrases.jsonl"):
        pool += prompts_of(name)
    things = [x for ts, _ in TOPICS.values() for x in ts]
    pool += [f"How do {a} and {b} differ?" for a, b in itertools.permutations(things, 2)]
    pool = list(dict.fromkeys(pool))
    random.Random(1).shuffle(pool)
    return pool


def counting(scorer, counts: dict, key: str):
    """``scorer`` that adds the number of texts it is given to ``counts[key]``."""
    def scored(texts):
        counts[key] = counts.get(key, 0) + len(texts)
        return scorer(texts)
    return scored


def chat_of(form: str, prompt: str) -> list[dict[str, str]]:
    user = [{"role": "user", "content": prompt}]
    return user if form == "bare" else [{"role": "system", "content": SYSTEM_PROMPT}, *user]


def gate_latency(ensembles: dict, n: int, repeats: int, pool: list[str]) -> dict:
    """Per-call latency (ms) of ``Gate.decide`` on ``n`` chats in each form, with each ensemble. Gate instances
    are fresh per (form, ensemble); call r of every gate gets the same fresh user prompts (pool slice r), which
    that gate has never seen. All gates' calls alternate within each repeat, as in ``latency``."""
    from serve_unlearn.adapters.gate import Gate, GateConfig

    need = (WARMUP + repeats) * n
    if need > len(pool):
        raise SystemExit(f"--repeats {repeats} needs {need} distinct prompts at {n} per call; the pool has "
                         f"{len(pool)}: lower --repeats")
    gates, scored = {}, {}
    for form in GATE_FORMS:
        config = GateConfig(cache_size=0) if form == "chat_cold" else GateConfig()
        for k, ens in ensembles.items():
            names = [f"request{i}" for i in range(len(ens.detectors))]
            gates[form, k] = Gate(counting(ens.weights, scored, form), names, config)
    calls = {form: [[chat_of(form, p) for p in pool[r * n:(r + 1) * n]] for r in range(WARMUP + repeats)]
             for form in GATE_FORMS}
    wall: dict = {key: [] for key in gates}
    cpu: dict = {key: [] for key in gates}
    windows: dict = {}
    try:
        for r in range(WARMUP + repeats):
            for (form, k), gate in gates.items():
                w0, c0 = time.perf_counter(), time.process_time()
                decisions = gate.decide(calls[form][r])
                c1, w1 = time.process_time(), time.perf_counter()
                if any(d.error for d in decisions):
                    raise RuntimeError(f"gate failed: {decisions[0].error}")
                if r >= WARMUP:
                    cpu[form, k].append((c1 - c0) * 1e3)
                    wall[form, k].append((w1 - w0) * 1e3)
                windows[form] = sum(d.windows for d in decisions)
            scored_last = dict(scored)
            scored.clear()
    finally:
        for gate in gates.values():
            gate.close()
    out: dict = {}
    for form in GATE_FORMS:
        # windows: summed over the call's prompts (a shared system prompt counts once per prompt); scored: the
        # texts the detectors actually ran on in one call (per gate; the cache and a call's dedup take the rest)
        row: dict = {"windows_per_call": windows[form], "scored_per_call": scored_last[form] // len(ensembles)}
        for k in ensembles:
            p50, p99 = np.percentile(wall[form, k], [50, 99])
            row[k] = {"call_p50_ms": float(p50), "call_p99_ms": float(p99),
                      "call_cpu_p50_ms": float(np.median(cpu[form, k])), "per_prompt_p50_ms": float(p50) / n}
        row["ratio_p50"] = row["5"]["call_p50_ms"] / row["1"]["call_p50_ms"]
        row["ratio_cpu_p50"] = row["5"]["call_cpu_p50_ms"] / row["1"]["call_cpu_p50_ms"]
        out[form] = row
    for form in ("chat", "chat_cold"):  # what the system prompt adds, with each ensemble
        out[form]["over_bare_p50"] = {k: out[form][k]["call_p50_ms"] / out["bare"][k]["call_p50_ms"]
                                      for k in ensembles}
    return out


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["variants"]
    fig, axes = plt.subplots(1, len(variants), figsize=(5.2 * len(variants), 4.2), squeeze=False, sharey=True)
    colors = {"ensemble.weights": "tab:gray", "bare": "tab:blue", "chat": "tab:green", "chat_cold": "tab:red"}
    for ax, (spec, row) in zip(axes[0], variants.items()):
        ns = [int(n) for n in row["latency"]]
        for label, color in colors.items():
            for k, style in (("1", "--"), ("5", "-")):
                if label == "ensemble.weights":
                    y = [row["latency"][n][k]["call_p50_ms"] for n in row["latency"]]
                else:
                    y = [row["gate_latency"][n][label][k]["call_p50_ms"] for n in row["gate_latency"]]
                ax.plot(ns, y, style, marker="o", color=color, label=f"{label}, {k} request{'s' * (k != '1')}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("prompts per call")
        ax.set_title(f"lora_layers={spec}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("per-call p50 (ms, wall clock)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"O3 gate latency, MiniLM on CPU, {results['threads']} thread(s): "
                 "DetectorEnsemble.weights and Gate.decide (bare / system+user, cache warm / cold)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lora-layers", default="all,1,0", help="comma-separated variants: all, or a layer count")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core machine 2 threads stall on each other)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--cache", default=None, help="detector cache (default ~/.cache/serve-unlearn/bench/...)")
    args = ap.parse_args()

    import torch

    from serve_unlearn.adapters.detector import DetectorEnsemble
    from serve_unlearn.models.packaged import default_cache_dir

    torch.set_num_threads(args.threads)
    cache = Path(args.cache) if args.cache else default_cache_dir() / "bench" / "o3_gate_latency"
    pool = [x for t in TOPICS for x in topic_texts(t)[N_TRAIN:]] + general_questions()
    random.Random(0).shuffle(pool)
    gate_pool = fresh_prompts()
    results: dict = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
                     "backbone": "all-MiniLM-L6-v2 (6 layers, 384-d)", "system_prompt": SYSTEM_PROMPT,
                     "load_avg_start": os.getloadavg(), "variants": {}}
    for spec in args.lora_layers.split(","):
        lora_layers = None if spec == "all" else int(spec)
        dets, train_s = detectors(lora_layers, cache, progress=True)
        row: dict = {"train_seconds": train_s, "auroc": aurocs(dets), "auroc_chemistry": chemistry_auroc(lora_layers),
                     "latency": {}}
        for n in (1, 8, 32):
            r = latency({"1": DetectorEnsemble(dets[:1]), "5": DetectorEnsemble(dets)}, pool[:n], args.repeats)
            r["ratio_p50"] = r["5"]["call_p50_ms"] / r["1"]["call_p50_ms"]
            r["ratio_cpu_p50"] = r["5"]["call_cpu_p50_ms"] / r["1"]["call_cpu_p50_ms"]
            row["latency"][n] = r
        row["gate_latency"] = {}
        for n in (1, 8, 32):
            row["gate_latency"][n] = gate_latency({"1": DetectorEnsemble(dets[:1]), "5": DetectorEnsemble(dets)}, n,
                                                  args.repeats, gate_pool)
        row["load_avg_after"] = os.getloadavg()
        results["variants"][spec] = row
    results["load_avg_end"] = os.getloadavg()

    print(f"\nO3 gate latency, MiniLM on CPU ({args.threads} thread(s)), wall-clock ms per prompt p50 / p99 "
          f"({args.repeats} calls each, 1- and 5-request calls alternating)")
    print("| LoRA layers | prompts | 1 request | 5 requests | 5 / 1 wall p50 | 5 / 1 CPU p50 | "
          "AUROC topics (min of 5) | AUROC chemistry |")
    print("|---|---|---|---|---|---|---|---|")
    for spec, row in results["variants"].items():
        for n, r in row["latency"].items():
            print(f"| {spec} | {n} | {r['1']['per_prompt_p50_ms']:.2f} / {r['1']['per_prompt_p99_ms']:.2f} | "
                  f"{r['5']['per_prompt_p50_ms']:.2f} / {r['5']['per_prompt_p99_ms']:.2f} | "
                  f"{r['ratio_p50']:.2f}x | {r['ratio_cpu_p50']:.2f}x | {min(row['auroc'].values()):.3f} | "
                  f"{row['auroc_chemistry']:.3f} |")

    print(f"\nGate.decide, wall-clock ms per call p50 ({args.repeats} calls each, all gates alternating; fresh user "
          f"prompts every call; chat = system {SYSTEM_PROMPT!r} + user, its window cached after the first call; "
          "chat_cold = GateConfig(cache_size=0))")
    print("| LoRA layers | prompts | form | windows / scored per call | 1 request | 5 requests | 5 / 1 wall p50 | "
          "5 / 1 CPU p50 | vs bare, 1 / 5 requests |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec, row in results["variants"].items():
        for n, g in row["gate_latency"].items():
            for form in GATE_FORMS:
                r = g[form]
                vs = (f"{r['over_bare_p50']['1']:.2f}x / {r['over_bare_p50']['5']:.2f}x" if "over_bare_p50" in r
                      else "")
                print(f"| {spec} | {n} | {form} | {r['windows_per_call']} / {r['scored_per_call']} | "
                      f"{r['1']['call_p50_ms']:.1f} | "
                      f"{r['5']['call_p50_ms']:.1f} | {r['ratio_p50']:.2f}x | {r['ratio_cpu_p50']:.2f}x | {vs} |")
    start, end = ("/".join(f"{x:.2f}" for x in results[k]) for k in ("load_avg_start", "load_avg_end"))
    print(f"load average (1/5/15 min) at start {start}, at end {end}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "o3_gate_latency.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "o3_gate_latency.png")
    print(f"wrote {RESULTS / 'o3_gate_latency.json'} and {RESULTS / 'o3_gate_latency.png'}")


if __name__ == "__main__":
    main()
