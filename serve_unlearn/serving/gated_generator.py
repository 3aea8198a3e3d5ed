"""O3 serving on transformers + peft: every prompt in a batch gets its own unlearning-LoRA scale.

``GatedGenerator(model, tokenizer, registry).generate(prompts)`` scores each prompt with the gate, then runs
one batched ``generate`` in which row b computes h' = W0·h + w_b·ΔW·h at every position (prompt and generated
tokens), exactly as O3. It returns the texts and the gate's decisions, so callers can log or audit the weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters.gate import Gate, GateConfig, GateDecision, Prompt
from ..adapters.orthogonal_lora import check_adapter_base
from ..adapters.served import load_gate, served_adapter
from ..errors import ArtifactError, GateInputError
from ..registry import ForgetRegistry
from .per_sample_lora import PerSampleLoraScale

logger = logging.getLogger(__name__)
ADAPTER = "o3"


@dataclass(frozen=True)
class GatedGeneration:
    texts: list[str]
    decisions: list[GateDecision]

    @property
    def weights(self) -> list[float]:
        """The LoRA scale each prompt was generated with."""
        return [d.scale for d in self.decisions]


class GatedGenerator:
    """Holds the base model with the registry's served adapter and a gate; :meth:`refresh` picks up new requests."""

    def __init__(self, model, tokenizer, registry: ForgetRegistry | None, gate_config: GateConfig | None = None):
        self.base = model
        self.tokenizer = tokenizer
        self.registry = registry
        self.gate_config = gate_config or GateConfig()
        self.model = model
        self._scaler: PerSampleLoraScale | None = None
        self.gate: Gate | None = None
        self.generation: int | None = None
        self.refresh()

    @classmethod
    def from_folders(cls, model, tokenizer, detector_dirs: str | os.PathLike | Sequence[str | os.PathLike],
                     adapter_dir: str | os.PathLike | None, gate_config: GateConfig | None = None,
                     names: Sequence[str] | None = None) -> GatedGenerator:
        """A generator over artifact folders that are not (yet) served from a registry: a forget request's staging
        folders, evaluated before the request is put in force. ``detector_dirs``: one detector folder, or every
        request's (the earlier ones and the new one, in registry order); ``adapter_dir``: the adapter to serve
        with them (the new request's ``served`` folder). The folders are read as they are: verifying them
        against a manifest is the registry's job. :meth:`refresh` does nothing on such a generator."""
        from ..adapters.detector import DetectorEnsemble
        from ..adapters.served import check_reach

        dirs = ([Path(detector_dirs)] if isinstance(detector_dirs, (str, os.PathLike))
                else [Path(d) for d in detector_dirs])
        names = list(names) if names is not None else [f"{i}:{d.parent.name}/{d.name}" for i, d in enumerate(dirs)]
        if len(names) != len(dirs):
            raise ArtifactError(f"{len(names)} names for {len(dirs)} detector folders")
        gen = cls(model, tokenizer, None, gate_config)
        if dirs:
            ensemble = DetectorEnsemble.load(dirs)
            check_reach(names, ensemble.detectors, gen.gate_config)
            gate = Gate(ensemble.weights, names, gen.gate_config)
        else:
            gate = Gate(lambda texts: None, [], gen.gate_config)
        gen._install(Path(adapter_dir) if adapter_dir is not None else None, gate, None)
        return gen

    def refresh(self) -> bool:
        """Reload the adapter and detectors if the registry changed since the last load; True when it did."""
        if self.registry is None:
            if self.gate is None:
                self.gate = Gate(lambda texts: None, [], self.gate_config)
            return False
        generation = self.registry.generation
        if generation == self.generation:
            return False
        adapter_dir = served_adapter(self.registry, up_to_version=generation)
        gate = load_gate(self.registry, self.gate_config, up_to_version=generation)
        self._install(adapter_dir, gate, generation)
        return True

    def _install(self, adapter_dir: Path | None, gate: Gate, generation: int | None) -> None:
        if adapter_dir is not None:
            check_adapter_base(adapter_dir, self.base)
        self._drop_adapter()
        if adapter_dir is not None:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.base, str(adapter_dir), adapter_name=ADAPTER)
            self.model.eval()
            self._scaler = PerSampleLoraScale(self.model, ADAPTER)
        if self.gate is not None:
            self.gate.close()
        self.gate, self.generation = gate, generation
        logger.info("gated generator: registry generation %s, adapter %s", generation, adapter_dir)

    def scaled(self, scales: Sequence[float]):
        """A context in which row b of any forward pass runs the adapter at ``scales[b]`` (e.g. to score answer
        log-probabilities with the scales the gate chose); a no-op without an adapter."""
        return self._scaler.scaled(list(scales)) if self._scaler is not None else contextlib.nullcontext()

    def close(self) -> None:
        """Take the adapter out of the base model (``model`` is the caller's again, as it was) and stop the gate."""
        self._drop_adapter()
        if self.gate is not None:
            self.gate.close()

    def _drop_adapter(self) -> None:
        if self._scaler is not None:
            self._scaler.remove()
            self.base = self.model.unload()
            self.model, self._scaler = self.base, None

    def _render(self, prompt: Prompt) -> tuple[str, bool]:
        """(text, is_chat): chat messages go through the tokenizer's chat template, strings are used as is."""
        if isinstance(prompt, str):
            return prompt, False
        try:
            return self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True), True
        except Exception as exc:
            raise GateInputError(f"cannot render chat messages with the tokenizer's chat template: {exc}") from exc

    def _encode(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        rows = []
        for p in prompts:
            text, chat = self._render(p)
            rows.append(tok(text, add_special_tokens=not chat)["input_ids"])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row ends where generation starts
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            attn[i, width - len(r):] = 1
        return {"input_ids": ids, "attention_mask": attn}

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int = 64, **generate_kwargs) -> GatedGeneration:
        """Greedy by default; other ``generate`` keyword arguments pass through."""
        if isinstance(prompts, str):
            raise GateInputError("generate() takes a list of prompts; wrap a single prompt in a list")
        decisions = self.gate.decide(prompts)
        if not decisions:
            return GatedGeneration([], [])
        enc = self._encode(prompts)
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        kwargs = {"do_sample": False, "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                  **generate_kwargs}
        scales = [d.scale for d in decisions]
        if self._scaler is None:
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, **kwargs)
        else:
            with self._scaler.scaled(scales):
                out = self.model.generate(**enc, max_new_tokens=max_new_tokens, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        n = out.shape[0] // len(prompts)
        if n > 1:  # num_return_sequences: repeat each decision for its sequences
            decisions = [d for d in decisions for _ in range(n)]
        return GatedGeneration(texts, decisions)
