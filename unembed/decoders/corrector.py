"""A corrector (after vec2text, Morris et al. 2023): a decoder that checks its caption against the input
embedding and rewrites it.

It wraps a text-only base decoder (capdec, decap, viecap). The base writes a hypothesis h0; the embedder
embeds it; the corrector, a prefix LM, reads (target t, hypothesis embedding e(h), t - e(h)) as its soft
prefix and the hypothesis's tokens as its prompt, and writes a new caption. K steps (`correct`); after
each, the candidate whose embedding is closest to the target is kept and fed to the next step, so a
step can only help. With rerank N, the base and every step write N candidates and all are embedded.
Then `edits` rounds of one-word rewrites (unembed/decoders/edits.py), as any decoder may run them.

Trained from text only (training/corrector.py): a caption's embedding, with noise (so that image
embeddings, which sit elsewhere, look like what it saw), goes to the base; the base's caption and its
embedding are the input, the true caption the target.

Saved as every decoder is, with the base inside (base/), so the directory stands alone.
Embedder calls per caption: N (the base's candidates) + N per step, at most; a row whose step
rewrites nothing new stops.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from unembed.decoders.base import register_decoder
from unembed.decoders.edits import EDIT_MARGIN, closest, edit_rounds, keep_closer, substitutes
from unembed.decoders.prefix import PrefixConfig, PrefixDecoder, make_mapper, option
from unembed.errors import BadInputError, ModelLoadError


@dataclass
class CorrectorConfig(PrefixConfig):
    base_kind: str = ""             # the kind of the decoder in base/
    correct: int = option(4, "correction steps at inference (unembed caption --correct K overrides)")
    noise_variance: float = option(0.016, "noise on the training captions' embeddings before the base decodes "
                                   "them (CapDec's variance per dimension)")
    clean_share: float = option(0.25, "share of training captions whose embedding gets no noise (as a text "
                                "embedding to invert arrives)")
    lm: str = "scratch"
    lm_config: dict = option({"n_layer": 4, "n_embd": 256}, "JSON of the corrector's scratch LM size (GPT-2 "
                             "architecture), e.g. '{\"n_layer\": 3, \"n_embd\": 128}'")
    mapper: str = "mlp"
    normalize: bool = False         # the prefix input is built here: [t, e(h), t - e(h)] of unit vectors
    num_beams: int = 1
    hypothesis_tokens: int = 40     # the prompt: the hypothesis, cut to this many tokens
    margin: float = option(EDIT_MARGIN, "a candidate replaces the kept caption only if the embedder's log-odds for it "
                           "(logit scale x cosine) are higher by more than this")
    edits: int = option(1, "rounds of single-word substitution after the steps (words that share contexts in the "
                        "training captions), each kept only above the margin")


@register_decoder
class CorrectorDecoder(PrefixDecoder):
    kind = "corrector"
    summary = "corrector: rewrites a text-only base decoder's caption until its embedding meets the input's"
    config_class = CorrectorConfig
    text_only = True
    needs_embedder = True  # embeds every hypothesis
    wraps_base = True      # trained over a base decoder by `unembed train corrector --base DIR`
    made_from_others = "unembed train corrector --base DIR"
    cli_options = ("lm_config", "mapper", "prefix_length", "noise_variance", "clean_share", "correct", "margin", "edits")
    generation_options = ("correct", "num_beams", "max_length", "margin", "edits")
    train_defaults = dict(max_steps=600, batch_size=64, lr=1e-3, warmup_steps=100)
    compare_recipe = {}

    def __init__(self, config: CorrectorConfig, tokenizer=None, adapter: Path | None = None, base=None):
        super().__init__(config, tokenizer, adapter)
        wide = dataclasses.replace(config, embed_dim=3 * config.embed_dim)
        self.mapper = make_mapper(wide, self.lm.get_input_embeddings().embedding_dim)
        self.__dict__["base"] = base  # not a submodule: its weights are saved in base/, not in ours
        self.train_hypotheses: dict[str, list[int]] = {}

    @classmethod
    def takes(cls) -> tuple[str, ...]:
        return cls.generation_options + ("rerank",)  # rerank N: N candidates per step, the closest kept

    @classmethod
    def example(cls, embedder, captions, workdir) -> "CorrectorDecoder":
        from unembed.decoders.capdec import CapDecDecoder

        base = CapDecDecoder.example(embedder, captions, workdir)
        config = CorrectorConfig(embedder_spec=embedder.spec, embedder_id=embedder.id, embed_dim=embedder.dim,
                                 base_kind=base.kind, tokenizer=base.config.tokenizer, mapper_layers=1, max_length=8,
                                 lm_config={"n_layer": 1, "n_head": 2, "n_embd": 32}, correct=2)
        decoder = cls(config, base.tokenizer, base=base)
        decoder.attach_embedder(embedder)
        decoder.substitutes = substitutes(captions)  # as training sets them
        return decoder

    def attach_embedder(self, embedder) -> None:
        super().attach_embedder(embedder)
        if self.base is None and getattr(self, "base_dir", None) is not None:
            from unembed.decoders import load_decoder

            self.__dict__["base"] = load_decoder(self.base_dir, device=str(self.device_of()), embedder=embedder)
        elif self.base is not None:
            self.base.attach_embedder(embedder)

    # the model

    def inputs(self, targets: torch.Tensor, hypotheses: torch.Tensor) -> torch.Tensor:
        """[t, e(h), t - e(h)] [N, 3D] of unit vectors: what the prefix is made from."""
        t, h = F.normalize(targets.float(), dim=-1), F.normalize(hypotheses.float(), dim=-1).to(targets.device)
        return torch.cat([t, h, t - h], dim=-1)

    def prompt(self, hypothesis: str) -> list[int]:
        """The hypothesis's tokens, then the start token: the caption the LM writes follows it."""
        return self.tokenizer.encode(hypothesis)[:self.config.hypothesis_tokens] + [self.tokenizer.bos_id]

    def prompt_room(self) -> int:
        return self.config.hypothesis_tokens + 1

    def training_prompts(self, captions: list[str], generator: torch.Generator) -> list[list[int]]:
        return [self.train_hypotheses[c] for c in captions]

    # inference

    def decode(self, embedded, **generation) -> list[str]:
        options = self.check_generation(generation)
        self.check_embedded(embedded)
        return self.write(embedded, **options)

    @torch.no_grad()
    def write(self, embedded, correct: int | None = None, rerank: int = 1, margin: float | None = None,
              edits: int | None = None, **options) -> list[str]:
        if self.base is None:
            raise ModelLoadError("this corrector's base decoder is loaded with its embedder: load it with "
                                 "load_decoder(path) or call attach_embedder(embedder)")
        from unembed.decoders.rerank import logit_scale

        steps = self.config.correct if correct is None else correct
        edits = self.config.edits if edits is None else edits
        # the margin in cosine units: log-odds over the embedder's temperature
        threshold = (self.config.margin if margin is None else margin) / logit_scale(self.embedder)
        self.eval()
        targets = embedded.unit()
        pools = (self.base.candidates(embedded, rerank) if rerank > 1
                 else [[(c, 0.0)] for c in self.base.decode(embedded)])
        best, best_cos, best_vectors = closest(self.embedder, targets, [[c for c, _ in row] for row in pools])
        live = list(range(len(targets)))
        for _ in range(steps):
            if not live:
                break
            hypotheses = [best[i] for i in live]
            new = self.rewrite(targets[live], hypotheses, best_vectors[live], options, rerank)
            live = keep_closer(self.embedder, live, new, targets, best, best_cos, best_vectors, threshold)
        edit_rounds(self.embedder, targets, best, best_cos, best_vectors, self.substitutes, edits, threshold)
        return best

    def rewrite(self, targets: torch.Tensor, hypotheses: list[str], vectors: torch.Tensor, options: dict,
                n: int) -> list[list[str]]:
        """One correction step: n captions per row from (target, hypothesis, its embedding)."""
        prompts = [self.prompt(h) for h in hypotheses]
        out = self.generate_from(self.inputs(targets, vectors), prompts, options, n)
        rows = out.sequences if n > 1 else out
        texts = [self.text_of(row) for row in rows]
        return [texts[i:i + n] for i in range(0, len(texts), n)]

    def candidates(self, embedded, n: int, **options) -> list[list[tuple[str, float]]]:
        raise BadInputError("option rerank", "a corrector reranks inside its steps (rerank=N: N candidates per step)")

    # saving: the base decoder inside, in base/

    def save_extra(self, path: Path) -> None:
        super().save_extra(path)
        self.base.save(path / "base")

    def load_extra(self, path: Path) -> None:
        super().load_extra(path)
        if not (path / "base" / "config.json").is_file():
            raise ModelLoadError(f"{path}/base is missing: the corrector's base decoder")
        self.base_dir = path / "base"  # loaded when the embedder is attached: the base shares it

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.__dict__.get("base") is not None:
            self.base._apply(fn, *args, **kwargs)  # .to(device) moves the base along
        return self
