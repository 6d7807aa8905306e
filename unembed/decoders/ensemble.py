"""Ensembles: several decoders of one embedder write candidates, and the embedder picks among them.

Decoders trained alike from different seeds make different mistakes: at one seed a viecap names the
held-out pair in a caption that another seed's gets wrong. An ensemble pools its members' searches:
each member writes its candidates for every row (`Decoder.candidates`, N each with `--rerank N`, its own
best without), the pool keeps each text once with its best score, and the pick is rerank's rule over
the pool (unembed/decoders/rerank.py): each member's own score plus the weight x the embedder's log-odds.
The scores are added as they are, so members must score on one scale (`Decoder.candidate_score`: the LM
kinds' mean token log-probability; retrieval's cosine or MAGIC's step score only beside their own kind).
The members run on the shared embedding pass; their candidates are embedded in one batch. Measured in
benchmarks/ensemble_scenes.py: three seeds of one recipe beat their mean on both splits; two kinds land
between them.

Edits (`--edits N`) rewrite with every member's word substitutes, at the largest of the margins the
members chose on their val splits (a member whose val said small margins hurt it is not overruled).

Saved as a directory: config.json (kind "ensemble", the members' kinds) and members/0, members/1, ...,
each a complete decoder directory, so an ensemble is as portable as its members. The members load with
the ensemble's embedder (one copy, attached to all of them); `unembed build ensemble --member DIR ...`
makes one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from unembed.decoders.base import Decoder, DecoderConfig, register_decoder
from unembed.errors import BadInputError, ModelLoadError

MEMBERS_DIR = "members"


@dataclass
class EnsembleConfig(DecoderConfig):
    member_kinds: list[str] = field(default_factory=list)  # members/0, members/1, ... in this order


@register_decoder
class EnsembleDecoder(Decoder):
    kind = "ensemble"
    summary = "ensemble: several decoders of one embedder write candidates, the embedder picks (unembed build ensemble)"
    config_class = EnsembleConfig
    needs_embedder = True  # it picks among the members' captions
    made_from_others = "unembed build ensemble --member DIR ..."
    # what decode takes besides rerank and edits: every prefix-LM option (viecap's entity_merge too);
    # each member is given those it takes, and one no member takes is refused (check_options)
    generation_options = ("num_beams", "max_length", "do_sample", "top_p", "temperature", "seed",
                          "no_repeat_ngram_size", "entity_merge")

    def __init__(self, config: EnsembleConfig, members: list[Decoder] | None = None):
        super().__init__(config)
        self.members = torch.nn.ModuleList(members or [])
        # moves with .to(device) before the members load (they load when the embedder is attached)
        self.register_buffer("device_anchor", torch.zeros(0), persistent=False)
        self.member_dirs: list[Path] = []

    @classmethod
    def build(cls, members: list[Decoder], embedder_spec: str | None = None) -> "EnsembleDecoder":
        """An ensemble of `members` (at least two, all built for one embedder, their candidates scored on
        one scale); its embedder spec is `embedder_spec` or the first member's, its substitutes and edit
        margin the members' together (see the module doc)."""
        from unembed.decoders.edits import OFF, margin_of

        check_member_count(len(members))
        first = members[0]
        for member in members:
            check_member(member, first)
        spec = portable_spec(embedder_spec or first.recorded_embedder_spec())
        config = EnsembleConfig(embedder_spec=spec, embedder_id=first.config.embedder_id,
                                embed_dim=first.config.embed_dim, member_kinds=[m.kind for m in members])
        ensemble = cls(config, members)
        ensemble.device_anchor = ensemble.device_anchor.to(first.device_of())
        ensemble.substitutes = merged_substitutes([m.substitutes for m in members])
        margins = [margin_of(m.edit_margin_record) for m in members if m.edit_margin_record]
        if margins:
            margin = max(margins)
            ensemble.edit_margin_record = {"margin": "off" if margin == OFF else margin,
                                           "chosen_by": "the largest of the members' val-chosen margins",
                                           "members": [m.edit_margin_record for m in members]}
        if first._embedder is not None:
            ensemble.attach_embedder(first._embedder)
        return ensemble

    def device_of(self) -> torch.device:
        return self.device_anchor.device

    def attach_embedder(self, embedder) -> None:
        super().attach_embedder(embedder)
        if not len(self.members) and self.member_dirs:
            from unembed.decoders import load_decoder

            for directory, kind in zip(self.member_dirs, self.config.member_kinds):
                try:
                    member = load_decoder(directory, device=str(self.device_of()), embedder=embedder)
                except ModelLoadError as e:  # name the member: a message of the loader may not
                    raise (e if str(directory) in str(e) else ModelLoadError(f"{directory}: {e}")) from None
                if member.kind != kind:
                    raise ModelLoadError(f"{directory} is a {member.kind} decoder, but the ensemble's config.json "
                                         f"lists a {kind} there")
                try:
                    check_member(member, self.members[0] if len(self.members) else member)
                except BadInputError as e:  # a saved ensemble that build would have refused
                    raise ModelLoadError(str(e)) from None
                self.members.append(member)
        for member in self.members:
            member.attach_embedder(embedder)

    # decoding

    def check_options(self, generation: dict) -> dict:
        options = super().check_options(generation)
        from unembed.generation import LOOP_OPTIONS

        for name in sorted(set(options) - set(LOOP_OPTIONS)):  # sorted: the same option named on every run
            if not any(name in m.takes() for m in self.loaded_members()):
                raise BadInputError(f"option {name}", f"no member of this ensemble takes it (members: "
                                                      f"{', '.join(self.config.member_kinds)})")
        for member in self.loaded_members():  # what each member's own files decide (viecap's entity_merge)
            member.check_options(self.options_for(member, options))
        return options

    @staticmethod
    def options_for(member: Decoder, options: dict) -> dict:
        """The decoding options `member`'s own search takes (rerank and edits are the ensemble's)."""
        return {k: v for k, v in options.items() if k in member.generation_options}

    def loaded_members(self) -> list[Decoder]:
        if not len(self.members):
            raise ModelLoadError("this ensemble's members load with its embedder: load it with load_decoder(path) "
                                 "or call attach_embedder(embedder)")
        return list(self.members)

    def write(self, embedded, **options) -> list[str]:
        """Each member's own caption (its best candidate), the embedder's pick among them."""
        from unembed.decoders.rerank import rerank

        return rerank(self.embedder_for_rerank(), embedded, self.candidates(embedded, 1, **options))

    def candidates(self, embedded, n: int, **options) -> list[list[tuple[str, float]]]:
        """Every member's n candidates per row, in member order, each text once with its best score."""
        from unembed.decoders.rerank import dedupe

        pooled: list[list[tuple[str, float]]] = [[] for _ in range(len(embedded))]
        for member in self.loaded_members():
            theirs = member.candidates(embedded, n, **self.options_for(member, options))
            for row, more in zip(pooled, theirs):
                row.extend(more[:n])  # a search may return more (MAGIC's beams); each kind lists its best first
        return [dedupe(row) for row in pooled]

    # saving: each member a decoder directory in members/

    def save_weights(self, path: Path) -> None:
        """Nothing of its own: the members' weights are in their directories (save_extra)."""

    def load_weights(self, path: Path) -> None:
        pass

    def save_extra(self, path: Path) -> None:
        for i, member in enumerate(self.loaded_members()):
            member.save(path / MEMBERS_DIR / str(i))

    def load_extra(self, path: Path) -> None:
        kinds = self.config.member_kinds
        if not (isinstance(kinds, list) and len(kinds) >= 2 and all(isinstance(k, str) for k in kinds)):
            raise ModelLoadError(f"{path}/config.json: an ensemble's member_kinds is a list of at least two decoder "
                                 f"kinds (got {kinds!r})")
        self.member_dirs = [path / MEMBERS_DIR / str(i) for i in range(len(kinds))]
        for directory in self.member_dirs:
            if not (directory / "config.json").is_file():
                raise ModelLoadError(f"{directory} is missing: one of the ensemble's members")

    @classmethod
    def example(cls, embedder, captions: list[str], workdir: Path) -> "EnsembleDecoder":
        from unembed.decoders.capdec import CapDecDecoder

        torch.manual_seed(0)
        first = CapDecDecoder.example(embedder, captions, workdir)
        torch.manual_seed(1)
        second = CapDecDecoder.example(embedder, captions, workdir)
        for member in (first, second):
            member.attach_embedder(embedder)
        return cls.build([first, second])


