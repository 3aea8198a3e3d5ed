"""O3's unlearning LoRA: trained on refusal (or random-answer) targets, kept orthogonal to earlier requests.

The loss is ``CE(unlearning targets) + λ·L_orth`` with ``L_orth = (1/L) Σ_modules Σ_{i<t} ‖A_i A_tᵀ‖_F²`` over every
earlier request's frozen ``lora_A`` (peft's input-side matrix, as the reference code constrains it; L = number of
decoder layers). Two ways to serve a stream of requests:

- ``cumulative`` (the reference's): request t warm-starts from request t−1's adapter; only the newest is served.
- ``per-request``: a fresh adapter per request; they are served together as one rank-concatenated adapter
  (A = [A_1; …; A_T], B = [s_1·B_1 … s_T·B_T], scaling 1), which is exactly Σ_t s_t·B_t·A_t (peft's ``cat``).

Adapters are standard peft folders (``adapter_config.json`` + ``adapter_model.safetensors``), so peft and vLLM
load them unchanged. No retained data is used: the gate, not the adapter, protects everything else.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..causal_lm import CausalLMTask
from ..config import StrictConfig
from ..errors import ArtifactError, UnlearnDataError
from ..fingerprint import base_fingerprint, tensor_digest

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_INFO = "serve_unlearn_adapter.json"  # our provenance record beside peft's files
MAX_SCALING = 64.0  # lora_alpha / r beyond this is a damaged config, not a training choice (O3 uses 32 / 8)


class UnlearnLoraConfig(StrictConfig):
    """Defaults: r 8, α 16, dropout 0.05 on every linear projection, λ 0.1, and lr 1e-3 for 3 epochs rather than
    3e-4 for 10: a request is a few dozen prompts, and refusal targets are learnt in 3 epochs at that lr (the CE
    on SmolLM2-135M is in the README), at a third of the CPU time."""

    mode: Literal["per-request", "cumulative"] = "per-request"
    r: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    forget_target: Literal["refusal", "random-answer"] = "refusal"
    orthogonal_weight: float = Field(0.1, ge=0)
    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(8, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_length: int = Field(256, ge=8)
    seed: int = 0


def base_model_fingerprint(model: nn.Module) -> str:
    """A digest of the first and last decoder layers' weights (plus the input embeddings): enough to tell bases
    apart, cheap enough to check on every load."""
    state = {n: p for n, p in model.named_parameters() if ".lora_" not in n}
    layers = sorted({int(part) for n in state for part in [_layer_index(n)] if part is not None})
    keep = {layers[0], layers[-1]} if layers else set()
    picked = {n: tensor_digest(p) for n, p in state.items()
              if _layer_index(n) in keep or "embed_tokens" in n}
    if not picked:
        picked = {n: tensor_digest(p) for n, p in list(state.items())[:4]}
    return base_fingerprint(picked)


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for a, b in itertools.pairwise(parts):
        if a in ("layers", "h", "layer", "blocks") and b.isdigit():
            return int(b)
    return None


# -- reading adapters -------------------------------------------------------------------------------------------
def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, tensors) of a peft LoRA folder; ArtifactError naming what is wrong."""
    folder = Path(folder)
    cfg_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise ArtifactError(f"{p} is missing: {folder} is not a complete peft adapter folder; "
                                "re-run the forget request that produced it")
    try:
        cfg = json.loads(cfg_path.read_text())
        tensors = load_file(str(weights_path))
    except Exception as exc:  # corrupt JSON or safetensors
        raise ArtifactError(f"cannot read the adapter in {folder}: {exc}") from exc
    try:
        scaling = float(cfg["lora_alpha"]) / int(cfg["r"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise ArtifactError(f"{cfg_path}: lora_alpha and r must be numbers ({exc})") from exc
    if not (int(cfg["r"]) > 0 and 0 < scaling <= MAX_SCALING):
        raise ArtifactError(f"{cfg_path}: lora_alpha / r = {scaling:g} is outside (0, {MAX_SCALING}]; the adapter "
                            "config is damaged")
    if cfg.get("use_dora") or cfg.get("use_rslora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ArtifactError(f"{folder}: DoRA, rsLoRA and per-module rank/alpha patterns are not supported by O3 "
                            "serving; train a plain LoRA")
    return cfg, tensors


def lora_A_matrices(folder: str | Path) -> dict[str, torch.Tensor]:
    """Module name -> lora_A (r × d_in) of an adapter, keyed as the modules are named in a peft model."""
    _, tensors = read_adapter(folder)
    return {k.removesuffix(".lora_A.weight"): v for k, v in tensors.items() if k.endswith(".lora_A.weight")}


def adapter_scaling(cfg: dict) -> float:
    return float(cfg["lora_alpha"]) / float(cfg["r"])


def concat_adapters(folders: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write one adapter equal to the sum of ``folders``' adapters (rank-concatenated, scalings folded into B).

    The result has r = Σ r_t and lora_alpha = r (scaling 1), so a vLLM bank copy at scale s sets lora_alpha = s·r.
    """
    if not folders:
        raise ValueError("concat_adapters needs at least one adapter folder")
    out_dir = Path(out_dir)
    parts = [read_adapter(f) for f in folders]
    cfg0 = parts[0][0]
    modules = {k.removesuffix(".lora_A.weight") for k in parts[0][1] if k.endswith(".lora_A.weight")}
    for folder, (cfg, tensors) in zip(folders, parts):
        got = {k.removesuffix(".lora_A.weight") for k in tensors if k.endswith(".lora_A.weight")}
        if got != modules or cfg.get("base_model_name_or_path") != cfg0.get("base_model_name_or_path"):
            raise ArtifactError(f"{folder} targets other modules or another base than {folders[0]}; "
                                "adapters of one registry must share base and target modules")
    merged: dict[str, torch.Tensor] = {}
    for m in sorted(modules):
        merged[f"{m}.lora_A.weight"] = torch.cat([t[f"{m}.lora_A.weight"] for _, t in parts], dim=0).contiguous()
        merged[f"{m}.lora_B.weight"] = torch.cat(
            [t[f"{m}.lora_B.weight"] * adapter_scaling(c) for c, t in parts], dim=1).contiguous()
    rank = sum(int(c["r"]) for c, _ in parts)
    cfg = dict(cfg0, r=rank, lora_alpha=rank)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2))
    info = [json.loads((Path(f) / ADAPTER_INFO).read_text()) for f in folders if (Path(f) / ADAPTER_INFO).is_file()]
    if info:
        write_adapter_info(out_dir, base_fingerprint=info[0]["base_fingerprint"],
                           requests=[r for i in info for r in i.get("requests", [])])
    return out_dir


def write_adapter_info(folder: Path, *, base_fingerprint: str, requests: list[str]) -> None:
    (folder / ADAPTER_INFO).write_text(json.dumps({"base_fingerprint": base_fingerprint, "requests": requests},
                                                  indent=2))


def adapter_requests(folder: str | Path) -> list[str] | None:
    """The names of the forget requests an adapter folder was built from (None: a foreign peft adapter)."""
    info_path = Path(folder) / ADAPTER_INFO
    return json.loads(info_path.read_text())["requests"] if info_path.is_file() else None


def check_adapter_base(folder: str | Path, model: nn.Module) -> None:
    """ArtifactError unless the adapter in ``folder`` records that it was trained on this base model (a missing
    or unreadable record is an error too: the check is never skipped)."""
    info_path = Path(folder) / ADAPTER_INFO
    try:
        expected = json.loads(info_path.read_text())["base_fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{info_path} is missing or damaged ({type(exc).__name__}), so the adapter in {folder} "
                            "cannot be checked against the base model; re-run the forget request that made it") from exc
    if expected != base_model_fingerprint(model):
        raise ArtifactError(f"the adapter in {folder} was trained on another base model (fingerprint "
                            f"{expected[:12]}…); serve it with the base it was trained on")


# -- training ---------------------------------------------------------------------------------------------------
def orthogonality_penalty(pairs: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor]]], n_layers: int) -> torch.Tensor:
    """(1/L) Σ over (A_t, [A_i]) pairs of Σ_i ‖A_i A_tᵀ‖_F², accumulated in fp32; 0 when there is nothing earlier."""
    total = None
    for a_t, earlier in pairs:
        for a_i in earlier:
            term = (a_i.float() @ a_t.float().T).pow(2).sum()
            total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total / max(n_layers, 1)


def _orth_pairs(peft_model: nn.Module, frozen: Sequence[dict[str, torch.Tensor]], adapter: str):
    """Match each trainable lora_A with the earlier requests' frozen A of the same module (moved to its device)."""
    from peft.tuners.lora import LoraLayer

    pairs = []
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        a_t = module.lora_A[adapter].weight
        earlier = []
        for i, mats in enumerate(frozen):
            if name not in mats:
                raise ArtifactError(f"earlier request #{i + 1}'s adapter has no lora_A for {name}; all requests of "
                                    "a registry must target the same modules")
            earlier.append(mats[name].to(device=a_t.device, dtype=torch.float32))
        pairs.append((a_t, earlier))
    if frozen and not pairs:
        raise ArtifactError("the new adapter has no LoRA modules to constrain")
    return pairs


def train_unlearning_lora(model: nn.Module, tokenizer, records: Sequence[dict], config: UnlearnLoraConfig,
                          out_dir: str | Path, *, earlier_adapters: Sequence[str | Path] = (),
                          warm_start: str | Path | None = None, request_name: str = "request",
                          progress: bool = True,
                          on_step: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Train one request's LoRA on ``model`` (left unchanged afterwards) and save it as a peft folder in ``out_dir``.

    ``earlier_adapters``: the frozen adapters whose lora_A the new one must stay orthogonal to (every earlier
    request's own adapter). ``warm_start``: the adapter to continue from (``cumulative`` mode). ``on_step(done,
    total)`` is called after every optimizer step (a service reports progress and may stop the run by raising).
    Returns the final epoch's mean losses.
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import get_linear_schedule_with_warmup

    records = list(records)
    if not records:
        raise UnlearnDataError("the forget set is empty: give at least one {prompt, completion} record")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise UnlearnDataError(f"forget record #{i} needs a non-empty 'prompt' string; got {rec!r:.80}")
        rec.setdefault("completion", "")
    frozen = [lora_A_matrices(p) for p in earlier_adapters]
    fingerprint = base_model_fingerprint(model)
    adapter = "default"
    torch.manual_seed(config.seed + len(frozen))  # a fresh A per request, not a copy of the first request's init
    if warm_start is not None:
        check_adapter_base(warm_start, model)
        peft_model = PeftModel.from_pretrained(model, str(warm_start), is_trainable=True)
    else:
        peft_model = get_peft_model(model, LoraConfig(
            r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=config.target_modules, bias="none", task_type="CAUSAL_LM"))
    was_training = model.training
    try:
        pairs = _orth_pairs(peft_model, frozen, adapter)
        n_layers = int(getattr(getattr(model, "config", None), "num_hidden_layers", 0) or 1)
        task = CausalLMTask(tokenizer, forget_target=config.forget_target, max_length=config.max_length)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
        steps = config.epochs * math.ceil(len(records) / config.batch_size)
        sched = get_linear_schedule_with_warmup(opt, int(config.warmup_ratio * steps), steps)
        peft_model.train()
        losses: dict[str, float] = {}
        done = 0
        bar = tqdm(range(config.epochs), desc=f"o3 lora {request_name}", disable=not progress)
        for epoch in bar:
            ce_sum = orth_sum = 0.0
            batches = task.batches(records, config.batch_size, shuffle=True, seed=config.seed + epoch)
            for batch in batches:
                opt.zero_grad(set_to_none=True)
                ce = task.unlearn_loss(peft_model, batch)
                orth = orthogonality_penalty(pairs, n_layers).to(ce.device)
                (ce + config.orthogonal_weight * orth).backward()
                opt.step()
                sched.step()
                ce_sum += float(ce.detach())
                orth_sum += float(orth.detach())
                done += 1
                if on_step is not None:
                    on_step(done, steps)
            losses = {"ce": ce_sum / len(batches), "orth": orth_sum / len(batches)}
            bar.set_postfix(losses)
        out_dir = Path(out_dir)
        peft_model.save_pretrained(str(out_dir))
        write_adapter_info(out_dir, base_fingerprint=fingerprint, requests=[request_name])
        return losses
    finally:
        peft_model.unload()  # strips the LoRA layers: the caller's model is the base again
        model.train(was_training)
