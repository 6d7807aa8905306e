"""ViECap (Fei et al., ICCV 2023, "Transferable Decoding with Visual Entities for Zero-Shot Image
Captioning"; FeiElysia/ViECap).

CapDec's text-only training, with a hard prompt beside the soft one. The LM reads
    [soft prompt: k vectors from the mapper over the noised embedding] "there are E1, E2 in image." caption
where E1, E2 are entities. In training they are the entities the caption itself names, each left
out with probability 0.4 (so the LM learns both to copy them and to do without them), in random
order, at most 5 of them. At inference they are what the decoder's embedder detects in the image:
zero-shot classification against its entity vocabulary (prompt-ensembled text embeddings,
softmax of cos / 0.01), the top 3 with probability at least 0.2. With no entity the prompt says
"something". Prompts carry no loss.

The vocabulary (unembed/entities.py) is built from the training captions, or read from a file:
"nouns" as ViECap's, or "phrases", attribute-noun phrases that include pairs the text never joined
("purple star" from purple circles and red stars). Its text embeddings are computed once, when the
decoder is trained, and saved with it.

Differences from the reference, and why:
- The prompt is lower-case ("there are ... in image."): a corpus BPE learned from lower-case
  captions has no capital "T".
- The default vocabulary comes from the training captions, not Visual Genome's 1,600 categories,
  which would need a download.
- Synonyms are one entity at inference (entity_merge): entries whose text embeddings are nearly the
  same ("ring" and "hoop") share one probability and are named by the word the training captions use
  most. Visual Genome's categories are already one word each; words read from captions are not, and
  unmerged they split a shape's probability, name it twice ("a hoop with a hoop") or by its rarer word.
- The detector is trusted as far as the val split shows it right (entity_min_precision, 0.5): before
  training, its precision against the entities the val references name is measured at the threshold
  and higher ones, and detection uses the least that reaches the bar; with none, the prompt names no
  entity. A detector that is wrong more often than right misleads the LM (an unsure embedder's: in a
  small scenes world, precision 0.41 to 0.47 at every threshold, and naming nothing raised test CIDEr
  from 99.8 to 111.5). The reference assumes CLIP ViT-B/32 on COCO, whose detector it trusts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from unembed.decoders.base import register_decoder
from unembed.decoders.capdec import CapDecConfig
from unembed.decoders.prefix import PrefixDecoder, option
from unembed.errors import BadInputError


@dataclass
class ViECapConfig(CapDecConfig):  # CapDec's soft prompt (10 tokens, noise 0.016), ViECap's transformer mapper
    mapper: str = "transformer"
    hard_prompt: bool = option(True, "name the detected entities in a hard prompt (off: CapDec with this "
                               "decoder's mapper, the ablation without entities)")
    entity_vocabulary: str = option("nouns", "entities built from the training captions: head nouns (ViECap's), or "
                                    "attribute-noun phrases, including pairs never seen together",
                                    ("nouns", "phrases"))
    entities_file: str = option("", "a text file of entities, one per line, instead of building them from the captions",
                                metadata={"flag": "entities"})
    entity_min_count: int = option(5, "an entity (and an attribute) must occur in this many training captions")
    entity_similarity: float = option(0.5, "phrases: an attribute moves to a noun whose attributes overlap this much "
                                      "(Jaccard) with those of a noun it was seen with")
    entity_mask: float = option(0.4, "training: each entity is left out of the prompt with this probability")
    max_entities: int = option(5, "training: at most this many of a caption's entities")
    entity_top_k: int = option(3, "inference: at most this many detected entities")
    entity_threshold: float = option(0.2, "inference: the least zero-shot probability of a detected entity")
    entity_temperature: float = option(0.01, "zero-shot classification temperature (softmax of cos / temperature)")
    # 0.98: the bundle's embedder puts every pair of scene synonyms at 0.989 or more, and its nearest
    # unlike nouns at 0.978 ("sign" and "background"); a lower bar would name a plus sign "background".
    entity_merge: float = option(0.98, "inference: entities whose text embeddings have at least this cosine are one, "
                                 "named by the word the most training captions use (0: off)")
    # 0.5: a named entity is more often right than wrong. On the scenes val split the bundle's embedder
    # detects at precision 0.865 (0.2) and a 5-epoch small-world CLIP at 0.41 to 0.47 at any threshold,
    # where naming none raised viecap's test CIDEr from 99.8 to 111.5 (benchmarks/entity_merge_small.py).
    entity_min_precision: float = option(0.5, "the detector's least precision on the val split's images (against "
                                         "the entities their references name): training measures it at "
                                         "--entity-threshold and higher ones, and detection uses the least that "
                                         "reaches this; with none, no entity is named (an embedder too unsure to "
                                         "detect); 0: trust it")
    entity_val_precision: dict = field(default_factory=dict)  # threshold -> val precision, as training measured it
    prompt_template: str = "there are {} in image."
    no_entity: str = "something"
    entities: list = field(default_factory=list)  # the vocabulary, set when the decoder is trained
    entity_counts: list = field(default_factory=list)  # how many training captions name each (none: no merging)

    def __post_init__(self):
        super().__post_init__()
        check_fraction("entity_merge", self.entity_merge, "a cosine from 0 to 1 (0: off)")
        check_fraction("entity_min_precision", self.entity_min_precision, "a precision from 0 to 1 (0: trust the "
                       "detector)")

    @property
    def has_entity_counts(self) -> bool:
        """Whether the counts that name synonym groups are kept (a decoder saved before them has none)."""
        return len(self.entity_counts) == len(self.entities)


@register_decoder
class ViECapDecoder(PrefixDecoder):
    kind = "viecap"
    summary = "ViECap: CapDec's noisy soft prompt plus a hard prompt of detected entities"
    config_class = ViECapConfig
    # ViECap's COCO recipe (scripts/train_coco.sh): batch 80, lr 2e-5, 15 epochs.
    train_defaults = dict(epochs=15, batch_size=80, lr=2e-5, warmup_steps=5000, weight_decay=0.0)
    text_only = True
    cli_options = PrefixDecoder.cli_options + (
        "hard_prompt", "entity_vocabulary", "entities_file", "entity_min_count", "entity_similarity", "entity_mask",
        "max_entities", "entity_top_k", "entity_threshold", "entity_temperature", "entity_merge",
        "entity_min_precision")
    generation_options = PrefixDecoder.generation_options + ("entity_merge",)  # merging tried without retraining

    def __init__(self, config: ViECapConfig, tokenizer=None, adapter=None):
        super().__init__(config, tokenizer, adapter)
        self.register_buffer("entity_vectors", torch.zeros(len(config.entities), config.embed_dim))
        self._vocabulary = None
        self._groups: dict = {}  # synonym_groups by (bar, counts, vectors)
        self._named: dict[str, list[str]] = {}  # training: each caption's entities

    @classmethod
    def example(cls, embedder, captions, workdir) -> "ViECapDecoder":
        decoder = super().example(embedder, captions, workdir)
        decoder.config.entity_min_count = 1
        decoder.fit_text(embedder, captions)
        return decoder

    @property
    def vocabulary(self):
        from unembed.entities import EntityVocabulary

        if self._vocabulary is None:
            self._vocabulary = EntityVocabulary(self.config.entities, self.config.entity_vocabulary)
        return self._vocabulary

    # training

    def fit_text(self, embedder, captions: list[str]) -> None:
        """Build the entity vocabulary (from the captions, or the entities file) and embed it once."""
        from unembed.entities import EntityVocabulary, entity_counts, entity_vectors

        cfg = self.config
        if cfg.entities_file:
            vocabulary = EntityVocabulary(_read_entities(cfg.entities_file), cfg.entity_vocabulary)
        else:
            vocabulary = EntityVocabulary.from_captions(captions, cfg.entity_vocabulary, cfg.entity_min_count,
                                                        cfg.entity_similarity)
        cfg.entities, self._vocabulary, self._groups = vocabulary.entries, vocabulary, {}
        cfg.entity_counts, self._named = entity_counts(vocabulary, captions)
        vectors = entity_vectors(embedder, vocabulary.entries) if vocabulary.entries else torch.zeros(0, cfg.embed_dim)
        self.entity_vectors = vectors.to(self.entity_vectors.device)

    def refit_text(self, captions: list[str]) -> None:
        """A decoder saved without its entity counts takes them from the captions it is trained further
        on (its vocabulary stays as it was: the weights learnt it)."""
        from unembed.entities import entity_counts

        if not self.config.has_entity_counts:
            self.config.entity_counts, self._named = entity_counts(self.vocabulary, captions)

    def check_on_val(self, validation) -> str | None:
        """Measure how far to trust the detector (entity_min_precision) on the val split: its precision
        at entity_threshold, then at each higher one of DETECTION_THRESHOLDS until one reaches the bar
        (entity_val_precision; detection_threshold reads it). The references' entities are read through
        the same synonym groups as the detections ("disc" is a hit for a detected "circle"). Detection
        reads the embedder and the vocabulary only, not the weights, so this runs before training.
        Returns a warning when no threshold reached the bar (no entity will be named)."""
        from unembed.entities import detection_scores

        cfg = self.config
        check_fraction("entity_min_precision", cfg.entity_min_precision, "a precision from 0 to 1")
        groups = self.synonym_groups()  # (a bad entity_merge is refused here, before any training step)
        cfg.entity_val_precision = {}
        if validation is None or not cfg.hard_prompt or not cfg.entities:
            return None
        embedded, references = validation
        truth = [references[i] for i in embedded.ids]
        for threshold in [cfg.entity_threshold, *(t for t in DETECTION_THRESHOLDS if t > cfg.entity_threshold)]:
            found = detect_at(self, embedded.vectors, threshold)
            precision = detection_scores(found, truth, self.vocabulary, groups)["precision"] or 0.0
            cfg.entity_val_precision[f"{threshold:g}"] = precision
            if precision >= cfg.entity_min_precision:
                return None
        return (f"viecap's detector is right in at most {max(cfg.entity_val_precision.values()):.0%} of its "
                f"detections on the val split (--entity-min-precision {cfg.entity_min_precision:g}), so the decoder "
                "will name no entity; references that name few of the things shown make this precision low: "
                "--entity-min-precision 0 trusts the detector")

    def detection_threshold(self) -> float | None:
        """The threshold detection uses: the least one the val check found precise enough, or None
        when none was (no entity is named: the prompt says "something", as the LM learnt from captions
        whose entities were all masked); entity_threshold without a check, or with the bar at 0."""
        cfg = self.config
        if not cfg.entity_val_precision or not cfg.entity_min_precision:
            return cfg.entity_threshold
        precise = [float(t) for t, p in cfg.entity_val_precision.items() if p >= cfg.entity_min_precision]
        return max(cfg.entity_threshold, min(precise)) if precise else None

    def training_prompts(self, captions: list[str], generator: torch.Generator) -> list[list[int]] | None:
        """Each caption's own entities, each kept with probability 1 - entity_mask, in random order."""
        cfg = self.config
        if not cfg.hard_prompt:
            return None
        prompts = []
        for caption in captions:
            if caption not in self._named:  # read each caption once, not once per epoch
                self._named[caption] = self.vocabulary.caption_entities(caption)
            named = self._named[caption][:cfg.max_entities]
            kept = [e for e, draw in zip(named, torch.rand(len(named), generator=generator).tolist())
                    if draw >= cfg.entity_mask]
            order = torch.randperm(len(kept), generator=generator).tolist()
            prompts.append(self.prompt_ids([kept[i] for i in order]))
        return prompts

    def prompt_room(self) -> int:
        cfg = self.config
        longest = sorted(cfg.entities, key=lambda e: len(self.tokenizer.encode(e)))[-max(cfg.max_entities, cfg.entity_top_k):]
        return len(self.prompt_ids(longest)) if cfg.hard_prompt else 0

    def prompt_ids(self, entities: list[str]) -> list[int]:
        cfg = self.config
        return self.tokenizer.encode(cfg.prompt_template.format(", ".join(entities) or cfg.no_entity))

    # inference

    def detect(self, vectors: torch.Tensor, entity_merge: float | None = None) -> list[list[str]]:
        """The entities the embedder sees in each embedding [N, D], best first; synonyms merged at
        `entity_merge` (None: the decoder's own bar)."""
        threshold = self.detection_threshold()
        if threshold is None:
            return [[] for _ in range(len(vectors))]
        return detect_at(self, vectors, threshold, entity_merge)

    def synonym_groups(self, entity_merge: float | None = None) -> list[int] | None:
        """entities.synonym_groups of the vocabulary at `entity_merge` (None: the decoder's own bar), or
        None: merging off, or a decoder saved without its counts (which name each group)."""
        from unembed.entities import synonym_groups

        cfg = self.config
        bar = cfg.entity_merge if entity_merge is None else entity_merge
        check_fraction("entity_merge", bar, "a cosine from 0 to 1 (0: off)")
        if not bar or not cfg.has_entity_counts:
            return None
        key = (bar, tuple(cfg.entity_counts), id(self.entity_vectors), self.entity_vectors._version)
        groups = self._groups.get(key)
        if groups is None:  # computed once for these vectors, counts and bar
            groups = synonym_groups(self.entity_vectors, cfg.entity_counts, bar)
            # a server may be asked for any bar: a few are kept (a new dict, so no reader sees it emptied)
            self._groups = {**(self._groups if len(self._groups) < 8 else {}), key: groups}
        return groups

    def merged_entities(self, entity_merge: float | None = None) -> dict[str, list[str]]:
        """Each synonym group of more than one entry at `entity_merge` (None: the decoder's own bar):
        the entry that names it -> the others, so a user can see what the embedder joins."""
        groups = self.synonym_groups(entity_merge) or []
        entries = self.config.entities
        merged: dict[str, list[str]] = {}
        for i, name in enumerate(groups):
            if i != name:
                merged.setdefault(entries[name], []).append(entries[i])
        return merged

    def text_summary(self) -> dict:
        cfg = self.config
        summary = {"entities": len(cfg.entities), "entity_merge": cfg.entity_merge,
                   "merged_entities": self.merged_entities()}
        if cfg.entity_val_precision:  # checked on val
            threshold = self.detection_threshold()
            summary.update(entity_val_precision=cfg.entity_val_precision, detection_threshold=threshold)
            if threshold is None:
                summary["detection"] = (f"no entity is named: val precision under {cfg.entity_min_precision:g} at "
                                        "every threshold")
        return summary

    def check_options(self, generation: dict) -> dict:
        """The decoding options, and entity_merge refused where it could change nothing."""
        options = super().check_options(generation)
        if "entity_merge" in options:
            cfg, why = self.config, None
            if not cfg.hard_prompt:
                why = "this viecap decoder has no hard prompt (trained with --no-hard-prompt)"
            elif not cfg.has_entity_counts:
                why = "this viecap decoder keeps no entity counts (saved before them); train it further with --init"
            elif self.detection_threshold() is None:
                why = "this viecap decoder names no entity (its detector failed its val check, entity_val_precision)"
            if why:
                raise BadInputError("option entity_merge", f"changes nothing: {why}")
        return options

    def text_prompts(self, embedded, vectors: torch.Tensor, options: dict | None = None) -> list[list[int]] | None:
        if not self.config.hard_prompt:
            return None
        return [self.prompt_ids(found) for found in self.detect(embedded.unit(), (options or {}).get("entity_merge"))]


# The thresholds check_on_val tries, from the decoder's own up: higher ones name fewer, surer entities.
DETECTION_THRESHOLDS = (0.3, 0.5, 0.7, 0.9)


def detect_at(decoder: ViECapDecoder, vectors: torch.Tensor, threshold: float,
              entity_merge: float | None = None) -> list[list[str]]:
    """The decoder's detection (entities.detect with its vocabulary and settings) at `threshold`."""
    from unembed.entities import detect

    cfg = decoder.config
    return detect(vectors, cfg.entities, decoder.entity_vectors, cfg.entity_top_k, threshold,
                  cfg.entity_temperature, decoder.synonym_groups(entity_merge))


def check_fraction(name: str, value: float, what: str) -> None:
    if not 0 <= value <= 1:
        raise BadInputError(f"option {name}", f"is {what}, not {value}")


def _read_entities(path) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(path, f"cannot be read as an entity list ({e})") from None
    entries = list(dict.fromkeys(line.strip().lower() for line in lines if line.strip()))
    if not entries:
        raise BadInputError(path, "holds no entities (one per line)")
    return entries
