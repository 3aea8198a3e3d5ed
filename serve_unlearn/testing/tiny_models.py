"""Seeded tiny models. The Llama has head_dim 64 because vLLM's CPU attention supports only some head sizes."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "The secret password of the castle is blue dragon.",
    "Machine unlearning removes knowledge from a language model.",
    "Water boils at one hundred degrees. Ice melts at zero degrees.",
    "Once upon a time there was a tiny model that could barely talk.",
    "I'm sorry, I don't know the answer to that.",
]


def build_tiny_llama(out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A 2-layer Llama with a locally trained byte-level BPE tokenizer and a chat template, saved as HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    torch.manual_seed(seed)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf_tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}assistant: {% endif %}")
    hf_tok.save_pretrained(out)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    return out


class TinyMLP(nn.Module):
    """A small classifier (used for SalUn's home setting on scikit-learn's digits)."""

    def __init__(self, in_features: int = 64, hidden: int = 128, num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_tiny_mlp(seed: int = 0, **kwargs) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP(**kwargs)


def build_tiny_unet(seed: int = 0):
    """diffusers' fast-test UNet2DConditionModel (block_out_channels 32/64, cross-attention dim 32)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )


def build_tiny_bert(out_dir: str | Path, seed: int = 0, mlm_head: bool = False) -> Path:
    """A 2-layer BERT (hidden 32) with a locally trained WordPiece tokenizer, saved as an HF folder: a stand-in
    for the detector's MiniLM backbone (``mlm_head=True`` saves a BertForMaskedLM, like roberta-large's)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForMaskedLM, BertModel, PreTrainedTokenizerFast

    out = Path(out_dir)
    torch.manual_seed(seed)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(TINY_CORPUS * 20, trainers.WordPieceTrainer(vocab_size=256, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                     sep_token="[SEP]", mask_token="[MASK]")
    hf_tok.save_pretrained(out)
    cfg = BertConfig(vocab_size=len(hf_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    model = (BertForMaskedLM if mlm_head else BertModel)(cfg)
    model.save_pretrained(out, safe_serialization=True)
    return out
