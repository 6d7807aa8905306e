"""ClipCap (Mokady et al. 2021, "ClipCap: CLIP Prefix for Image Captioning").

Trained on (image embedding, caption) pairs: image embedding [N, D] -> mapper -> k prefix vectors
[N, k, E] -> causal LM -> caption. Reference configuration: MLP mapper with k=10 and GPT-2 fine-tuned,
or the transformer mapper (k = mapper_length = 10..40, 8 layers) with GPT-2 frozen; beam search 5.
"""
from dataclasses import dataclass

from unembed.decoders.base import register_decoder
from unembed.decoders.prefix import MODEL_OPTIONS, PrefixConfig, PrefixDecoder


@dataclass
class ClipCapConfig(PrefixConfig):
    mapper: str = "mlp"
    prefix_length: int = 10
    lm_mode: str = "full"


@register_decoder
class ClipCapDecoder(PrefixDecoder):
    kind = "clipcap"
    summary = "ClipCap: prefix mapper trained on (image, caption) pairs"
    config_class = ClipCapConfig
    train_defaults = dict(epochs=10, batch_size=40, lr=2e-5, warmup_steps=5000, weight_decay=0.0)  # the paper's
    cli_options = MODEL_OPTIONS  # trained on image embeddings themselves: no bridge to set
