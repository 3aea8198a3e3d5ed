"""``serve-unlearn``: one command, a subcommand per job.

    serve-unlearn salun --model DIR --forget F [--retain F] --out P.patch.safetensors [--config YAML]
    serve-unlearn iau   --model DIR --forget F --retain F --out P.patch.safetensors [--config YAML]
    serve-unlearn patch create|inspect|verify|apply|revert|materialize ...
    serve-unlearn o3 forget|retire|score|list ...
    serve-unlearn erase --model DIR --image IN --mask MASK --out OUT
    serve-unlearn vllm --model DIR --registry DIR [--config YAML] [-- vllm serve args]
    serve-unlearn serve --config YAML [--host H] [--port P] [--engine embedded|ray]
    serve-unlearn worker --config YAML

One module per command group registers its parser (``add_*_parser``) and runs it; each imports the heavy
libraries only when its command runs. Errors a user can cause print one line (``error: ...``) and exit with
status 2.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import ServeUnlearnError
from .erase import add_erase_parser
from .eval import add_eval_parser
from .methods import add_method_parsers
from .o3 import add_o3_parser
from .patch import add_patch_parser
from .serve import add_serve_parser
from .vllm import add_vllm_parser

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve-unlearn", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    add_method_parsers(sub)
    add_patch_parser(sub)
    add_o3_parser(sub)
    add_erase_parser(sub)
    add_vllm_parser(sub)
    add_serve_parser(sub)
    add_eval_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ServeUnlearnError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
