"""``--load-format serve_unlearn``: vLLM's default loader with weight patches applied to checkpoint tensors.

Patches are applied as the tensors stream out of the safetensors files, in checkpoint coordinates and names,
before the model's ``load_weights`` fuses q/k/v or gate/up and slices for tensor parallelism, so one patch works
for every parallel layout. Each touched tensor is verified against the patch's base digest first; a patch for
another model stops the engine with :class:`~serve_unlearn.errors.PatchMismatchError`.

Flags::

    vllm serve BASE --load-format serve_unlearn \\
        --model-loader-extra-config '{"patches": ["a.patch.safetensors"], "overlap": "last"}'
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Generator

import torch
from torch import nn
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

from ...errors import PatchMismatchError
from ...patches import WeightPatch, stack_patches
from ...patches.apply import apply_to_tensor
from .loader_config import parse_loader_config

logger = logging.getLogger(__name__)


class PatchingModelLoader(DefaultModelLoader):
    def __init__(self, load_config: LoadConfig):
        config = parse_loader_config(load_config.model_loader_extra_config)
        super().__init__(dataclasses.replace(load_config, load_format=config.inner_load_format,
                                             model_loader_extra_config=config.rest))
        self.patch: WeightPatch | None = (stack_patches(config.patches, overlap=config.overlap)
                                          if config.patches else None)
        if self.patch is None:
            logger.warning("serve-unlearn load format used without patches: serving the base weights")

    def get_all_weights(self, model_config, model: nn.Module) -> Generator[tuple[str, torch.Tensor], None, None]:
        patch = self.patch
        if patch is None:
            yield from super().get_all_weights(model_config, model)
            return
        pending = set(patch.tensor_names)
        spent = 0.0
        for name, tensor in super().get_all_weights(model_config, model):
            if name in pending:
                t0 = time.perf_counter()
                # a copy: the streamed tensor may be a view of the memory-mapped checkpoint
                tensor = tensor.clone()
                apply_to_tensor(name, tensor, patch)
                pending.discard(name)
                spent += time.perf_counter() - t0
            yield name, tensor
        if pending:
            raise PatchMismatchError(
                f"{len(pending)} patch tensors are not in the checkpoint {model_config.model!r} "
                f"(first: {min(pending)!r}): the patch was made for another model"
            )
        logger.info("serve-unlearn: applied patch %s (%d tensors) in %.2f s",
                    patch.patch_id, len(patch.tensor_names), spent)
