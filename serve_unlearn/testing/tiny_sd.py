"""Tiny Stable Diffusion components (SD and SDXL shapes) built offline: a byte-level CLIP tokenizer written to a
folder, 2-layer CLIP text encoders, a 2-block VAE (scale factor 2) and a 2-block UNet with self-attention at
16x16 tokens for 64 px images. Seeded; used by the pipeline and service tests and the serving benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_clip_tokenizer(folder: str | Path):
    """A byte-level CLIP tokenizer (no merges) from files written to ``folder``: the Hub is not reachable."""
    import transformers
    from transformers import CLIPTokenizer

    folder = Path(folder)
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    if int(transformers.__version__.split(".")[0]) >= 5:
        return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)
    return CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"),
                         model_max_length=77)


def tiny_text_encoder(tok, hidden: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2, num_hidden_layers=2,
                         vocab_size=len(tok), max_position_embeddings=77, projection_dim=hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=4, layers_per_block=1)


def tiny_sd_unet(**family):
    """The tiny 4-channel UNet both families share (two blocks, 16x16 latents, attention in the deeper block),
    with the family's attention and conditioning settings; in eval mode."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, **family,
    ).eval()


def tiny_sd_components(tokenizer_folder: str | Path, seed: int = 0) -> dict:
    """SD-style: UNet (16, 32) with self-attention at 16x16 tokens for 64 px (VAE factor 2)."""
    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer(tokenizer_folder)
    unet = tiny_sd_unet(cross_attention_dim=16, attention_head_dim=2)
    return {"vae": tiny_vae(), "text_encoder": tiny_text_encoder(tok, 16), "tokenizer": tok, "unet": unet}


def tiny_sdxl_components(tokenizer_folder: str | Path, seed: int = 0) -> dict:
    """SDXL-style: two text encoders, text_time micro-conditioning, 2 transformer layers in the deep blocks."""
    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer(tokenizer_folder)
    unet = tiny_sd_unet(attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                        addition_time_embed_dim=4, transformer_layers_per_block=(1, 2),
                        projection_class_embeddings_input_dim=40, cross_attention_dim=32)
    return {"vae": tiny_vae(), "text_encoder": tiny_text_encoder(tok, 16),
            "text_encoder_2": tiny_text_encoder(tok, 16, True), "tokenizer": tok, "tokenizer_2": tok, "unet": unet}


def save_tiny_sd(folder: str | Path, seed: int = 0) -> Path:
    """A tiny SD 1.x pipeline folder (``model_index.json`` + components) that ``from_pretrained`` loads."""
    from diffusers import StableDiffusionPipeline

    from ..pipelines.attentive_eraser import AE_PRESET_SD

    folder = Path(folder)
    parts = tiny_sd_components(folder / "_tokenizer_src", seed)
    StableDiffusionPipeline(**parts, scheduler=AE_PRESET_SD.scheduler(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder
