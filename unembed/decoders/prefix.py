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
from typing import ClassVar
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from unembed.decoders.base import Decoder, DecoderConfig
from unembed.decoders.bridges import ModalityBridge
from unembed.errors import MismatchError, ModelLoadError
from unembed.lm import LMWeights, apply_lm_mode, build_lm, saved_adapter
from unembed.tokenizers import encode_captions, make_tokenizer


def option(default, help: str, choices: tuple | None = None, **kwargs):
    """A config field that is also a command-line option of `unembed train KIND` (see cli_options):
    its help and choices live here, beside the field, as peft's configs keep theirs."""
    metadata = {"help": help, **({"choices": choices} if choices else {}), **kwargs.pop("metadata", {})}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class PrefixConfig(DecoderConfig):
    lm: str = option("gpt2", "'scratch' or a Hugging Face causal LM id or directory (default: gpt2; decap: scratch)")
    lm_config: dict = option({}, "JSON (or a JSON file) of the LM's HF config; for a scratch LM, overrides of its "
                             "size, e.g. '{\"n_layer\": 4, \"n_embd\": 256}' (completed at creation)")
    tokenizer: str = option("", "'clip-bpe', 'corpus:N' (a BPE of at most N tokens learned from the training "
                            "captions) or an HF tokenizer id (default: the LM's own; scratch LMs: clip-bpe)")
    lm_mode: str = option("full", "how the LM is trained", ("frozen", "lora", "full"))
    lm_revision: str = ""           # the hub snapshot (commit hash) the LM resolved to, recorded at creation
    lm_weights: str = ""            # recorded at save: "inside" (in model.safetensors) or "referenced" (hub id + revision)
    save_full_lm: bool = option(False, "keep a full copy of a frozen or LoRA-trained hub LM in the decoder "
                                "(self-contained, for air-gapped use) instead of its id, revision and adapter")
    lora_r: int = option(8, "LoRA rank (--lm-mode lora)")
    mapper: str = option("mlp", "embedding -> prefix mapper", ("linear", "mlp", "transformer"))
    prefix_length: int = option(10, "prefix tokens the mapper makes")
    mapper_length: int = option(10, "transformer mapper: tokens made from the embedding")
    mapper_layers: int = option(8, "transformer mapper: encoder layers")
    max_caption_tokens: int = option(40, "training captions are cut to this many tokens")
    label_smoothing: float = option(0.0, "cross-entropy label smoothing")
    normalize: bool = True          # L2-normalise embeddings before the mapper
    noise_variance: float = option(0.0, "CapDec noise variance per dimension (0 = none)")
    noise_kind: str = option("gaussian", "CapDec noise distribution (uniform: in the ball of radius sqrt(variance), "
                             "as CapDec defines it)", ("gaussian", "uniform"))
    noise_reference_dim: int = option(0, "scale the noise variance to move vectors as far as it would at this width: "
                                      "512 gives the paper's effective noise (CLIP ViT-B/32) on any embedder; 0 = the "
                                      "variance as given, per dimension")
    mean_shift: bool = option(False, "subtract each modality's mean embedding (needs some images in --data)")
    projection_size: int = option(0, "DeCap memory size (0 = no projection)")
    projection_tau: float = option(0.01, "DeCap projection temperature")
    recombine: str = option("", "word classes whose words trade places in recombined copies of the training "
                            "captions (colours, JSON files of word lists, or inline JSON), so the decoder writes "
                            "pairings its captions never have (data/recombine.py); saved as the word lists")
    recombine_rate: float = option(1.0, "recombined copies per training caption (--recombine)")
    num_beams: int = 5              # generation defaults
    max_length: int = 30
    # No run of this many tokens twice in a caption (0 = off). CapDec's, DeCap's and ViECap's configs
    # default to 3; ClipCap keeps 0, as do imported published decoders (their authors' code does not
    # block repeats) and decoders saved before format 4 (as they captioned).
    no_repeat_ngram_size: int = 0
    stop: str = ""                  # a caption also ends with (and keeps) this token, e.g. ClipCap's "."
    start_token: bool = False       # captions begin with the tokenizer's start token (DeCap's checkpoints)

    def __post_init__(self):
        # a hand-edited config.json: refused when loaded (one line naming it), not at the first caption
        n = self.no_repeat_ngram_size
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"no_repeat_ngram_size must be a whole number from 0 (off), not {n!r}")


