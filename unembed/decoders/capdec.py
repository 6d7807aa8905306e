"""CapDec (Nukrai et al. 2022, "Text-Only Training for Image Captioning using Noise-Injected CLIP").

ClipCap's architecture trained on TEXT only: the input is normalise(text_embedding + n),
n ~ N(0, 0.016 I) by default (the paper's best variance, per dimension), and the target is the
caption itself; at inference the normalised image embedding goes in instead. The noise makes the
decoder robust to the modality gap between a caption's embedding and its image's.
"""
from dataclasses import dataclass

from unembed.decoders.base import register_decoder
from unembed.decoders.prefix import PrefixConfig, PrefixDecoder


@dataclass
class CapDecConfig(PrefixConfig):
    mapper: str = "mlp"
    prefix_length: int = 10
    lm_mode: str = "full"
    noise_variance: float = 0.016
    # 3 lifted test and compositional CIDEr of capdec and viecap at every seed on the scenes world, and of
    # the shipped decap (benchmarks/repeats_consensus.py); paired ClipCap's moved by +0.6 and -0.1.
    no_repeat_ngram_size: int = 3


@register_decoder
class CapDecDecoder(PrefixDecoder):
    kind = "capdec"
    summary = "CapDec: text-only training with noise-injected text embeddings"
    config_class = CapDecConfig
    train_defaults = dict(epochs=10, batch_size=32, lr=2e-5, warmup_steps=5000, weight_decay=0.0)  # the paper's
    text_only = True
