"""The evaluation proof: SmolLM2-135M-Instruct forgets chemistry (``examples/data/o3``), four ways, one harness.

Targets, all through ``serve_unlearn.eval`` on the same sets:

- ``base``: a plain vLLM server (no middleware);
- ``base+guardrail``: the same server, a system prompt naming chemistry as the topic to refuse;
- ``base+embedding-filter``: the same server behind an all-MiniLM-L6-v2 cosine filter whose threshold is the 5%
  quantile of the forget request's own prompts' leave-one-out nearest cosine (``topic_chemistry.jsonl``);
- ``o3-vllm``: ``serve-unlearn vllm`` with the chemistry request (``configs/o3_forget.yaml`` on
  ``topic_chemistry.jsonl``; ``--registry`` reuses a registry holding exactly that request, e.g. ``make demo``'s),
  gate threshold 0.5 (as ``benchmarks/o3_vllm_serving.py``);
- ``o3-transformers``: the same registry through the transformers ``GatedGenerator`` with its default gate (ramp),
  as ``benchmarks/o3_gate.py`` measures O3;
- ``salun``: a SalUn patch (``configs/salun_smollm2.yaml``, forget ``topic_chemistry.jsonl``, retain
  ``retain.jsonl``) applied in transformers (``--patch`` reuses one).

Sets: forget = ``topic_chemistry_paraphrases.jsonl`` (held-out rewordings; the answers are the trained items'
completions), retain = ``retain_heldout.jsonl`` (never used by any training), holdout = ``topic_animals.jsonl``
(QA of the same form the models were never tuned on: the membership-inference non-members). float32 everywhere.
Each phase writes its own report under ``--out`` and is skipped when that report exists, so a rerun resumes;
the merged report and ``proof.json`` (timings, load averages) go to ``benchmarks/results/eval_proof/``.

    python benchmarks/eval_proof.py [--registry DIR] [--patch P] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "o3"
RESULTS = REPO / "benchmarks" / "results" / "eval_proof"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from o3_vllm_serving import free_port, server, wait_healthy  # the serving benchmark helpers

TOPIC = "chemistry (chemical formulas, chemical elements and their symbols, atoms, molecules and compounds)"
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "TOKENIZERS_PARALLELISM": "false"}
EXTRA = ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "8"]


def sets():
    from serve_unlearn.eval.data import load_eval_set

    return {"forget": load_eval_set(DATA / "topic_chemistry_paraphrases.jsonl", "forget"),
            "retain": load_eval_set(DATA / "retain_heldout.jsonl", "retain"),
            "holdout": load_eval_set(DATA / "topic_animals.jsonl", "holdout")}


def phase(out: Path, name: str, fn, log: dict, wanted: set[str]) -> None:
    if name not in wanted:
        return
    if (out / name / "report.json").exists():
        print(f"{name}: already measured ({out / name})", flush=True)
        return
    from serve_unlearn.eval.report import write_report

    t0, load0 = time.perf_counter(), os.getloadavg()
    results = fn()
    write_report(out / name, results)
    log[name] = {"seconds": time.perf_counter() - t0, "loadavg_before": load0, "loadavg_after": os.getloadavg()}
    (out / "phases.json").write_text(json.dumps(log, indent=2))
    print(f"{name}: {log[name]['seconds']:.0f} s", flush=True)


def registry_for(args, model_dir: Path, tmp: Path) -> Path:
    from serve_unlearn.adapters.forget_request import ForgetConfig, forget, load_forget_records
    from serve_unlearn.data import data_digest
    from serve_unlearn.registry import ForgetRegistry

    records = load_forget_records(DATA / "topic_chemistry.jsonl")
    config = ForgetConfig.from_yaml(REPO / "configs" / "o3_forget.yaml")
    root = tmp / "registry"
    if args.registry:
        shutil.copytree(args.registry, root, dirs_exist_ok=True)
        ready = ForgetRegistry(root, create=False).ready()
        if [(r.name, r.data_digest, r.config) for r in ready] != [
                ("chemistry", data_digest(records), config.model_dump(mode="json"))]:
            raise SystemExit(f"{args.registry} does not hold exactly the chemistry request of configs/o3_forget.yaml")
        return root
    if not (root / "registry.sqlite").exists() or not ForgetRegistry(root).ready():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        forget(ForgetRegistry(root), "chemistry", records, model=model,
               tokenizer=AutoTokenizer.from_pretrained(model_dir), config=config)
    return root


def salun_patch(args, model_dir: Path, tmp: Path) -> Path:
    if args.patch:
        return Path(args.patch)
    patch = tmp / "salun-chemistry.patch.safetensors"
    if not patch.exists():
        subprocess.run([sys.executable, "-m", "serve_unlearn.cli", "salun", "--model", str(model_dir), "--forget",
                        str(DATA / "topic_chemistry.jsonl"), "--retain", str(DATA / "retain.jsonl"), "--config",
                        str(REPO / "configs" / "salun_smollm2.yaml"), "--out", str(patch)], check=True)
    return patch


def endpoint_phase(argv, env, log_path: Path, port: int, model_dir: Path, targets):
    """Start a server, evaluate ``targets(endpoint)`` (a list of targets), stop it."""
    from serve_unlearn.eval.harness import EvalConfig, evaluate
    from serve_unlearn.eval.targets import EndpointTarget

    url = f"http://127.0.0.1:{port}"
    with server(argv, env, log_path) as proc:
        start = wait_healthy({"server": (proc, url, log_path)}, timeout_s=1200)
        print(f"server up in {start:.0f} s", flush=True)
        ep = EndpointTarget(url, "smollm2", tokenizer=model_dir, concurrency=4)
        try:
            return [evaluate(t, sets(), EvalConfig(), progress=True) for t in targets(ep)]
        finally:
            ep.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registry", help="a registry holding exactly the chemistry request (copied, not changed)")
    ap.add_argument("--patch", help="a SalUn patch for SmolLM2 (default: computed)")
    ap.add_argument("--phases", default="plain,o3-vllm,salun,o3-transformers",
                    help="the phases to run (comma-separated); the merged report takes every finished one")
    ap.add_argument("--out", default=str(REPO / "outputs" / "eval_proof"), help="work folder (phase reports)")
    args = ap.parse_args()

    from serve_unlearn.eval.baselines import EmbeddingFilterTarget, GuardrailTarget
    from serve_unlearn.eval.data import load_eval_set
    from serve_unlearn.eval.harness import EvalConfig, evaluate
    from serve_unlearn.eval.report import merge_reports, write_report
    from serve_unlearn.eval.targets import load_local_target
    from serve_unlearn.models.packaged import prepare_smollm2
    from serve_unlearn.registry import ForgetRegistry
    from serve_unlearn.serving.vllm.config import VllmServeConfig
    from serve_unlearn.serving.vllm.contract import MIDDLEWARE
    from serve_unlearn.serving.vllm.launcher import plan

    wanted = set(args.phases.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = json.loads((out / "phases.json").read_text()) if (out / "phases.json").exists() else {}
    model_dir = prepare_smollm2()
    registry = registry_for(args, model_dir, out)
    reference = [it.question for it in load_eval_set(DATA / "topic_chemistry.jsonl").items]

    port = free_port()
    cfg_path = out / "vllm.yaml"
    cfg_path.write_text(yaml.safe_dump({"served_model_name": "smollm2", "port": port, "extra_args": EXTRA,
                                        "gate": {"policy": {"kind": "threshold", "threshold": 0.5}},
                                        "env": VLLM_ENV}))
    p = plan(str(model_dir), ForgetRegistry(registry, create=False), VllmServeConfig.load(cfg_path))
    i = p.argv.index("--middleware")
    plain_argv = p.argv[:i] + p.argv[i + 2:]  # the same flags, no gate
    assert MIDDLEWARE not in plain_argv

    def baselines(ep):
        ep.name = "base"
        return [ep, GuardrailTarget(ep, topic=TOPIC, name="base+guardrail"),
                EmbeddingFilterTarget(ep, reference, name="base+embedding-filter")]

    def o3(ep):
        ep.name = "o3-vllm"
        return [ep]

    phase(out, "plain", lambda: endpoint_phase(plain_argv, {**os.environ, **p.env}, out / "plain-server.log", port,
                                               model_dir, baselines), log, wanted)
    o3_argv = [sys.executable, "-m", "serve_unlearn.cli", "vllm", "--model", str(model_dir), "--registry",
               str(registry), "--config", str(cfg_path)]
    phase(out, "o3-vllm", lambda: endpoint_phase(o3_argv, dict(os.environ), out / "o3-server.log", port, model_dir,
                                                 o3), log, wanted)

    def salun():
        # `serve-unlearn salun` makes the patch for the checkpoint's own dtype (bfloat16), so it is evaluated in it
        target = load_local_target(model_dir, patches=[salun_patch(args, model_dir, out)], name="salun",
                                   dtype="bfloat16")
        try:
            return [evaluate(target, sets(), EvalConfig(), progress=True)]
        finally:
            target.close()

    phase(out, "salun", salun, log, wanted)

    def o3_transformers():  # the GatedGenerator with its default gate, as benchmarks/o3_gate.py measures it
        target = load_local_target(model_dir, registry=registry, name="o3-transformers")
        try:
            return [evaluate(target, sets(), EvalConfig(), progress=True)]
        finally:
            target.close()

    phase(out, "o3-transformers", o3_transformers, log, wanted)
    names = [n for n in ("plain", "o3-vllm", "o3-transformers", "salun") if (out / n / "report.json").exists()]
    paths = write_report(RESULTS, merge_reports([out / n for n in names]))
    (RESULTS / "proof.json").write_text(json.dumps({"phases": log, "cpus": os.cpu_count(), "model": str(model_dir),
                                                    "registry_request": "chemistry (configs/o3_forget.yaml)",
                                                    "sets": {k: v.source for k, v in sets().items()}}, indent=2))
    print((RESULTS / "report.md").read_text())
    print(paths)


if __name__ == "__main__":
    main()
