"""The detector's backbone: loading it, fingerprinting it, and one in-memory copy shared by many detectors' LoRAs.

:class:`SharedEncoder` runs the backbone once per batch for every detector on it (a peft mixed batch above the
lowest LoRA) and returns masked-mean-pooled features of every layer.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import ArtifactError, UnlearnConfigError
from .config import DetectorConfig

BASE = "__base__"    # peft's name for "no adapter" in a mixed batch


def encoder_of(model: nn.Module) -> nn.Module:
    """The bare encoder inside a model with a head (``BertForMaskedLM.bert``), or the model itself."""
    return getattr(model, "base_model", model)


def _layer_list(encoder: nn.Module) -> tuple[str, nn.ModuleList]:
    """The encoder's transformer blocks: the first ModuleList with ``num_hidden_layers`` entries."""
    n = encoder.config.num_hidden_layers
    for name, module in encoder.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise UnlearnConfigError(f"cannot find the {n} transformer layers of {type(encoder).__name__}; "
                             "the detector needs a BERT-style encoder (e.g. MiniLM, BERT, RoBERTa)")


def backbone_path(config: DetectorConfig) -> str:
    if config.backbone is not None:
        return config.backbone
    from ...models.packaged import minilm_path

    return str(minilm_path())


def load_backbone(config: DetectorConfig) -> tuple[nn.Module, nn.Module, Any]:
    """(model, encoder, tokenizer). The model carries an MLM head when the checkpoint has one; else model is
    the encoder. float32: the detector's statistics are fitted in float64 from these features."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

    path = backbone_path(config)
    try:
        hf_config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        mlm = any(a.endswith("ForMaskedLM") for a in (hf_config.architectures or []))
        cls = AutoModelForMaskedLM if mlm else AutoModel
        model = cls.from_pretrained(path, dtype=torch.float32).to(config.device).eval()
    except (OSError, ValueError) as exc:
        raise UnlearnConfigError(f"cannot load the detector backbone {path!r}: {exc}") from exc
    if tokenizer.mask_token_id is None:
        raise UnlearnConfigError(f"the tokenizer of {path!r} has no mask token; the detector's masked views need one")
    return model, encoder_of(model), tokenizer


def backbone_fingerprint(encoder: nn.Module) -> str:
    """sha256 over the encoder's architecture and a strided sample (<= 1024 values) of every weight in its
    embeddings and layers. LoRA weights and peft's ``base_layer`` wrapping are ignored, and so is a pooler (MLM
    checkpoints have none), so the same checkpoint matches however it was loaded; another checkpoint, a
    fine-tuned one or another dtype does not."""
    cfg = encoder.config
    arch = {k: getattr(cfg, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                               "num_attention_heads", "intermediate_size", "vocab_size")}
    h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    params = {n.replace(".base_layer.", "."): p for n, p in encoder.named_parameters()
              if "lora_" not in n and not n.startswith("pooler.")}
    for name in sorted(params):
        flat = params[name].detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)][:1024].cpu().contiguous()
        h.update(f"{name}|{tuple(params[name].shape)}|{sample.dtype}|".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """What the ensemble compares so that all its detectors can share one tokenization."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class SharedEncoder:
    """One backbone in memory carrying the LoRAs of any number of detectors (a peft multi-adapter model).

    Detectors loaded onto the same backbone object share one ``SharedEncoder``; each owns one adapter, removed when the
    detector is garbage-collected (the backbone is restored in place when the last one goes). A lock serialises
    forwards, because peft's mixed-batch routing is installed as hooks on the shared modules.
    """

    _live: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()  # encoder -> weakref to SharedEncoder

    def __init__(self, encoder: nn.Module):
        self.encoder = encoder
        self.peft = None
        self.layers_name, self.layers = _layer_list(encoder)
        self.lock = threading.RLock()
        self._ids = itertools.count()
        self._fingerprint: str | None = None
        self._lora_modules: list[tuple[int, nn.Module]] | None = None

    @classmethod
    def of(cls, encoder: nn.Module) -> SharedEncoder:
        ref = cls._live.get(encoder)
        holder = ref() if ref is not None else None
        if holder is None:
            holder = cls(encoder)
            cls._live[encoder] = weakref.ref(holder)
        return holder

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = backbone_fingerprint(self.encoder)
        return self._fingerprint

    def lora_modules(self) -> list[tuple[int, nn.Module]]:
        """(layer index, module) of every LoRA-carrying module in the encoder's layers."""
        if self._lora_modules is None:
            from peft.tuners.lora import LoraLayer

            self._lora_modules = [(i, m) for i, layer in enumerate(self.layers) for m in layer.modules()
                                  if isinstance(m, LoraLayer)]
        return self._lora_modules

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def add(self, config, state: dict[str, torch.Tensor] | None = None) -> str:
        """Add a LoRA (initialised, or with ``state``: peft's saved keys) and return its adapter name."""
        from peft import get_peft_model, set_peft_model_state_dict

        with self.lock:
            self._lora_modules = None
            name = f"detector{next(self._ids)}"
            if self.peft is None:
                self.peft = get_peft_model(self.encoder, config, adapter_name=name)
            else:
                self.peft.add_adapter(name, config)
            self.peft.eval()
            if state is None:
                return name
            try:
                result = set_peft_model_state_dict(self.peft, state, adapter_name=name)
                missing = [k for k in result.missing_keys if f".{name}." in k]
                if missing or result.unexpected_keys:
                    raise ArtifactError(f"the LoRA does not fit this backbone: missing {missing[:3]}, "
                                        f"unexpected {list(result.unexpected_keys)[:3]}")
            except (RuntimeError, ValueError) as exc:  # a shape mismatch is a RuntimeError
                self.remove(name)
                raise exc if isinstance(exc, ArtifactError) else ArtifactError(
                    f"the LoRA does not fit this backbone: {exc}") from exc
            return name

    def lora_state(self, name: str) -> tuple[Any, dict[str, torch.Tensor]]:
        from peft import get_peft_model_state_dict

        return self.peft.peft_config[name], get_peft_model_state_dict(self.peft, adapter_name=name)

    def remove(self, name: str) -> None:
        if name == BASE or self.peft is None:
            return
        with self.lock, warnings.catch_warnings():
            self._lora_modules = None
            warnings.simplefilter("ignore")  # peft warns when the deleted adapter was the active one
            self.peft.delete_adapter(name)
            if not self.peft.peft_config:
                self.peft.unload()  # puts the original linear layers back into the encoder
                self.peft = None

    @contextmanager
    def training(self, name: str) -> Iterator[nn.Module]:
        """The peft model with only ``name`` active and trainable, in train mode, for the duration."""
        with self.lock:
            self.peft.set_adapter(name)
            self.peft.train()
            try:
                yield self.peft
            finally:
                self.peft.eval()

    @torch.no_grad()
    def pooled(self, enc: dict[str, torch.Tensor], adapters: Sequence[str], split: int) -> torch.Tensor:
        """(T, L, n, d) masked-mean-pooled outputs of every layer, one slice per adapter in ``adapters``.

        Layers below ``split`` carry no LoRA of any of these adapters, so they run once on the n rows; at layer
        ``split`` the hidden states (and every per-row input of the layer, e.g. the attention mask) are repeated
        T times and each copy goes through its own LoRA as one peft mixed batch. Each LoRA layer is told its
        rows' adapters directly (peft's ``adapter_names=`` would hand one list to every layer, including those
        below the split, and walks all modules on every call).
        """
        n, t_count = enc["input_ids"].shape[0], len(adapters)
        expand = t_count > 1 and split < self.num_layers
        mask = enc["attention_mask"]
        pooled: list[torch.Tensor | None] = [None] * self.num_layers

        def repeat(v):
            # per-row tensors (hidden states, masks) only; 1-D ones such as cache positions are per-token
            if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == n:
                return v.repeat(t_count, *([1] * (v.dim() - 1)))
            return v

        def expand_rows(_module, args, kwargs):
            return tuple(repeat(a) for a in args), {k: repeat(v) for k, v in kwargs.items()}

        def capture(index):
            def hook(_module, _args, output):
                h = output[0] if isinstance(output, tuple) else output
                pooled[index] = masked_mean_pool(h, mask if h.shape[0] == n else mask.repeat(t_count, 1))
            return hook

        def route(names):
            def hook(_module, args, kwargs):
                return args, {**kwargs, "adapter_names": names}
            return hook

        # rows' adapters per LoRA layer: below the split none of these adapters has a LoRA, so the base model
        lower = [BASE] * n if expand else [adapters[0]] * n
        upper = [a for a in adapters for _ in range(n)] if expand else lower
        with self.lock:  # the hooks below live on shared modules
            handles = [layer.register_forward_hook(capture(i)) for i, layer in enumerate(self.layers)]
            handles += [module.register_forward_pre_hook(route(upper if i >= split else lower), with_kwargs=True)
                        for i, module in self.lora_modules()]
            if expand:
                handles += [layer.register_forward_pre_hook(expand_rows, with_kwargs=True)
                            for layer in list(self.layers)[split:]]
            try:
                self.encoder(**enc)
            finally:
                for handle in handles:
                    handle.remove()
        out = [p.reshape(t_count, n, -1) if p.shape[0] != n else p.expand(t_count, n, -1) for p in pooled]
        return torch.stack(out, dim=1).float().cpu()


def masked_mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)


def pooled_features(holder: SharedEncoder, tokenizer, max_length: int, adapters: Sequence[str], split: int,
            texts: list[str], batch_size: int) -> torch.Tensor:
    """(T, L, n, d) pooled features of ``texts`` for each adapter, in batches of ``batch_size`` texts."""
    if batch_size < 1:
        raise UnlearnConfigError(f"batch_size must be >= 1, got {batch_size}")
    parts = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        parts.append(holder.pooled({k: v.to(holder.device) for k, v in enc.items()}, adapters, split))
    if not parts:
        dim = holder.encoder.config.hidden_size
        return torch.zeros(len(adapters), holder.num_layers, 0, dim)
    return torch.cat(parts, dim=2)
