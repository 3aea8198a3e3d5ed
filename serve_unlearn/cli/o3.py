"""``serve-unlearn o3 forget|retire|score|list``: file or withdraw forget requests, see what the gate decides, list
the registry."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from ..registry import ForgetRegistry


def _forget(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..adapters.forget_request import ForgetConfig, forget, load_forget_records

    config = ForgetConfig.from_yaml(args.config) if args.config else ForgetConfig()
    records = load_forget_records(args.forget)  # before loading the model: bad data fails fast
    probes = _load_probes(args.probes) if args.probes else None
    registry = ForgetRegistry(args.registry)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    evidence: dict = {}

    def before_ready(staging) -> None:
        if probes is not None:
            from ..eval.policy import VerificationPolicy
            from ..eval.staged import verify_staged
            from ..serving.vllm.config import VllmServeConfig

            policy = (VerificationPolicy.from_yaml(args.evidence_config) if args.evidence_config
                      else VerificationPolicy())
            evidence.update(verify_staged(registry, staging, args.name, probes, model=model, tokenizer=tokenizer,
                                          policy=policy, gate_config=VllmServeConfig.load(args.serve_config).gate))

    t0 = time.perf_counter()
    request = forget(registry, args.name, records, model=model, tokenizer=tokenizer, config=config,
                     progress=not args.quiet, before_ready=before_ready)
    out = {"request": asdict(request), "train_s": round(time.perf_counter() - t0, 2),
           **({"verification": evidence} if evidence else {})}
    print(json.dumps(_hot_load(args, registry, out), indent=2))
    return 0


def _load_probes(path: str) -> dict:
    from ..errors import EvalDataError
    from ..eval.data import eval_set_from_records

    try:
        probes = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise EvalDataError(f"--probes {path}: not a readable JSON file ({exc})") from None
    if not isinstance(probes, dict) or set(probes) != {"forget", "retain"}:
        raise EvalDataError(f"--probes {path}: expected {{\"forget\": [...], \"retain\": [...]}}")
    for key, items in probes.items():
        eval_set_from_records(key, items, f"{path}: {key}")
    return probes


def _evidence(registry: ForgetRegistry, request) -> str:
    """passed / flagged / '' for a request's verification record."""
    if "verification" not in request.artifacts:
        return ""
    try:
        record = json.loads(registry.artifact_path(request, "verification").read_text())
    except (OSError, ValueError):
        return "unreadable"
    return "passed" if record.get("passed") else ("flagged" if record.get("flagged") else "failed")


def _retire(args) -> int:
    registry = ForgetRegistry(args.registry, create=False)
    out = {"request": asdict(registry.retire(args.name))}
    print(json.dumps(_hot_load(args, registry, out), indent=2))
    return 0


def _hot_load(args, registry: ForgetRegistry, out: dict) -> dict:
    """With --server: put the registry's new state in force on the running server, and report how."""
    if args.server:
        from ..serving.vllm.config import VllmServeConfig
        from ..serving.vllm.hotload import load_into_server

        report = load_into_server(registry, args.server, VllmServeConfig.load(args.serve_config),
                                  api_key=os.environ.get(args.api_key_env))
        out["server"] = asdict(report)
    return out


def _add_server_args(parser, what: str) -> None:
    parser.add_argument("--server", help=f"a running `serve-unlearn vllm` server (http://host:port): {what}; "
                        "sends the admin token from $SERVE_UNLEARN_ADMIN_TOKEN")
    parser.add_argument("--serve-config",
                        help="the server's YAML VllmServeConfig (bank scales), e.g. configs/vllm.yaml")
    parser.add_argument("--api-key-env", default="VLLM_API_KEY",
                        help="environment variable holding the server's API key, if it has one")


def _score(args) -> int:
    from ..adapters.gate import GateConfig
    from ..adapters.served import load_gate

    config = GateConfig.from_yaml(args.gate_config) if args.gate_config else GateConfig()
    gate = load_gate(ForgetRegistry(args.registry, create=False), config)
    try:
        decisions = gate.decide(args.text)
    finally:
        gate.close()
    print(json.dumps([{"text": t, **asdict(d)} for t, d in zip(args.text, decisions)], indent=2))
    return 0


def _list(args) -> int:
    registry = ForgetRegistry(args.registry, create=False)
    requests = registry.list()
    if args.json:
        print(json.dumps([{**asdict(r), "evidence": _evidence(registry, r)} for r in requests], indent=2))
        return 0
    print(f"{'name':24} {'status':9} {'version':>7} {'evidence':9} {'created_at':25} id")
    for r in requests:
        version = "" if r.version is None else str(r.version)
        print(f"{r.name:24} {r.status:9} {version:>7} {_evidence(registry, r):9} {r.created_at:25} {r.id}")
    return 0


def add_o3_parser(sub) -> None:
    o3 = sub.add_parser("o3", help="O3: per-request unlearning LoRAs gated by OOD detectors")
    osub = o3.add_subparsers(dest="o3_command", required=True)
    f = osub.add_parser("forget", help="train a forget request's detector and LoRA and record it")
    f.add_argument("--base", required=True, help="HF folder of the causal LM being served")
    f.add_argument("--forget", required=True, help="JSONL with 'prompt' (and 'completion'), or one prompt a line")
    f.add_argument("--name", required=True, help="request name: letters, digits, '.', '_' or '-'")
    f.add_argument("--registry", required=True, help="registry folder (created when missing)")
    f.add_argument("--config", help="YAML ForgetConfig (detector:, lora:), e.g. configs/o3_forget.yaml")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    f.add_argument("--probes", help="JSON {\"forget\": [...], \"retain\": [...]} of {question, answer}: the "
                   "request is verified against them before it is registered (serve-unlearn eval's record)")
    f.add_argument("--evidence-config", help="YAML VerificationPolicy (bounds, on_shortfall: refuse|flag)")
    _add_server_args(f, "hot-load the request into it and switch its routing")
    f.set_defaults(func=_forget)
    r = osub.add_parser("retire", help="take a ready request out of force (its records and artifacts stay)")
    r.add_argument("--registry", required=True)
    r.add_argument("name", help="request name or id")
    _add_server_args(r, "switch it to the remaining requests")
    r.set_defaults(func=_retire)
    s = osub.add_parser("score", help="print the gate's weight per request for each TEXT, as JSON")
    s.add_argument("--registry", required=True)
    s.add_argument("--gate-config", help="YAML GateConfig (policy:, fail_closed:, ...)")
    s.add_argument("text", nargs="+")
    s.set_defaults(func=_score)
    ls = osub.add_parser("list", help="list the forget requests of a registry")
    ls.add_argument("--registry", required=True)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)

