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

from unembed.compat import import_transformers
from unembed.decoders.base import Decoder, DecoderConfig
from unembed.decoders.bridges import ModalityBridge
from unembed.errors import ModelLoadError

SCRATCH_LM = dict(model_type="gpt2", n_layer=4, n_head=4, n_embd=768, n_positions=96)


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


# --- tokenizers ---------------------------------------------------------------------------------

class ClipBpeTokenizer:
    """open_clip's CLIP BPE (bundled, works offline); DeCap's choice. Lower-cases, as CLIP does."""

    name = "clip-bpe"

    def __init__(self):
        from unembed.compat import import_open_clip

        self._bpe = import_open_clip().tokenizer.SimpleTokenizer()
        self.vocab_size = len(self._bpe.encoder)
        self.bos_id = self._bpe.all_special_ids[0]
        self.eos_id = self._bpe.all_special_ids[1]

    def encode(self, text: str) -> list[int]:
        return self._bpe.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._bpe.decode(ids).strip()

    def save(self, path: Path) -> None:
        """Nothing to write: the BPE ships inside open_clip."""


class HFTokenizer:
    def __init__(self, name_or_path: str):
        transformers = import_transformers()
        try:
            self._tok = transformers.AutoTokenizer.from_pretrained(name_or_path)
        except OSError as e:
            raise ModelLoadError(f"cannot load tokenizer {name_or_path!r}: {str(e).splitlines()[0]}") from None
        self.name = name_or_path
        self.vocab_size = len(self._tok)
        self.eos_id = self._tok.eos_token_id
        self.bos_id = self._tok.bos_token_id if self._tok.bos_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(" " + text.strip(), add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True).strip()

    def save(self, path: Path) -> None:
        self._tok.save_pretrained(path / "tokenizer")


class CorpusTokenizer:
    """A BPE vocabulary learned from the training captions (`tokenizers`): for an LM trained from
    scratch on one domain, a few thousand tokens instead of CLIP's 49,408 make the output layer,
    which dominates a small LM's cost, ~20x cheaper. Spec "corpus:N" learns at most N tokens."""

    FILE = "tokenizer.json"

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.name = "corpus"
        self.vocab_size = tokenizer.get_vocab_size()
        self.bos_id, self.eos_id = tokenizer.token_to_id("[BOS]"), tokenizer.token_to_id("[EOS]")

    @classmethod
    def train(cls, captions: list[str], vocab_size: int) -> "CorpusTokenizer":
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE(unk_token="[UNK]", end_of_word_suffix="</w>"))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.BPEDecoder(suffix="</w>")
        specials = ["[UNK]", "[BOS]", "[EOS]"]
        tok.train_from_iterator(captions, trainers.BpeTrainer(vocab_size=vocab_size, end_of_word_suffix="</w>",
                                                              special_tokens=specials))
        return cls(Tokenizer.from_str(cls._canonical_ids(tok.to_str(), specials)))

    @staticmethod
    def _canonical_ids(serialised: str, specials: list[str]) -> str:
        """The trainer learns the same merges every run but numbers the initial alphabet in hash
        order, which differs per process: renumber (specials, sorted alphabet, merges in order) so a
        run is reproducible and every process of a distributed run gets the same token ids."""
        import json

        spec = json.loads(serialised)
        model = spec["model"]
        merged = ["".join(m) if isinstance(m, list) else m.replace(" ", "") for m in model["merges"]]
        alphabet = sorted(set(model["vocab"]) - set(specials) - set(merged))
        order = specials + alphabet + [t for t in dict.fromkeys(merged) if t not in specials]
        model["vocab"] = {token: i for i, token in enumerate(order)}
        for added in spec.get("added_tokens", []):
            added["id"] = model["vocab"][added["content"]]
        return json.dumps(spec)

    @classmethod
    def load(cls, directory: Path) -> "CorpusTokenizer":
        from tokenizers import Tokenizer

        if not (directory / cls.FILE).is_file():
            raise ModelLoadError(f"{directory / cls.FILE} is missing: this decoder's tokenizer")
        return cls(Tokenizer.from_file(str(directory / cls.FILE)))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids).strip()

    def save(self, path: Path) -> None:
        from unembed.io import atomic_path

        with atomic_path(path / self.FILE) as tmp:
            self._tok.save(str(tmp))


