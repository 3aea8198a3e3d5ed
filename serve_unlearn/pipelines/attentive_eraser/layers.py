"""Which UNets Attentive Eraser runs on, and which of their self-attentions ASS runs in.

Layers are selected as PAG selects them (regexes over module names, with PAG's guard against "blocks.1" matching
"blocks.10") or by the reference's execution-order block numbers (``("block_index", range(a, b))``).
"""

from __future__ import annotations

import re

import torch

from ...errors import EraserInputError, UnsupportedModelError

BLOCK_INDEX = "block_index"


def self_attention_layers(unet) -> list[tuple[str, torch.nn.Module]]:
    """The UNet's self-attentions in execution order over down, mid and up blocks: the reference's numbering
    (its ``cur_att_layer // 2``, one transformer block per index)."""
    from diffusers.models.attention_processor import Attention

    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    found = [(n, m) for n, m in unet.named_modules()
             if isinstance(m, Attention) and not m.is_cross_attention and n.split(".")[0] in order]
    return sorted(found, key=lambda nm: order[nm[0].split(".")[0]])  # stable: keeps the order inside a block


def _is_fake_integral_match(layer_id: str, name: str) -> bool:
    """PAG's guard: "blocks.1" must not select "blocks.10"."""
    layer_id, name = layer_id.split(".")[-1], name.split(".")[-1]
    return layer_id.isnumeric() and name.isnumeric() and layer_id == name


def resolve_applied_layers(unet, applied_layers) -> list[str]:
    """Module names of the self-attentions selected by regexes (PAG's semantics) or ("block_index", indices)."""
    from diffusers.models.attention_processor import Attention

    if isinstance(applied_layers, tuple) and applied_layers and applied_layers[0] == BLOCK_INDEX:
        layers = self_attention_layers(unet)
        wanted = list(applied_layers[1])
        bad = [i for i in wanted if not 0 <= i < len(layers)]
        if bad:
            raise EraserInputError(f"block indices {bad} are out of range: this UNet has {len(layers)} "
                                   "self-attention blocks (0-based, down -> mid -> up)")
        return [layers[i][0] for i in wanted]
    names: list[str] = []
    for layer_id in applied_layers:
        matched = [n for n, m in unet.named_modules()
                   if isinstance(m, Attention) and not m.is_cross_attention and re.search(layer_id, n) is not None
                   and not _is_fake_integral_match(layer_id, n)]
        if not matched:
            raise EraserInputError(f"no self-attention layer matches {layer_id!r}: use e.g. 'up', 'mid', "
                                   "'down_blocks.1' or ('block_index', range(a, b))")
        names.extend(matched)
    return list(dict.fromkeys(names))


def check_unet(unet, where: str) -> None:
    """Raise UnsupportedModelError unless ``unet`` is a UNet Attentive Eraser can run (4-channel, conditional)."""
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        found = "no UNet" if unet is None else f"a {type(unet).__name__}"
        raise UnsupportedModelError(
            f"{where} has {found}: Attentive Eraser needs a UNet2DConditionModel (Stable Diffusion 1.x/2.x or SDXL); "
            "transformer (DiT) pipelines such as PixArt, SD3 or FLUX are not supported"
        )
    if unet.config.in_channels != unet.config.out_channels:
        raise UnsupportedModelError(
            f"{where}'s UNet takes {unet.config.in_channels} input channels (an inpainting UNet); Attentive Eraser "
            "blends latents with a base model: load the base (non-inpainting) checkpoint"
        )
