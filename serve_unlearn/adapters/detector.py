"""O3's per-request out-of-distribution detector: does a prompt look like the data of this forget request?

Method (O3, "unlearning knowledge detection"; see ``shared/research/o3_serving.md`` §1):

1. An encoder backbone (default: the packaged all-MiniLM-L6-v2; any HF encoder such as roberta-large by path) gets a
   LoRA on query/key/value, trained with O3's contrastive entropy loss (CEL): for each layer after the embeddings,
   the softmax over a batch of raw dot products between the pooled hidden states of an MLM-masked *query* view
   (LoRA on) and of the clean *key* view (the frozen backbone) is pushed to low entropy. The frozen key encoder is
   the same model with its LoRA disabled, so there is no second copy. Where the backbone has an MLM head (e.g.
   roberta-large) the MLM loss on the query view is added 1:1, as O3; MiniLM ships without an MLM head, so there
   the CEL is the whole loss (a random head would only teach the LoRA to fit noise).
2. Per layer, the fine-tuned encoder's pooled hidden states give a glocal score (``glocal``): a Gaussian
   log-density with a Ledoit-Wolf precision plus gamma times the nearest-neighbour cosine to the forget texts
   (less the nearest-neighbour cosine to a background of ordinary prompts: a deviation, below).
3. A linear one-class SVM turns the per-layer scores into d_H, higher = more like the forget data.
4. d_H is calibrated into w_raw in (0, 1) on a held-out part of the forget data only (never retained data).

Deviations from the reference code, each for a reason:

- *Masked mean pooling* over real tokens (the reference averages over all 512 padded positions, so its features
  depend on the prompt's length).
- *All layers after the embeddings* are scored, and the CEL covers them all (the reference uses roberta-large's
  first 12 of 24).
- *Shrinkage covariance* (Ledoit-Wolf) instead of the empirical one: a request has tens of texts and d >= 384.
- *The local term is added*, not subtracted: the reference writes ``g - gamma*cos``, but a linear one-class SVM's
  weights are a non-negative combination of the training score vectors, so with ``-gamma*cos`` a closer nearest
  neighbour *lowers* d_H while a higher density raises it, and the terms cancel (AUROC 0.57 on our chemistry
  sample, 0.994 with ``+``). For the same reason the SVM sees the scores translated so that the least is positive
  (``glocal.LinearOCSVM``).
- *A background of ordinary prompts* (``DetectorConfig.background``; default: 480 packaged prompts over 48
  domains, none of them close to our evaluation data): the local term is the nearest forget text's cosine *minus*
  the nearest background prompt's, so a prompt that shares only the forget data's question template ("What is a
  group of stars called?" against "What is a group of crows called?") is not taken for the topic. On our two
  SmolLM2 requests this cut retain prompts above w_raw 0.3 from 6-9% to 0-3% and raised held-out paraphrases
  above 0.45 from 86-87% to 96% (``glocal``). ``background: null`` is O3's purely one-class score.
- *Out-of-fold scores* for fitting the SVM and for mu1 (``glocal.crossfit_parts``): in-sample, each text is its
  own nearest neighbour and sits inside its own Gaussian, which no new prompt does.
- *A one-sided test*: p(d) = 1 for d >= x0, so a prompt more typical than the forget data is never down-weighted
  (the reference's two-sided test did), and w_raw is monotone non-decreasing in d_H.
- *LoRA on the top layer only* by default (``DetectorConfig.lora_layers``; ``None`` = every layer as O3), so an
  ensemble runs the layers below once for all requests (see :class:`DetectorEnsemble`). On MiniLM with a few
  dozen texts the CEL-trained LoRA moves AUROC by less than 0.002 either way; the glocal score does the work.

Data needed: at least 12 distinct forget texts with the defaults (``MIN_CALIBRATION`` = 4 held out to calibrate,
``MIN_FIT`` = 8 to fit the LoRA, the Gaussians and the SVM); a few dozen give a useful detector.

Artifacts are safetensors + JSON only, with a sha256 of every file: ``detector.json``, ``stats.safetensors``,
``lora/`` (a peft adapter folder; absent when ``lora_layers`` is 0) and ``tokenizer/``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import StrictConfig
from ..errors import ArtifactError, GateInputError, UnlearnConfigError, UnlearnDataError
from .glocal import Calibration, LayerStats, LinearOCSVM, crossfit_parts

logger = logging.getLogger(__name__)

FORMAT = "serve-unlearn-o3-detector"
FORMAT_VERSION = 1
MIN_CALIBRATION = 4  # held-out texts: mu2 and sigma2 need a few points
MIN_FIT = 8          # fitted texts: the cross-fitted Gaussians and the SVM need a few points per fold
BASE = "__base__"    # peft's name for "no adapter" in a mixed batch
BACKGROUND_FILE = "background_prompts.txt"  # packaged next to this module
BACKGROUND_MIN = 16  # ordinary prompts: fewer say little about what ordinary traffic looks like
_LOG_EPS = 1e-5      # the reference's log(Δ + 1e-5)


class DetectorConfig(StrictConfig):
    """Detector hyperparameters; defaults are for MiniLM (6 layers, 384-d) on CPU and a few dozen forget texts."""

    backbone: str | None = Field(None, description="HF encoder folder or name; None = the packaged MiniLM")
    # O3's LoRA (r 8, alpha 32, dropout 0.1 on query/key/value)
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["query", "key", "value"], min_length=1)
    # LoRA on the top k layers only, so an ensemble runs the layers below once for all requests; None = every
    # layer (O3), 0 = no LoRA (the glocal score of the frozen backbone). 1 on MiniLM: AUROC equal to every layer's
    # on our sample data, while 5 requests cost ~1.7x one instead of ~2.3-4.8x (benchmarks/o3_gate_latency.py)
    lora_layers: int | None = Field(1, ge=0)
    # training: O3's TOFU lr (1e-4; its ScienceQA 1e-5 moves a LoRA too little in the few steps a small request
    # gives), batch 8, warm-up 6%, weight decay 0.01; 3 epochs because a request has tens of texts, not thousands
    epochs: int = Field(3, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(8, ge=2, description="the CEL contrasts the texts of one batch, so >= 2")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    max_length: int = Field(128, ge=8, description="tokens per text; prompts are questions, not documents")
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    # scoring: see `gamma` below; nu as O3's ScienceQA detector
    gamma: float = Field(
        4000.0, ge=0,
        description="weight of the nearest-neighbour cosine against the Gaussian log-density. On MiniLM the "
                    "log-density of new text moves by ~800 between the forget topic and other text (spread "
                    "~200) while the cosine moves by ~0.2 (spread ~0.05), so 4000 gives both terms about the "
                    "same pull")
    nu: float = Field(0.1, gt=0, le=1, description="one-class SVM: the fraction of forget texts allowed outside")
    background: str | None = Field(
        "builtin",
        description="ordinary prompts the local term is taken relative to (glocal): 'builtin' = the packaged "
                    f"{BACKGROUND_FILE} ({BACKGROUND_MIN}+ lines), a path to a text file with one prompt a line, "
                    "or None for O3's purely one-class score")
    cv_folds: int = Field(5, ge=2, description="folds for the out-of-fold scores the SVM and mu1 are fitted on")
    calibration_fraction: float = Field(0.2, gt=0, lt=1, description="held out for calibration (>= 4 texts)")
    zeta: float = Field(10.0, gt=0, description="w_raw = sigmoid(zeta p - 2); O3's default 10")
    seed: int = 0
    device: str = Field("cpu", description="where training runs, and where load() puts a backbone it loads")


# --------------------------------------------------------------------------------------------------- backbone

def _encoder_of(model: nn.Module) -> nn.Module:
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


def _backbone_path(config: DetectorConfig) -> str:
    if config.backbone is not None:
        return config.backbone
    from ..models.packaged import minilm_path

    return str(minilm_path())


def background_prompts(config: DetectorConfig) -> list[str] | None:
    """The background prompts named by ``config.background`` (None: none). UnlearnConfigError when the file is
    missing or has too few prompts."""
    if config.background is None:
        return None
    path = Path(__file__).with_name(BACKGROUND_FILE) if config.background == "builtin" else Path(config.background)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UnlearnConfigError(f"cannot read the detector background {path}: {exc}; give a UTF-8 text file "
                                 "with one prompt a line, 'builtin', or null for none") from exc
    prompts = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    if len(prompts) < BACKGROUND_MIN:
        raise UnlearnConfigError(f"the detector background {path} has {len(prompts)} distinct prompts; it needs "
                                 f"at least {BACKGROUND_MIN} (a few hundred varied ones work best)")
    return prompts


def _load_backbone(config: DetectorConfig) -> tuple[nn.Module, nn.Module, Any]:
    """(model, encoder, tokenizer). The model carries an MLM head when the checkpoint has one; else model is
    the encoder. float32: the detector's statistics are fitted in float64 from these features."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

    path = _backbone_path(config)
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
    return model, _encoder_of(model), tokenizer


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