def make_tokenizer(config: PrefixConfig, directory: Path | None = None, captions: list[str] | None = None):
    """The tokenizer a config names; "corpus:N" is learned from `captions` or read from `directory`."""
    name = config.tokenizer or ("clip-bpe" if config.lm == "scratch" else config.lm)
    if name == "clip-bpe":
        return ClipBpeTokenizer()
    if name.startswith("corpus"):
        if directory is not None:
            return CorpusTokenizer.load(directory)
        if not captions:
            raise ModelLoadError(f"tokenizer {name!r} is learned from training captions; none were given")
        return CorpusTokenizer.train(captions, int(name.partition(":")[2] or 4000))
    if directory is not None and (directory / "tokenizer").is_dir():
        return HFTokenizer(str(directory / "tokenizer"))
    return HFTokenizer(name)


def encode_captions(tokenizer, captions: list[str], limit: int,
                    start: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [N, T] (the start token if asked, the caption cut to fit `limit`, the end token;
    right-padded with the end token) and lengths [N]: padding is told apart by length, not by value."""
    eos, head = tokenizer.eos_id, [tokenizer.bos_id] if start else []
    ids = [head + tokenizer.encode(c)[:limit - 1 - len(head)] + [eos] for c in captions]
    lengths = torch.tensor([len(i) for i in ids])
    tokens = torch.full((len(ids), int(lengths.max())), eos, dtype=torch.long)
    for row, seq in enumerate(ids):
        tokens[row, :len(seq)] = torch.tensor(seq)
    return tokens, lengths


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


# --- the LM -------------------------------------------------------------------------------------

def make_lm(config: PrefixConfig, tokenizer) -> nn.Module:
    """Build the LM from its recorded config (no download); a hub LM's weights are fetched only when
    a new decoder is created, and saved with the decoder after that."""
    transformers = import_transformers()
    if config.lm_config:
        hf_config = transformers.AutoConfig.for_model(**config.lm_config)
        return transformers.AutoModelForCausalLM.from_config(hf_config)
    if config.lm == "scratch":
        raise ModelLoadError("a scratch LM needs lm_config")
    from unembed.embedders import hub_reachable

    if not Path(config.lm).is_dir() and not hub_reachable():
        raise ModelLoadError(f"cannot download LM {config.lm!r}: the Hugging Face hub is unreachable. Offline, use "
                             "--lm scratch (a GPT-2-architecture LM trained from scratch on your captions)")
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(config.lm)
    except OSError as e:
        raise ModelLoadError(f"cannot load LM {config.lm!r}: {str(e).splitlines()[0]}") from None


def build_lm(config, tokenizer) -> nn.Module:
    """The LM a config names, with its full HF config recorded back into `config.lm_config` so a saved
    decoder rebuilds it offline; a scratch LM's size overrides are completed from the tokenizer first."""
    if config.lm == "scratch" and "vocab_size" not in config.lm_config:
        config.lm_config = scratch_lm_config(tokenizer, config.lm_config)
    lm = make_lm(config, tokenizer)
    config.lm_config = {k: v for k, v in lm.config.to_diff_dict().items() if not k.startswith("_")}
    config.lm_config["model_type"] = lm.config.model_type
    return lm


def scratch_lm_config(tokenizer, overrides: dict | None = None) -> dict:
    cfg = dict(SCRATCH_LM, **(overrides or {}))
    return dict(cfg, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)


def apply_lm_mode(lm: nn.Module, mode: str, lora_r: int) -> nn.Module:
    if mode == "full":
        return lm
    if mode == "frozen":
        lm.requires_grad_(False)
        return lm
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        # GPT-2 stores its projections as Conv1D (weights transposed), which LoRA must be told.
        gpt2_like = getattr(lm.config, "model_type", "") == "gpt2"
        lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, fan_in_fan_out=gpt2_like,
                          target_modules=["c_attn", "c_proj"] if gpt2_like else None)
        return get_peft_model(lm, lora)
    raise ModelLoadError(f"unknown LM mode {mode!r} (frozen | lora | full)")


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
