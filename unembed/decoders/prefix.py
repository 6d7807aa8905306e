"""The prefix-LM core shared by ClipCap, CapDec and DeCap.

A joint-space vector v [N, D] goes through the modality bridge (bridges.py), then a mapper turns it
into k prefix vectors [N, k, E] in a causal LM's input-embedding space; the LM continues them into a
caption. Training is next-token cross-entropy on the caption tokens only (prefix positions and
padding carry no loss; padding is masked by length, never by token value). Generation is the LM
library's: `lm.generate(inputs_embeds=prefix)` with its KV cache, beam search and sampling, batched.

Mappers (Mokady et al. 2021): "linear" (DeCap's one-token prefix), "mlp" (Linear -> Tanh -> Linear),
"transformer" (Linear to `mapper_length` tokens + k learned constants -> encoder -> last k outputs).
LMs: "scratch" (GPT-2 architecture from `lm_config`, e.g. DeCap's 4-layer decoder) or any Hugging
Face causal LM id ("gpt2"); trained frozen, with LoRA (peft) or fully.
Tokenizers: "clip-bpe" (open_clip's bundled CLIP BPE, offline) or the LM's own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from unembed.decoders.base import Decoder, DecoderConfig
from unembed.decoders.bridges import ModalityBridge
from unembed.errors import ModelLoadError
from unembed.lm import apply_lm_mode, build_lm
from unembed.tokenizers import encode_captions, make_tokenizer


@dataclass
class PrefixConfig(DecoderConfig):
    lm: str = "gpt2"                # "scratch" or a Hugging Face causal LM id / directory
    lm_config: dict = field(default_factory=dict)  # the LM's HF config, completed at creation (scratch: overrides)
    tokenizer: str = ""             # "clip-bpe" or an HF tokenizer id; "" = the LM's own (clip-bpe for scratch)
    lm_mode: str = "full"           # frozen | lora | full
    lora_r: int = 8
    mapper: str = "mlp"             # linear | mlp | transformer
    prefix_length: int = 10
    mapper_length: int = 10         # transformer mapper: tokens made from the embedding
    mapper_layers: int = 8
    max_caption_tokens: int = 40
    label_smoothing: float = 0.0
    normalize: bool = True          # L2-normalise embeddings before the mapper
    noise_variance: float = 0.0     # bridges (see bridges.py)
    noise_kind: str = "gaussian"
    mean_shift: bool = False
    projection_size: int = 0        # > 0: project onto a memory of this many text embeddings
    projection_tau: float = 0.01
    num_beams: int = 5              # generation defaults
    max_length: int = 30


# --- mappers ------------------------------------------------------------------------------------

class TransformerMapper(nn.Module):
    def __init__(self, dim_in: int, dim_lm: int, prefix_length: int, mapper_length: int, layers: int):
        super().__init__()
        self.mapper_length = mapper_length
        self.linear = nn.Linear(dim_in, mapper_length * dim_lm)
        self.constants = nn.Parameter(torch.randn(prefix_length, dim_lm))
        heads = next(h for h in (8, 4, 2, 1) if dim_lm % h == 0)
        layer = nn.TransformerEncoderLayer(dim_lm, heads, 2 * dim_lm, dropout=0.0, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        x = self.linear(v).view(v.shape[0], self.mapper_length, -1)
        x = torch.cat([x, self.constants.expand(v.shape[0], -1, -1)], dim=1)
        return self.transformer(x)[:, self.mapper_length:]


class MLPMapper(nn.Module):
    def __init__(self, dim_in: int, dim_lm: int, prefix_length: int, hidden: bool = True):
        super().__init__()
        self.prefix_length = prefix_length
        out = prefix_length * dim_lm
        self.net = (nn.Sequential(nn.Linear(dim_in, out // 2), nn.Tanh(), nn.Linear(out // 2, out)) if hidden
                    else nn.Linear(dim_in, out))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.net(v).view(v.shape[0], self.prefix_length, -1)


def make_mapper(config: PrefixConfig, dim_lm: int) -> nn.Module:
    if config.mapper == "transformer":
        return TransformerMapper(config.embed_dim, dim_lm, config.prefix_length, config.mapper_length,
                                 config.mapper_layers)
    if config.mapper in ("mlp", "linear"):
        return MLPMapper(config.embed_dim, dim_lm, config.prefix_length, hidden=config.mapper == "mlp")
    raise ModelLoadError(f"unknown mapper {config.mapper!r} (linear | mlp | transformer)")


# --- the decoder --------------------------------------------------------------------------------

class PrefixDecoder(Decoder):
    """Base of clipcap / capdec / decap: they differ in defaults and in how they are trained."""

    config_class = PrefixConfig

    def __init__(self, config: PrefixConfig, tokenizer=None):
        super().__init__(config)
        self.tokenizer = tokenizer or make_tokenizer(config)
        lm = build_lm(config, self.tokenizer)
        self.lm = apply_lm_mode(lm, config.lm_mode, config.lora_r)
        self.mapper = make_mapper(config, lm.get_input_embeddings().embedding_dim)
        self.bridge = ModalityBridge(config.embed_dim, config.mean_shift, config.projection_size,
                                     config.projection_tau, config.noise_variance, config.noise_kind)

    # training

    def encode_captions(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_captions(self.tokenizer, captions, self.config.max_caption_tokens)

    def prefix(self, vectors: torch.Tensor) -> torch.Tensor:
        if self.config.normalize:
            vectors = F.normalize(vectors, dim=-1)
        return self.mapper(vectors.to(self.mapper_device()))

    def caption_loss(self, vectors: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the caption tokens given the prefix; vectors already bridged."""
        prefix = self.prefix(vectors)
        k, t = prefix.shape[1], tokens.shape[1]
        embeds = torch.cat([prefix, self.lm.get_input_embeddings()(tokens)], dim=1)
        valid = torch.arange(t, device=tokens.device)[None, :] < lengths[:, None]
        mask = torch.cat([torch.ones(len(tokens), k, dtype=torch.long, device=tokens.device), valid.long()], dim=1)
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask).logits[:, k - 1:-1]  # position k-1+i predicts token i
        labels = tokens.masked_fill(~valid, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100,
                               label_smoothing=self.config.label_smoothing)

    def mapper_device(self) -> torch.device:
        return next(self.mapper.parameters()).device

    # inference

    @torch.no_grad()
    def decode(self, embedded, num_beams: int | None = None, max_length: int | None = None, do_sample: bool = False,
               top_p: float | None = None, temperature: float = 1.0, seed: int | None = None) -> list[str]:
        """Captions for [N, D] embeddings: greedy (num_beams=1), beam search, or nucleus sampling."""
        self.check_embedded(embedded)
        self.eval()
        vectors = self.bridge.for_inference(embedded.vectors, "text" if embedded.modality == "text" else "image")
        prefix = self.prefix(vectors)
        if seed is not None:
            torch.manual_seed(seed)
        eos = self.tokenizer.eos_id
        options = dict(max_new_tokens=max_length or self.config.max_length, eos_token_id=eos, pad_token_id=eos)
        if do_sample:
            options.update(do_sample=True, top_p=top_p or 0.9, temperature=temperature, num_beams=1)
        else:
            options.update(do_sample=False, num_beams=num_beams or self.config.num_beams)
        attention = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        if prefix.shape[1] == 1:
            # transformers takes "as many cache positions as inputs_embeds" to mean the first step, so a
            # one-vector prefix would be fed again at every step. One masked left-pad slot (HF's own
            # padding scheme: no attention to it, positions from the mask) keeps the computation exact.
            prefix = torch.cat([torch.zeros_like(prefix), prefix], dim=1)
            attention = torch.cat([torch.zeros_like(attention), attention], dim=1)
        out = self.lm.generate(inputs_embeds=prefix, attention_mask=attention, **options)
        return [self.tokenizer.decode(self._until_eos(row.tolist(), eos)) for row in out]

    @staticmethod
    def _until_eos(ids: list[int], eos: int) -> list[int]:
        return ids[:ids.index(eos)] if eos in ids else ids

    # saving

    def save_extra(self, path: Path) -> None:
        self.tokenizer.save(path)
        if self.bridge.memory is not None:
            self.bridge.memory.save_texts(path / "memory_captions.json")

    def load_extra(self, path: Path) -> None:
        if self.bridge.memory is not None:
            self.bridge.memory.load_texts(path / "memory_captions.json")

    @classmethod
    def from_saved(cls, config: PrefixConfig, path: Path) -> "PrefixDecoder":
        return cls(config, make_tokenizer(config, path))
