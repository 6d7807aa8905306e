"""DeCap (Li et al. 2023, "DeCap: Decoding CLIP Latents for Zero-Shot Captioning via Text-Only Training").

A small GPT-2-architecture decoder trained from scratch on text only (4 layers, 4 heads, width 768,
CLIP's BPE), prefixed by ONE token: Linear(D -> E) of the caption's own normalised text embedding;
cross-entropy with label smoothing 0.1. At inference an image embedding v is projected onto a memory
T of training text embeddings, w = softmax(v T^T / tau), tau = 0.01, input = normalise(w T); greedy.
"""
from dataclasses import dataclass

from unembed.decoders.base import register_decoder
from unembed.decoders.prefix import PrefixConfig, PrefixDecoder


@dataclass
class DeCapConfig(PrefixConfig):
    lm: str = "scratch"
    tokenizer: str = "clip-bpe"
    mapper: str = "linear"
    prefix_length: int = 1
    lm_mode: str = "full"
    max_caption_tokens: int = 20
    label_smoothing: float = 0.1
    projection_size: int = 50_000
    projection_tau: float = 0.01
    num_beams: int = 1
    no_repeat_ngram_size: int = 3  # as CapDec's (the shipped decap: +0.5 test, +0.4 compositional CIDEr)


@register_decoder
class DeCapDecoder(PrefixDecoder):
    kind = "decap"
    summary = "DeCap: text-only decoder + projection onto a text-embedding memory"
    config_class = DeCapConfig
    train_defaults = dict(epochs=10, batch_size=64, lr=1e-5, warmup_steps=1000, weight_decay=0.0)  # the paper's
    text_only = True
