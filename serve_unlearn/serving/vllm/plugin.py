"""Entry point of the ``vllm.general_plugins`` group.

vLLM calls ``register()`` in every process it starts (API server, engine core, workers), possibly more than once,
so it is idempotent and imports vLLM only when called.
"""

from __future__ import annotations

import logging

from .contract import LOAD_FORMAT

logger = logging.getLogger(__name__)
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader

    from .loader import PatchingModelLoader

    register_model_loader(LOAD_FORMAT)(PatchingModelLoader)
    _registered = True
    logger.debug("serve-unlearn: registered vLLM load format %r", LOAD_FORMAT)
