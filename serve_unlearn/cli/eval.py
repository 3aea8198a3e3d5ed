"""``serve-unlearn eval``: evaluate one target (and baselines around it) on forget/retain/holdout sets and write
report.json, report.md and report.html; ``eval compare`` joins reports side by side; ``eval verify`` checks a
signed verification record.

    serve-unlearn eval --forget F --retain F [--holdout F] --out DIR
        (--endpoint URL --model NAME [--tokenizer DIR] | --model-dir DIR [--patch P ...] [--registry DIR])
        [--baseline guardrail --guardrail-topic TEXT] [--baseline embedding-filter [--filter-reference F]]
    serve-unlearn eval compare DIR_OR_JSON ... --out DIR
    serve-unlearn eval verify RECORD.json          # key: $SERVE_UNLEARN_SIGNING_KEY
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UnlearnConfigError


def _sets(args) -> dict:
    from ..eval.data import load_eval_set

    sets = {"forget": load_eval_set(args.forget, "forget"), "retain": load_eval_set(args.retain, "retain")}
    if args.holdout:
        sets["holdout"] = load_eval_set(args.holdout, "holdout")
    for spec in args.set or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UnlearnConfigError(f"--set takes NAME=FILE, got {spec!r}")
        sets[name] = load_eval_set(path, name)
    return sets


def _target(args):
    from ..eval.targets import EndpointTarget, load_local_target

    if bool(args.endpoint) == bool(args.model_dir):
        raise UnlearnConfigError("give one target: --endpoint URL --model NAME, or --model-dir DIR")
    if args.endpoint:
        if not args.model:
            raise UnlearnConfigError("--endpoint needs --model (the served model name)")
        tokenizer = args.tokenizer or (args.model if Path(args.model).is_dir() else None)
        return EndpointTarget(args.endpoint, args.model, tokenizer=tokenizer, name=args.name,
                              api_key=os.environ.get(args.api_key_env), concurrency=args.concurrency)
    if args.tokenizer or args.model:
        raise UnlearnConfigError("--model and --tokenizer go with --endpoint; --model-dir names the local checkpoint")
    gate_config = None
    if args.gate_config:
        from ..adapters.gate import GateConfig

        gate_config = GateConfig.from_yaml(args.gate_config)
    return load_local_target(args.model_dir, patches=args.patch or (), registry=args.registry,
                             gate_config=gate_config, name=args.name, dtype=args.dtype)


def _baselines(args, target, sets) -> list:
    from ..eval.baselines import EmbeddingFilterTarget, GuardrailTarget
    from ..eval.data import load_eval_set

    out = []
    for kind in args.baseline or []:
        if kind == "guardrail":
            if not args.guardrail_topic:
                raise UnlearnConfigError("--baseline guardrail needs --guardrail-topic TEXT (what to refuse)")
            out.append(GuardrailTarget(target, topic=args.guardrail_topic, name=f"{target.name}+guardrail"))
        else:
            ref = load_eval_set(args.filter_reference, "filter reference") if args.filter_reference else sets["forget"]
            out.append(EmbeddingFilterTarget(target, [it.question for it in ref.items],
                                             quantile=args.filter_quantile, name=f"{target.name}+embedding-filter"))
    return out


def _run(args) -> int:
    from ..eval.harness import EvalConfig, evaluate
    from ..eval.report import write_report

    if not args.forget or not args.retain or not args.out:
        raise UnlearnConfigError("serve-unlearn eval needs --forget, --retain and --out (or a subcommand: "
                                 "compare, verify)")
    config = EvalConfig.from_yaml(args.config, max_new_tokens=args.max_new_tokens) if args.config else \
        EvalConfig.validate_dict({k: v for k, v in {"max_new_tokens": args.max_new_tokens}.items() if v is not None},
                                 "command line")
    sets = _sets(args)  # bad data fails before any model loads
    target = _target(args)
    results = []
    try:
        for t in [target, *_baselines(args, target, sets)]:
            results.append(evaluate(t, sets, config, progress=not args.quiet))
    finally:
        target.close()
    paths = write_report(args.out, results)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def _compare(args) -> int:
    from ..eval.report import merge_reports, write_report

    paths = write_report(args.compare_out, merge_reports(args.reports))
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def _verify(args) -> int:
    from ..eval.verification import verify_record_file

    doc = verify_record_file(args.record)
    print(json.dumps({"verified": True, "passed": doc.get("passed"), "flagged": doc.get("flagged"),
                      "request": doc.get("request"), "created_at": doc.get("created_at")}, indent=2))
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate forgetting on a model, a registry or an endpoint; reports",
                       description="Evaluate forgetting on one target (and baselines around it): report.json, "
                       "report.md and report.html in --out. Subcommands: compare (join reports), verify (a signed "
                       "verification record).")
    p.add_argument("--forget", help="forget set: JSONL/JSON records with question (or prompt) and answer(s)")
    p.add_argument("--retain", help="retain set (what must still be answered)")
    p.add_argument("--holdout", help="non-members for membership inference (forget vs holdout AUC)")
    p.add_argument("--set", action="append", metavar="NAME=FILE", help="another named set (repeatable)")
    p.add_argument("--out", help="folder for report.json, report.md, report.html")
    p.add_argument("--endpoint", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", help="with --endpoint: the served model name")
    p.add_argument("--tokenizer", help="with --endpoint: a tokenizer folder (its chat template) to score answer "
                   "probabilities; default --model when it is a folder")
    p.add_argument("--api-key-env", default="VLLM_API_KEY", help="environment variable with the endpoint's API key")
    p.add_argument("--concurrency", type=int, default=4, help="endpoint requests in flight")
    p.add_argument("--model-dir", help="a local checkpoint folder (transformers)")
    p.add_argument("--patch", action="append", help="a weight patch applied to --model-dir (repeatable, in order)")
    p.add_argument("--registry", help="with --model-dir: O3 through the transformers GatedGenerator")
    p.add_argument("--gate-config", help="YAML GateConfig for --registry")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--name", help="the target's name in the report")
    p.add_argument("--baseline", action="append", choices=["guardrail", "embedding-filter"],
                   help="also evaluate this baseline wrapped around the same target (repeatable)")
    p.add_argument("--guardrail-topic", help="what the guardrail's system prompt tells the model to refuse")
    p.add_argument("--filter-reference", help="the embedding filter's reference prompts (the forget request's data); "
                   "default --forget")
    p.add_argument("--filter-quantile", type=float, default=0.05,
                   help="threshold: this quantile of the reference prompts' leave-one-out nearest cosine")
    p.add_argument("--config", help="YAML EvalConfig (max_new_tokens, batch_size, probabilities, min_k, n_boot, ...)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)
    esub = p.add_subparsers(dest="eval_command")
    c = esub.add_parser("compare", help="join reports of separate runs into one side-by-side report")
    c.add_argument("reports", nargs="+", help="report folders or report.json files")
    c.add_argument("--out", required=True, dest="compare_out", metavar="DIR", help="folder for the joined report")
    c.set_defaults(func=_compare)
    v = esub.add_parser("verify", help="check a signed verification record (key: $SERVE_UNLEARN_SIGNING_KEY)")
    v.add_argument("record", help="the record's JSON file")
    v.set_defaults(func=_verify)

