"""``serve-unlearn vllm --model DIR --registry DIR [--config FILE] [--dry-run] [-- extra vllm serve args]``."""

from __future__ import annotations

import argparse


def _vllm(args) -> int:
    from ..serving.vllm.launcher import launch

    extra = list(args.vllm_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return launch(args.model, args.registry, args.config, extra_args=extra, dry_run=args.dry_run)


def add_vllm_parser(sub) -> None:
    v = sub.add_parser("vllm", help="run `vllm serve` with O3 routing, the scaled adapter bank and weight patches",
                       description="Builds and runs the whole `vllm serve` command: --enable-lora and the bank "
                       "(--lora-modules), --middleware serve_unlearn.serving.vllm.O3Middleware, --load-format "
                       "serve_unlearn for the config's patches, and the environment they need.")
    v.add_argument("--model", required=True, help="HF folder of the base model")
    v.add_argument("--registry", required=True, help="forget-request registry folder (created when missing)")
    v.add_argument("--config", help="YAML VllmServeConfig, e.g. configs/vllm.yaml")
    v.add_argument("--dry-run", action="store_true", help="print the command and environment; start nothing")
    v.add_argument("vllm_args", nargs=argparse.REMAINDER, help="after --: passed to `vllm serve` unchanged")
    v.set_defaults(func=_vllm)
