"""A per-sample LoRA scale inside one batch, for transformers + peft: h' = W0·h + w_b·ΔW·h on every position.

peft scales adapters per layer for the whole batch; O3 needs one weight per prompt. A forward hook on each
``lora_B[adapter]`` multiplies that branch's output by its row's weight, which is exactly O3's
``result + w·lora_out`` (rows with w = 0 add an exact zero, so they equal the base model bit for bit). Hooks
leave the module tree and state-dict keys untouched, and batch order is stable through KV-cached decoding;
beams and ``num_return_sequences`` repeat each prompt's weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


class PerSampleLoraScale:
    """Installs the hooks once; :meth:`scaled` sets the weights for one call."""

    def __init__(self, peft_model: nn.Module, adapter: str):
        from peft.tuners.lora import LoraLayer

        self.model = peft_model
        self.adapter = adapter
        self._scales: torch.Tensor | None = None
        self._handles = [m.lora_B[adapter].register_forward_hook(self._hook)
                         for m in peft_model.modules() if isinstance(m, LoraLayer) and adapter in m.lora_B]
        if not self._handles:
            raise ValueError(f"the model has no LoRA layers for adapter {adapter!r}")

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        scales = self._scales
        if scales is None:
            raise RuntimeError("a per-sample-scaled LoRA ran outside PerSampleLoraScale.scaled(); "
                               "wrap the forward/generate call in it")
        rows = output.shape[0]
        if rows != scales.shape[0]:
            if rows % scales.shape[0]:
                raise RuntimeError(f"batch of {rows} rows does not expand {scales.shape[0]} per-sample scales")
            scales = scales.repeat_interleave(rows // scales.shape[0])
        return output * scales.to(device=output.device, dtype=output.dtype).view(-1, *([1] * (output.dim() - 1)))

    @contextlib.contextmanager
    def scaled(self, scales: Sequence[float] | torch.Tensor) -> Iterator[None]:
        """Run the adapter at ``scales[b]`` for batch row b. All zeros skip the adapter entirely."""
        scales = torch.as_tensor(scales, dtype=torch.float32).reshape(-1)
        if bool((scales == 0).all()):
            with self.model.disable_adapter():
                yield
            return
        self._scales = scales
        try:
            yield
        finally:
            self._scales = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