MODEL_OPTIONS = ("lm", "lm_config", "tokenizer", "lm_mode", "lora_r", "save_full_lm", "mapper", "prefix_length",
                 "mapper_length", "mapper_layers", "label_smoothing")
BRIDGE_OPTIONS = ("noise_variance", "noise_kind", "noise_reference_dim", "mean_shift", "projection_size",
                  "projection_tau")
TEXT_OPTIONS = ("recombine", "recombine_rate")  # what a text-only kind's training captions are


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

class PrefixDecoder(LMWeights, Decoder):
    """Base of clipcap / capdec / decap: they differ in defaults and in how they are trained.
    A subclass that registers is trained by `unembed train KIND` (training/prefix.py) with the
    options below, and compared with its `compare_recipe`."""

    config_class = PrefixConfig
    # The options `unembed train KIND` takes, and refuses on a kind that leaves them out: a text-only
    # kind bridges its training text to images and may recombine that text; a paired kind (ClipCap)
    # does neither in training, so it declares MODEL_OPTIONS only.
    cli_options = MODEL_OPTIONS + BRIDGE_OPTIONS + TEXT_OPTIONS
    generation_options = ("num_beams", "max_length", "do_sample", "top_p", "temperature", "seed", "no_repeat_ngram_size")
    candidate_score = "mean token log-probability"
    # `unembed compare`'s scenes-sized recipe: a small scratch LM on a corpus BPE, trained for minutes.
    compare_recipe = {"lm": "scratch", "tokenizer": "corpus:4000", "lm_config": {"n_layer": 4, "n_embd": 256},
                      "lr": 1e-3, "warmup_steps": 100, "batch_size": 64, "max_steps": 600}

    def __init__(self, config: PrefixConfig, tokenizer=None, adapter: Path | None = None):
        super().__init__(config)
        self.tokenizer = tokenizer or make_tokenizer(config)
        lm = build_lm(config, self.tokenizer)
        # Captions are cut, and generation stopped, where the LM's positions end.
        self.positions = (getattr(lm.config, "n_positions", None) or getattr(lm.config, "max_position_embeddings", None)
                          or 1 << 30)
        if config.prefix_length + 2 > self.positions:
            raise MismatchError(f"a {config.prefix_length}-token prefix leaves no room for a caption: the LM "
                                f"{config.lm!r} reads {self.positions} positions")
        self.lm = apply_lm_mode(lm, config.lm_mode, config.lora_r, adapter)
        self.mapper = make_mapper(config, lm.get_input_embeddings().embedding_dim)
        self.bridge = ModalityBridge(config.embed_dim, config.mean_shift, config.projection_size,
                                     config.projection_tau, config.noise_variance, config.noise_kind,
                                     config.noise_reference_dim)

    @classmethod
    def example(cls, embedder, captions, workdir) -> "PrefixDecoder":
        """A one-layer scratch LM on a small corpus BPE, the bridge fitted to the captions' embeddings."""
        unique = list(dict.fromkeys(captions))
        config = cls.config_class(embedder_spec=embedder.spec, embedder_id=embedder.id, embed_dim=embedder.dim,
                                  lm="scratch", tokenizer="corpus:200", mapper_layers=1, max_length=8,
                                  lm_config={"n_layer": 1, "n_head": 2, "n_embd": 32},
                                  projection_size=min(cls.config_class.projection_size, len(unique)))
        decoder = cls(config, make_tokenizer(config, captions=captions))
        vectors = embedder.embed_texts(unique)
        decoder.bridge.fit(vectors, None, unique[:config.projection_size], vectors[:config.projection_size])
        return decoder

    # training

    def encode_captions(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        limit = min(self.config.max_caption_tokens, self.positions - self.config.prefix_length - self.prompt_room())
        return encode_captions(self.tokenizer, captions, limit, start=self.config.start_token)

    def prefix(self, vectors: torch.Tensor) -> torch.Tensor:
        if self.config.normalize:
            vectors = F.normalize(vectors, dim=-1)
        return self.mapper(vectors.to(self.mapper_device()))

    def caption_loss(self, vectors: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                     prompts: list[list[int]] | None = None) -> torch.Tensor:
        """Cross-entropy of the caption tokens given the prefix (and each row's text prompt, e.g. the
        entities an entity-aware decoder names); vectors already bridged. Prompts carry no loss."""
        head, head_mask = self.lm_inputs(self.prefix(vectors), prompts)
        k, t = head.shape[1], tokens.shape[1]
        embeds = torch.cat([head, self.lm.get_input_embeddings()(tokens)], dim=1)
        valid = torch.arange(t, device=tokens.device)[None, :] < lengths[:, None]
        mask = torch.cat([head_mask, valid.long()], dim=1)
        # Rows with shorter prompts are left-padded: positions count attended slots only, as generate does.
        positions = None if prompts is None else (mask.cumsum(dim=1) - 1).clamp(min=0)
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask,
                         position_ids=positions).logits[:, k - 1:-1]  # position k-1+i predicts token i
        labels = tokens.masked_fill(~valid, -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100,
                               label_smoothing=self.config.label_smoothing)

    def lm_inputs(self, prefix: torch.Tensor, prompts: list[list[int]] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """What the LM reads before the caption: the soft prefix [N, k, E], then each row's prompt
        tokens; rows with shorter prompts are left-padded (HF's padding scheme: a masked slot is never
        attended, and positions count from the first attended slot). Returns (embeddings [N, L, E],
        attention mask [N, L])."""
        n, k = prefix.shape[:2]
        longest = max((len(p) for p in prompts), default=0) if prompts is not None else 0
        if longest == 0:
            return prefix, torch.ones(n, k, dtype=torch.long, device=prefix.device)
        embed = self.lm.get_input_embeddings()
        inputs = prefix.new_zeros(n, k + longest, prefix.shape[2])
        mask = torch.zeros(n, k + longest, dtype=torch.long, device=prefix.device)
        for row, prompt in enumerate(prompts):
            start = longest - len(prompt)
            inputs[row, start:start + k] = prefix[row]
            if prompt:
                inputs[row, start + k:] = embed(torch.tensor(prompt, device=prefix.device))
            mask[row, start:] = 1
        return inputs, mask

    def prompt_room(self) -> int:
        """The most LM positions a text prompt can take (kept free of caption tokens in training)."""
        return 0

    def fit_text(self, embedder, captions: list[str]) -> None:
        """What the decoder learns from its training text before training starts (ViECap: its entity
        vocabulary); nothing by default."""

    def refit_text(self, captions: list[str]) -> None:
        """What a saved decoder trained further (--init) adds from its new text, keeping what fit_text
        learnt (ViECap: the counts of its entities, if it was saved without them); nothing by default."""

    def check_on_val(self, validation) -> str | None:
        """What is set from the val split (validation_set's pair, or None) before training, from what
        needs no trained weights (ViECap: how far to trust its detector); nothing by default. Returns a
        warning for the user, or None."""
        return None

    def text_summary(self) -> dict:
        """What training reports (and metrics.json keeps) of what fit_text learnt (ViECap: its
        vocabulary's size and the synonyms it merges); nothing by default."""
        return {}

    def training_prompts(self, captions: list[str], generator: torch.Generator) -> list[list[int]] | None:
        """Per-caption prompt token ids for training, drawn with `generator` (None: no prompt)."""
        return None

    def text_prompts(self, embedded, vectors: torch.Tensor, options: dict | None = None) -> list[list[int]] | None:
        """Per-item prompt token ids placed after the soft prefix at inference (None: no prompt), under
        the call's decoding `options`. The hook of entity-aware decoders, which name what they detect in
        each image."""
        return None

    def mapper_device(self) -> torch.device:
        return next(self.mapper.parameters()).device

    # inference

    @torch.no_grad()
    def write(self, embedded, **options) -> list[str]:
        """Captions for [N, D] embeddings: greedy (num_beams=1), beam search, or nucleus sampling
        (do_sample, top_p, temperature, seed); max_length in tokens."""
        return [self.text_of(row) for row in self.generate(embedded, options)]

    @torch.no_grad()
    def candidates(self, embedded, n: int, **options) -> list[list[tuple[str, float]]]:
        """n beams (num_beams raised to n) or n samples per row, each with its mean token log-probability
        (beam search's own score, at length penalty 1)."""
        out = self.generate(embedded, options, n, scored=True)
        if options.get("do_sample") or getattr(out, "sequences_scores", None) is None:  # sampled, or greedy
            steps = self.lm.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
            kept = torch.isfinite(steps) & (steps != 0)  # transformers scores finished rows' padding 0
            scores = (steps.masked_fill(~kept, 0).sum(-1) / kept.sum(-1).clamp(min=1)).tolist()
        else:
            scores = out.sequences_scores.tolist()
        texts = [self.text_of(row) for row in out.sequences]
        return [list(zip(texts[i:i + n], scores[i:i + n])) for i in range(0, len(texts), n)]

    def generate(self, embedded, options: dict, n: int = 1, scored: bool = False):
        """The LM's `generate` over the prefix of each row (options checked): token ids [N * n, L]
        (n > 1 or `scored`: n beams or samples per row, row-major, with their scores as `generate`
        returns them)."""
        self.eval()
        # Raw as the embedder made them for a decoder that feeds them raw (ClipCap's release), else unit length.
        raw = embedded.unit() if self.config.normalize else embedded.vectors.float()
        vectors = self.bridge.for_inference(raw, "text" if embedded.modality == "text" else "image")
        return self.generate_from(vectors, self.text_prompts(embedded, vectors, options), options, n, scored)

    def generate_from(self, vectors: torch.Tensor, prompts: list[list[int]] | None, options: dict, n: int = 1,
                      scored: bool = False):
        """`generate` from bridged vectors [N, D] and each row's prompt token ids (None: no prompt)."""
        seed = options.get("seed")
        inputs, attention = self.lm_inputs(self.prefix(vectors), prompts)
        if seed is not None:
            torch.manual_seed(seed)
        eos, stop = self.tokenizer.eos_id, self.stop_id()
        room = self.positions - inputs.shape[1] - (inputs.shape[1] == 1)  # a one-vector prefix gets a pad slot
        settings = dict(max_new_tokens=min(options.get("max_length") or self.config.max_length, room),
                        pad_token_id=eos, eos_token_id=eos if stop is None else [eos, stop])
        if options.get("do_sample"):
            settings.update(do_sample=True, top_p=options.get("top_p", 0.9),
                            temperature=options.get("temperature", 1.0), num_beams=1)
        else:
            settings.update(do_sample=False, num_beams=max(n, options.get("num_beams") or self.config.num_beams))
        no_repeat = options.get("no_repeat_ngram_size", self.config.no_repeat_ngram_size)
        if no_repeat:  # batched (transformers' own processor loops over hypotheses in Python)
            from unembed.compat import import_transformers
            from unembed.decoders.repeats import NoRepeatNGram

            settings.update(logits_processor=import_transformers().LogitsProcessorList([NoRepeatNGram(no_repeat)]))
        settings.update(no_repeat_ngram_size=0)  # transformers' own: off even if the LM's generation config sets it
        if n > 1 or scored:
            settings.update(num_return_sequences=n, output_scores=True, return_dict_in_generate=True)
        if inputs.shape[1] == 1:
            # transformers takes "as many cache positions as inputs_embeds" to mean the first step, so a
            # one-vector prefix would be fed again at every step. One masked left-pad slot (HF's own
            # padding scheme: no attention to it, positions from the mask) keeps the computation exact.
            inputs = torch.cat([torch.zeros_like(inputs), inputs], dim=1)
            attention = torch.cat([torch.zeros_like(attention), attention], dim=1)
        return self.lm.generate(inputs_embeds=inputs, attention_mask=attention, **settings)

    def text_of(self, row: torch.Tensor) -> str:
        return self.tokenizer.decode(self.caption_ids(row.tolist(), self.tokenizer.eos_id, self.stop_id()))

    def caption_ids(self, ids: list[int], eos: int, stop: int | None) -> list[int]:
        """A generated row up to its end: before the end token, through the stop token, without a
        leading start token."""
        if self.config.start_token and ids and ids[0] == self.tokenizer.bos_id:
            ids = ids[1:]
        ends = [i for i, t in enumerate(ids) if t == eos or t == stop]
        if not ends:
            return ids
        return ids[:ends[0] + (ids[ends[0]] == stop and ids[ends[0]] != eos)]

    def stop_id(self) -> int | None:
        if not self.config.stop:
            return None
        ids = self.tokenizer.encode_piece(self.config.stop)
        if len(ids) != 1:
            raise ModelLoadError(f"the stop string {self.config.stop!r} is not one token of this decoder's tokenizer")
        return ids[0]

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
        return cls(config, make_tokenizer(config, path), adapter=saved_adapter(path))

    @classmethod
    def upgrade_config(cls, config: dict, format_version: int, path: Path | None = None) -> dict:
        """Before format 3 every embedding reached the decoder L2-normalised: it still does. Before format
        4 no repeated token runs were blocked: they still are not."""
        config = super().upgrade_config(config, format_version, path)
        if format_version < 4:
            config = dict(config, no_repeat_ngram_size=config.get("no_repeat_ngram_size", 0))
        return dict(config, normalize=True) if format_version < 3 else config