def portable_spec(spec: str) -> str:
    """`spec` as the saved ensemble can use it from anywhere: "bundle" where it is the shipped bundle's
    embedder directory (a bundled member names it "../embedder", beside itself), a directory as an absolute
    path (not one relative to where the ensemble was built), else as given (a pretrained name)."""
    from unembed.bundle import bundle_dir
    from unembed.embedders import BUNDLED

    if spec and Path(spec).is_dir():
        if Path(spec).resolve() == (bundle_dir() / "embedder").resolve():
            return BUNDLED
        return str(Path(spec).resolve())
    return spec


def check_member(member: Decoder, first: Decoder) -> None:
    """Refuse a member that writes no candidates to pool, or whose candidates another member's cannot be
    compared with: built for another embedder, or scored on another scale (rerank adds the scores as
    they are: an LM's mean log-probability beside retrieval's cosine would decide every pick)."""
    from unembed.embedders import same_embedder

    name = getattr(member, "source_dir", member.kind)
    if not member.candidate_score or member.made_from_others or member.needs_tokens:
        # a corrector rewrites rather than writes candidates; coca reads image tokens, which the others'
        # embedding pass does not make
        raise BadInputError(name, f"an ensemble pools decoders of embedding vectors that write candidates, and a "
                                  f"{member.kind} decoder is not one")
    if member.candidate_score != first.candidate_score:
        raise BadInputError(name, f"a {member.kind} decoder scores its candidates by {member.candidate_score}, the "
                                  f"first member ({first.kind}) by {first.candidate_score}: an ensemble's members "
                                  "score on one scale")
    if (member.config.embed_dim != first.config.embed_dim
            or not same_embedder(member.config.embedder_id, first.config.embedder_id)):
        raise BadInputError(name, f"built for embedder {member.config.embedder_spec!r} (id "
                                  f"{member.config.embedder_id}), not the first member's "
                                  f"{first.config.embedder_spec!r} (id {first.config.embedder_id})")


def check_member_count(count: int) -> None:
    if count < 2:
        raise BadInputError("--member", f"an ensemble needs at least two decoders (got {count})")


def merged_substitutes(tables: list[dict[str, list[str]]]) -> dict[str, list[str]]:
    """word -> the members' substitutes for it, the first member's first, each word once."""
    merged: dict[str, list[str]] = {}
    for table in tables:
        for word, others in table.items():
            merged[word] = list(dict.fromkeys(merged.get(word, []) + others))
    return merged
