"""Training a detector's LoRA with O3's contrastive entropy loss (CEL), plus the MLM loss where there is a head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import DetectorConfig
from .encoder import SharedEncoder, masked_mean_pool

_LOG_EPS = 1e-5      # the reference's log(Δ + 1e-5)


def mask_tokens(input_ids: torch.Tensor, special: torch.Tensor, tokenizer, prob: float,
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


def contrastive_entropy(query: Sequence[torch.Tensor], key: Sequence[torch.Tensor]) -> torch.Tensor:
    """O3's CEL: per layer, the mean over queries of the entropy of softmax_j(q_i . k_j), summed over layers
    (raw dot products, no temperature, ``log(Δ + 1e-5)``, as the reference)."""
    loss = query[0].new_zeros(())
    for q, k in zip(query, key):
        delta = torch.softmax(q @ k.T, dim=-1)
        loss = loss + (-(delta * torch.log(delta + _LOG_EPS)).sum(dim=-1)).mean()
    return loss


def train_detector_lora(holder: SharedEncoder, name: str, model: nn.Module, tokenizer, texts: list[str],
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
                masked, labels = mask_tokens(enc["input_ids"], special, tokenizer, config.mlm_probability, gen)
                enc = {k: v.to(device) for k, v in enc.items()}
                with torch.no_grad(), peft_model.disable_adapter():  # the frozen key encoder: LoRA off
                    holder.encoder.eval()
                    key_out = holder.encoder(**enc, output_hidden_states=True)
                    holder.encoder.train()
                keys = [masked_mean_pool(h, enc["attention_mask"]) for h in key_out.hidden_states[1:]]
                if has_head:  # MLM head frozen (peft freezes everything but the LoRA); LoRA learns through it
                    out = model(input_ids=masked.to(device), attention_mask=enc["attention_mask"],
                                token_type_ids=enc.get("token_type_ids"), labels=labels.to(device),
                                output_hidden_states=True)
                    mlm = out.loss if bool((labels != -100).any()) else out.logits.new_zeros(())
                else:
                    out = holder.encoder(**{**enc, "input_ids": masked.to(device)}, output_hidden_states=True)
                    mlm = 0.0
                queries = [masked_mean_pool(h, enc["attention_mask"]) for h in out.hidden_states[1:]]
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