class _Encoder:
    """One backbone in memory carrying the LoRAs of any number of detectors (a peft multi-adapter model).

    Detectors loaded onto the same backbone object share one ``_Encoder``; each owns one adapter, removed when the
    detector is garbage-collected (the backbone is restored in place when the last one goes). A lock serialises
    forwards, because peft's mixed-batch routing is installed as hooks on the shared modules.
    """

    _live: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()  # encoder -> weakref to _Encoder

    def __init__(self, encoder: nn.Module):
        self.encoder = encoder
        self.peft = None
        self.layers_name, self.layers = _layer_list(encoder)
        self.lock = threading.RLock()
        self._ids = itertools.count()
        self._fingerprint: str | None = None
        self._lora_modules: list[tuple[int, nn.Module]] | None = None

    @classmethod
    def of(cls, encoder: nn.Module) -> _Encoder:
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
                pooled[index] = _pool(h, mask if h.shape[0] == n else mask.repeat(t_count, 1))
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


# --------------------------------------------------------------------------------------------------- training

def _mask_tokens(input_ids: torch.Tensor, special: torch.Tensor, tokenizer, prob: float,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's MLM views: ``prob`` of the real tokens are chosen; 80% become [MASK], 10% a random token, 10% stay.
    Returns (masked ids, MLM labels with -100 where nothing was chosen)."""
    chosen = (torch.rand(input_ids.shape, generator=gen) < prob) & ~special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    masked = input_ids.clone()
    to_mask = chosen & (torch.rand(input_ids.shape, generator=gen) < 0.8)
    masked[to_mask] = tokenizer.mask_token_id
    to_random = chosen & ~to_mask & (torch.rand(input_ids.shape, generator=gen) < 0.5)
    masked[to_random] = torch.randint(len(tokenizer), input_ids.shape, generator=gen)[to_random]
    return masked, labels


def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)


def contrastive_entropy(query: Sequence[torch.Tensor], key: Sequence[torch.Tensor]) -> torch.Tensor:
    """O3's CEL: per layer, the mean over queries of the entropy of softmax_j(q_i . k_j), summed over layers
    (raw dot products, no temperature, ``log(Δ + 1e-5)``, as the reference)."""
    loss = query[0].new_zeros(())
    for q, k in zip(query, key):
        delta = torch.softmax(q @ k.T, dim=-1)
        loss = loss + (-(delta * torch.log(delta + _LOG_EPS)).sum(dim=-1)).mean()
    return loss


def _train_lora(holder: _Encoder, name: str, model: nn.Module, tokenizer, texts: list[str],
                config: DetectorConfig, progress: bool) -> list[float]:
    """Train one detector LoRA with CEL (+ MLM where ``model`` has a head); returns the mean loss per epoch."""
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    gen = torch.Generator().manual_seed(config.seed)
    has_head = model is not holder.encoder
    params = [p for p in holder.peft.parameters() if p.requires_grad]
    decay = [p for n, p in holder.peft.named_parameters() if p.requires_grad and "bias" not in n]
    no_decay = [p for n, p in holder.peft.named_parameters() if p.requires_grad and "bias" in n]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, eps=1e-6)
    # a batch of one has nothing to contrast: it is dropped (the reference drops every incomplete batch)
    per_epoch = len(texts) // config.batch_size + (len(texts) % config.batch_size > 1)
    sched = get_linear_schedule_with_warmup(optim, int(config.warmup_ratio * per_epoch * config.epochs),
                                            per_epoch * config.epochs)
    device = holder.device
    losses = []
    bar = tqdm(total=per_epoch * config.epochs, desc="detector LoRA", unit="step", disable=not progress)
    with holder.training(name) as peft_model:
        for _ in range(config.epochs):
            order = torch.randperm(len(texts), generator=gen).tolist()
            total = steps = 0
            for i in range(0, len(order), config.batch_size):
                batch = [texts[j] for j in order[i:i + config.batch_size]]
                if len(batch) < 2:
                    continue
                enc = tokenizer(batch, padding=True, truncation=True, max_length=config.max_length,
                                return_tensors="pt", return_special_tokens_mask=True)
                special = enc.pop("special_tokens_mask").bool() | ~enc["attention_mask"].bool()
                masked, labels = _mask_tokens(enc["input_ids"], special, tokenizer, config.mlm_probability, gen)
                enc = {k: v.to(device) for k, v in enc.items()}
                with torch.no_grad(), peft_model.disable_adapter():  # the frozen key encoder: LoRA off
                    holder.encoder.eval()
                    key_out = holder.encoder(**enc, output_hidden_states=True)
                    holder.encoder.train()
                keys = [_pool(h, enc["attention_mask"]) for h in key_out.hidden_states[1:]]
                if has_head:  # MLM head frozen (peft freezes everything but the LoRA); LoRA learns through it
                    out = model(input_ids=masked.to(device), attention_mask=enc["attention_mask"],
                                token_type_ids=enc.get("token_type_ids"), labels=labels.to(device),
                                output_hidden_states=True)
                    mlm = out.loss if bool((labels != -100).any()) else out.logits.new_zeros(())
                else:
                    out = holder.encoder(**{**enc, "input_ids": masked.to(device)}, output_hidden_states=True)
                    mlm = 0.0
                queries = [_pool(h, enc["attention_mask"]) for h in out.hidden_states[1:]]
                loss = contrastive_entropy(queries, keys) + mlm
                optim.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optim.step()
                sched.step()
                total, steps = total + loss.item(), steps + 1
                bar.update(1)
                bar.set_postfix(loss=f"{total / steps:.4f}")
            losses.append(total / max(steps, 1))
    bar.close()
    return losses


# --------------------------------------------------------------------------------------------------- detector

def _check_texts(texts: Sequence[str], error: type[Exception], what: str) -> list[str]:
    if isinstance(texts, str | bytes) or not isinstance(texts, Sequence):
        raise error(f"{what} must be a list of strings, not a {type(texts).__name__}")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise error(f"{what} must be strings; items {bad[:5]} are {type(texts[bad[0]]).__name__}")
    return list(texts)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class OODDetector:
    """One forget request's detector. Build with :meth:`train` or :meth:`load`; score with :meth:`weights`."""

    def __init__(self, *, config: DetectorConfig, tokenizer, holder: _Encoder, adapter: str, lora_start: int,
                 stats: LayerStats, svm: LinearOCSVM, calibration: Calibration, info: dict):
        self.config = config
        self.tokenizer = tokenizer
        self.lora_start = lora_start  # first layer with this detector's LoRA (num_layers: none)
        self.stats, self.svm, self.calibration = stats, svm, calibration
        self.info = info  # what training recorded (sizes, losses); saved in detector.json
        self._holder, self._adapter = holder, adapter
        self._finalizer = self._track()

    def _track(self) -> weakref.finalize:
        """Remove this detector's LoRA from the shared backbone when the detector is garbage-collected."""
        finalizer = weakref.finalize(self, self._holder.remove, self._adapter)
        finalizer.atexit = False  # nothing to tidy in a process that is ending
        return finalizer

    @property
    def backbone_fingerprint(self) -> str:
        return self._holder.fingerprint

    # ---------------------------------------------------------------------------------------- training

    @classmethod
    def train(cls, texts: Sequence[str], config: DetectorConfig | None = None, *,
              progress: bool = True) -> OODDetector:
        """Train on a forget request's texts, written as the gate will see prompts (e.g. bare questions).

        UnlearnDataError for fewer than 12 distinct texts, an empty text or an item that is not a string;
        UnlearnConfigError for a backbone or a background that does not load."""
        config = config or DetectorConfig()
        texts = [t.strip() for t in _check_texts(texts, UnlearnDataError, "forget texts")]
        distinct = len({t for t in texts if t})
        if distinct < MIN_CALIBRATION + MIN_FIT:
            raise UnlearnDataError(
                f"the detector needs at least {MIN_CALIBRATION + MIN_FIT} distinct non-empty forget texts "
                f"({MIN_FIT} to fit, {MIN_CALIBRATION} held out to calibrate); got {distinct}"
                + (" (the forget set is empty)" if not texts else ""))
        if any(not t for t in texts):
            raise UnlearnDataError("forget texts must not be empty strings")
        background = background_prompts(config)
        n_rest = max(MIN_CALIBRATION, round(config.calibration_fraction * len(texts)))
        if len(texts) - n_rest < MIN_FIT:
            raise UnlearnDataError(f"calibration_fraction {config.calibration_fraction} holds out {n_rest} of "
                                   f"{len(texts)} texts, leaving fewer than {MIN_FIT} to fit; lower it")
        with torch.random.fork_rng(devices=[]):  # the caller's RNG is left as it was
            torch.manual_seed(config.seed)
            model, encoder, tokenizer = _load_backbone(config)
            holder = _Encoder.of(encoder)
            order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(config.seed)).tolist()
            rest, used = [texts[i] for i in order[:n_rest]], [texts[i] for i in order[n_rest:]]
            n_layers = holder.num_layers
            k = n_layers if config.lora_layers is None else config.lora_layers
            if k > n_layers:
                raise UnlearnConfigError(f"lora_layers={k} but the backbone has {n_layers} layers")
            info: dict[str, Any] = {"n_fit": len(used), "n_calibration": len(rest),
                                    "mlm_loss": model is not encoder}
            adapter = BASE
            if k:
                from peft import LoraConfig

                lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                  target_modules=config.target_modules,
                                  layers_to_transform=list(range(n_layers - k, n_layers)) if k < n_layers else None,
                                  layers_pattern=holder.layers_name.rsplit(".", 1)[-1] if k < n_layers else None)
                adapter = holder.add(lora)
                info["loss_per_epoch"] = _train_lora(holder, adapter, model, tokenizer, used, config, progress)
            del model  # an MLM head is only needed for training
            detector = cls(config=config, tokenizer=tokenizer, holder=holder, adapter=adapter,
                           lora_start=n_layers - k, stats=None, svm=None, calibration=None, info=info)
            detector._fit(used, rest, background)
        cal = detector.calibration
        logger.info("detector trained on %d texts (%d held out): d_H mu1 %.4g, mu2 %.4g, sigma2 %.4g",
                    len(used), len(rest), cal.mu1, cal.mu2, cal.sigma2)
        return detector

    def _fit(self, used: list[str], rest: list[str], background: list[str] | None) -> None:
        """Fit the statistics, the SVM (on out-of-fold scores) and the calibration (on the held-out texts)."""
        c = self.config
        f_used, f_rest = self._features(used, 32), self._features(rest, 32)
        f_background = None if background is None else self._features(background, 32)
        self.info["background"] = None if background is None else {
            "prompts": len(background), "sha256": hashlib.sha256("\n".join(background).encode()).hexdigest()}
        g, cos = crossfit_parts(f_used, min(c.cv_folds, len(used)), c.seed, f_background)
        oof = g + c.gamma * cos
        self.svm = LinearOCSVM.fit(oof, c.nu)
        self.stats = LayerStats.fit(f_used, f_background)
        d_rest = self.svm.decision(self.stats.scores(f_rest, c.gamma))
        self.calibration = Calibration.fit(self.svm.decision(oof), d_rest, c.zeta)

    def _features(self, texts: list[str], batch_size: int) -> torch.Tensor:
        return _pooled(self._holder, self.tokenizer, self.config.max_length, [self._adapter], self.lora_start,
                       texts, batch_size)[0]

    # ---------------------------------------------------------------------------------------- scoring

    def scores(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """d_H per text: the one-class SVM's signed score, higher = more like the forget data."""
        texts = _check_texts(texts, GateInputError, "texts to score")
        return _d_h([self], self._features(texts, batch_size)[None])[0].numpy()

    def weights(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """Calibrated w_raw in (0, 1) per text, monotone non-decreasing in d_H."""
        return self.calibration.weights(torch.from_numpy(self.scores(texts, batch_size=batch_size))).numpy()

    # ---------------------------------------------------------------------------------------- artifacts

    def save(self, directory: str | Path) -> None:
        """Write the detector (safetensors + JSON, no pickle). detector.json goes last, so a save that died
        half-way is reported as missing by :meth:`load`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "detector.json").unlink(missing_ok=True)
        save_file({**{k: v.contiguous() for k, v in self.stats.tensors().items()}, "svm_coef": self.svm.coef},
                  out / "stats.safetensors")
        files = ["stats.safetensors"]
        if self._adapter != BASE:
            lora_config, state = self._holder.lora_state(self._adapter)
            (out / "lora").mkdir(exist_ok=True)
            lora_config.save_pretrained(out / "lora")
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                      out / "lora" / "adapter_model.safetensors")
            files += ["lora/adapter_config.json", "lora/adapter_model.safetensors"]
        tok_files = self.tokenizer.save_pretrained(out / "tokenizer")
        files += sorted(str(Path(f).relative_to(out)) for f in tok_files if Path(f).is_file())
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "config": self.config.model_dump(mode="json"),
            "backbone_fingerprint": self.backbone_fingerprint,
            "backbone": {"model_type": self._holder.encoder.config.model_type,
                         "name_or_path": getattr(self._holder.encoder, "name_or_path", None),
                         "num_layers": self._holder.num_layers},
            "lora_start": self.lora_start,
            "svm_offset": self.svm.offset,
            "svm_shift": self.svm.shift,
            "calibration": self.calibration.to_json(),
            "info": self.info,
            "files": {f: _sha256(out / f) for f in files},
        }
        tmp = out / "detector.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(out / "detector.json")

    @classmethod
    def load(cls, directory: str | Path, backbone: nn.Module | None = None) -> OODDetector:
        """Load a saved detector onto ``backbone`` (a transformers model; LoRA layers are injected into it in
        place, and removed when the last detector on it goes) or, by default, onto the backbone named in its
        config. ArtifactError when a file is missing or corrupt or the backbone is not the one it was trained on."""
        d = Path(directory)
        meta = _read_meta(d)
        try:
            config = DetectorConfig.model_validate(meta["config"])
            tensors = load_file(d / "stats.safetensors")
            background = tensors.get("background")
            stats = LayerStats(mean=tensors["mean"].double(), precision=tensors["precision"].double(),
                               bank=tensors["bank"].double(),
                               background=None if background is None else background.double())
            svm = LinearOCSVM(coef=tensors["svm_coef"].double(), offset=float(meta["svm_offset"]),
                              shift=float(meta.get("svm_shift", 0.0)))
            calibration = Calibration.from_json(meta["calibration"])
            lora_start, n_layers = int(meta["lora_start"]), int(meta["backbone"]["num_layers"])
            fingerprint = str(meta["backbone_fingerprint"])
            shapes_ok = (stats.mean.dim() == 2 and stats.mean.shape[0] == n_layers == svm.coef.shape[0]
                         and stats.precision.shape == (n_layers, stats.mean.shape[1], stats.mean.shape[1])
                         and stats.bank.shape[0] == n_layers and stats.bank.shape[2] == stats.mean.shape[1]
                         and (background is None or (background.dim() == 3 and background.shape[0] == n_layers
                                                     and background.shape[2] == stats.mean.shape[1])))
        except (KeyError, TypeError, ValueError, ValidationError, OSError, RuntimeError, SafetensorError) as exc:
            raise ArtifactError(f"detector {d} is corrupt: {type(exc).__name__}: {exc}") from exc
        if not shapes_ok:
            raise ArtifactError(f"detector {d} is corrupt: its statistics do not have consistent shapes")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(d / "tokenizer")
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"detector {d}: its tokenizer does not load: {exc}") from exc
        if backbone is None:
            backbone = _load_backbone(config)[1]
        holder = _Encoder.of(_encoder_of(backbone))
        if holder.fingerprint != fingerprint or holder.num_layers != n_layers:
            raise ArtifactError(
                f"detector {d} was trained on another backbone (fingerprint {fingerprint[:12]}, "
                f"{meta['backbone'].get('name_or_path')}) than the one given (fingerprint "
                f"{holder.fingerprint[:12]}, {getattr(holder.encoder, 'name_or_path', None)}): different "
                "weights, architecture or dtype; load it with the backbone it was trained on")
        adapter = BASE
        if lora_start < n_layers:
            from peft import LoraConfig

            try:
                lora = LoraConfig.from_pretrained(d / "lora")
                state = load_file(d / "lora" / "adapter_model.safetensors")
            except (OSError, ValueError, TypeError, SafetensorError) as exc:
                raise ArtifactError(f"detector {d}: its LoRA does not load: {exc}") from exc
            try:
                adapter = holder.add(lora, state)
            except ArtifactError as exc:
                raise ArtifactError(f"detector {d}: {exc}") from None
        return cls(config=config, tokenizer=tokenizer, holder=holder, adapter=adapter, lora_start=lora_start,
                   stats=stats, svm=svm, calibration=calibration, info=dict(meta.get("info", {})))

    def _rehome(self, holder: _Encoder) -> None:
        """Move this detector's LoRA onto another backbone object with the same fingerprint."""
        if holder is self._holder:
            return
        adapter = BASE
        if self._adapter != BASE:
            config, state = self._holder.lora_state(self._adapter)
            adapter = holder.add(config, {k: v.detach().clone() for k, v in state.items()})
        self._finalizer()  # removes the adapter from the old backbone now
        self._holder, self._adapter = holder, adapter
        self._finalizer = self._track()


def _read_meta(d: Path) -> dict:
    meta_path = d / "detector.json"
    if not meta_path.is_file():
        raise ArtifactError(f"no detector at {d}: {meta_path.name} is missing (was the save interrupted?)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"detector {d}: {meta_path.name} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{meta_path} is not a serve-unlearn detector")
    if meta.get("version") != FORMAT_VERSION:
        raise ArtifactError(f"{meta_path} has format version {meta.get('version')}; this serve-unlearn reads "
                            f"version {FORMAT_VERSION}")
    files = meta.get("files")
    if not isinstance(files, dict) or "stats.safetensors" not in files:
        raise ArtifactError(f"{meta_path} lists no artifact files")
    for name, digest in files.items():
        path = d / name
        if not path.is_file():
            raise ArtifactError(f"detector {d}: {name} is missing")
        if _sha256(path) != digest:
            raise ArtifactError(f"detector {d}: {name} is corrupt (its sha256 differs from the recorded one)")
    return meta


def _pooled(holder: _Encoder, tokenizer, max_length: int, adapters: Sequence[str], split: int,
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


def _d_h(detectors: Sequence[OODDetector], feats: torch.Tensor, split: int = 0) -> torch.Tensor:
    """(T, n) d_H of each detector on its slice of the (T, L, n, d) features.

    Below layer ``split`` no detector has a LoRA, so every slice holds the same features there; detectors trained
    on the same background share its nearest-neighbour cosines on those layers (computed once, not T times)."""
    shared: dict[str | None, torch.Tensor] = {}
    out = []
    for det, f in zip(detectors, feats):
        key = (det.info.get("background") or {}).get("sha256")
        if key is not None and split > 0 and key not in shared:
            shared[key] = det.stats.background_cos(f[:split])
        out.append(det.svm.decision(det.stats.scores(f, det.config.gamma, shared.get(key))))
    return torch.stack(out)


class DetectorEnsemble:
    """T detectors on ONE backbone in memory, scored with one shared encoder pass per batch.

    The layers below the lowest LoRA of any detector run once; from there the batch is repeated T times and each
    copy goes through its own detector's LoRA as a peft mixed batch. With O3's LoRA on every layer that is T
    times the encoder's work in one forward; with ``lora_layers=k`` only the top k layers are repeated. Detectors
    loaded onto different copies of the same backbone are moved onto the first one's.
    """

    def __init__(self, detectors: Sequence[OODDetector]):
        detectors = list(detectors)
        if not detectors:
            raise UnlearnConfigError("an ensemble needs at least one detector")
        first = detectors[0]
        for i, det in enumerate(detectors[1:], 1):
            if det.backbone_fingerprint != first.backbone_fingerprint:
                raise ArtifactError(f"detector {i} was trained on another backbone than detector 0 "
                                    f"({det.backbone_fingerprint[:12]} vs {first.backbone_fingerprint[:12]}); "
                                    "an ensemble shares one backbone")
            if (tokenizer_digest(det.tokenizer) != tokenizer_digest(first.tokenizer)
                    or det.config.max_length != first.config.max_length):
                raise ArtifactError(f"detector {i} tokenizes differently from detector 0 (tokenizer or "
                                    "max_length); an ensemble shares one tokenization")
        for det in detectors[1:]:
            det._rehome(first._holder)
        self.detectors = detectors
        self._split = min(det.lora_start for det in detectors)

    @classmethod
    def load(cls, directories: Sequence[str | Path], backbone: nn.Module | None = None) -> DetectorEnsemble:
        """Load saved detectors onto one backbone (loaded once; by default from the first detector's config)."""
        if not directories:
            raise UnlearnConfigError("an ensemble needs at least one detector")
        first = OODDetector.load(directories[0], backbone)
        rest = [OODDetector.load(d, first._holder.encoder) for d in directories[1:]]
        return cls([first, *rest])

    def scores(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """(T, n) d_H of every detector."""
        texts = _check_texts(texts, GateInputError, "texts to score")
        first = self.detectors[0]
        feats = _pooled(first._holder, first.tokenizer, first.config.max_length,
                        [d._adapter for d in self.detectors], self._split, texts, batch_size)
        return _d_h(self.detectors, feats, self._split).numpy()

    def weights(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """(T, n) calibrated w_raw of every detector (what the gate takes the max over)."""
        d = torch.from_numpy(self.scores(texts, batch_size))
        return torch.stack([det.calibration.weights(row) for det, row in zip(self.detectors, d)]).numpy()
