"""The decoding options: one contract for the library, the CLI and the server.

In the spirit of transformers' `GenerationConfig`, every option a decoder's `decode(...)` may take is
declared here once, with its type, bounds and help. Each decoder kind lists the ones it takes
(`Decoder.generation_options`, in its own module). `check_generation` is the one check: the
library's `decode`, `unembed caption`'s flags and `unembed serve`'s query parameters all go through
it, so an option a decoder does not take, or a value out of bounds, is refused the same way
everywhere, in one line naming the option, the decoder and what it takes.
"""
from __future__ import annotations

from dataclasses import dataclass

from unembed.errors import BadInputError


@dataclass(frozen=True)
class GenerationOption:
    name: str
    type: type                 # int, float, bool or str
    help: str
    low: float | None = None   # bounds, inclusive (`low_open`: exclusive below)
    high: float | None = None
    low_open: bool = False
    needs_sampling: bool = False  # meaningful only with do_sample
    needs_rerank: bool = False    # meaningful only with rerank > 1

    def bounds(self) -> str:
        if self.type is bool:
            return "true or false"
        if self.type is str:
            return f"a text of at most {int(self.high)} characters"
        if self.type is int:
            return f"an integer in [{int(self.low)}, {int(self.high)}]"
        return f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"

    def check(self, value, decoder: str):
        """The value as its type, or BadInputError naming the option, the decoder and the bounds."""
        where, takes = f"option {self.name}", f"the {decoder} decoder takes {self.bounds()}"
        if self.type is bool:
            if not isinstance(value, bool):
                raise BadInputError(where, f"{takes}, got {value!r}")
            return value
        if self.type is str:
            if not isinstance(value, str) or len(value) > self.high:
                raise BadInputError(where, f"{takes}, got {value!r:.60}")
            return value
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if number is None or (self.type is int and not float(number).is_integer()):
            raise BadInputError(where, f"{takes}, got {value!r}")
        number = self.type(number)
        below = number <= self.low if self.low_open else number < self.low
        if below or number > self.high or number != number:  # NaN fails too
            raise BadInputError(where, f"{takes}, got {value!r}")
        return number


GENERATION_OPTIONS: dict[str, GenerationOption] = {o.name: o for o in (
    GenerationOption("num_beams", int, "beam search width (1 = greedy; default: the decoder's)", 1, 16),
    GenerationOption("max_length", int, "longest caption in tokens (default: the decoder's)", 1, 128),
    GenerationOption("do_sample", bool, "nucleus sampling instead of beam search"),
    GenerationOption("top_p", float, "nucleus sampling mass (default 0.9)", 0, 1, low_open=True, needs_sampling=True),
    GenerationOption("temperature", float, "sampling temperature (default 1.0)", 0, 10, low_open=True,
                     needs_sampling=True),
    GenerationOption("seed", int, "seed of the sampling (default: torch's global generator)", 0, 2 ** 31 - 1),
    GenerationOption("min_length", int, "shortest caption in tokens", 0, 128),
    GenerationOption("repetition_penalty", float, "penalty on repeated tokens (1 = none)", 0, 10, low_open=True),
    GenerationOption("no_repeat_ngram_size", int, "no run of this many tokens twice in a caption (0 = off; default: "
                     "the decoder's: 3 for capdec, decap and viecap trained in decoder format 4 or later and the "
                     "bundled ones, 0 for imported published ones and all else)",
                     0, 16),
    GenerationOption("length_penalty", float, "beam search's length exponent", -10, 10),
    GenerationOption("k", int, "candidates re-ranked per token", 1, 1024),
    GenerationOption("alpha", float, "degeneration penalty weight", 0, 100),
    GenerationOption("beta", float, "embedder score weight", 0, 100),
    GenerationOption("prompt", str, "text the LM continues (not part of the caption)", high=200),
    GenerationOption("stop", str, "a caption ends at the token holding this text", high=20),
    GenerationOption("logit_scale", float, "softmax temperature of the embedder score (0 = the embedder's)", 0, 1000),
    GenerationOption("rerank", int, "write this many candidates with the decoder's own search and keep the one the "
                     "embedder scores closest to the input (1 = off)", 1, 64),
    GenerationOption("rerank_weight", float, "with --rerank: score = the decoder's own score + this weight x the "
                     "embedder's logit scale x cosine with the input (0 = the decoder alone; default 0.05, chosen for "
                     "images; 100 lets the cosine decide, for inverting a text embedding)", 0, 100,
                     needs_rerank=True),
    GenerationOption("rerank_consensus", float, "with --rerank: add this weight x each candidate's expected n-gram "
                     "likeness to the input's other candidates (minimum Bayes risk; 0 = off, the default)", 0, 100,
                     needs_rerank=True),
    GenerationOption("rerank_stop", float, "with --rerank: embed each input's candidates one at a time (the "
                     "decoder's best first, then as --rerank-guide orders them) and stop at the first whose cosine "
                     "with the input reaches this (for inverting a text embedding, 0.9999: no caption beats one with "
                     "the input's own embedding); the pick is made among those embedded", 0, 1, low_open=True,
                     needs_rerank=True),
    GenerationOption("rerank_calls", int, "with --rerank: embed at most this many of each input's candidates, one at "
                     "a time as --rerank-stop does (default: all of them)", 1, 64, needs_rerank=True),
    GenerationOption("rerank_guide", float, "with --rerank-stop or --rerank-calls: after the decoder's best, embed "
                     "next the candidate with the best decoder score + this x the embedder's logit scale x the cosine "
                     "predicted from those already embedded (0 = the decoder's order; default 5, chosen on the scenes "
                     "val split)", 0, 100, needs_rerank=True),
    GenerationOption("entity_merge", float, "viecap: detected entities whose text embeddings have at least this "
                     "cosine are one entity (0 = none merged; default: the decoder's, 0.98)", 0, 1),
    GenerationOption("correct", int, "correction steps of a corrector decoder (0 = its base's caption)", 0, 16),
    GenerationOption("margin", float, "a rewrite (an edit, a corrector's step) is kept only if the embedder's "
                     "log-odds for it beat the kept caption's by more than this (default: the margin the decoder chose on its "
                     "val split when trained with one, its edits.json; else 1)", 0, 100),
    GenerationOption("edits", int, "rounds of one-word rewrites checked by the embedder: each word in turn replaced "
                     "by the words seen in its places in the training captions (default 0, none; a corrector's: 1)", 0, 8),
)}
# Every decoder takes these: reranking and edits are done once, in Decoder.decode, over any kind's captions.
LOOP_OPTIONS = ("rerank", "rerank_weight", "rerank_consensus", "rerank_stop", "rerank_calls", "rerank_guide", "edits",
                "margin")
RERANK_WEIGHT = 0.05  # chosen on the scenes val split (benchmarks/loop_scenes.py records the sweep)
RERANK_GUIDE = 5.0  # chosen on the scenes val split, inverting with 8 of 32 beams (loop_scenes.py)
SAMPLING = ("do_sample", "top_p", "temperature", "seed")


def check_generation(kind: str, takes: tuple[str, ...], options: dict) -> dict:
    """`options` (None values dropped) checked against what a `kind` decoder `takes`: each one known
    to it and within its bounds, sampling-only ones only with do_sample. Raises BadInputError."""
    options = {k: v for k, v in options.items() if v is not None}
    for name, value in options.items():
        if name not in takes:
            offered = f"it takes {', '.join(takes)}" if takes else "it takes no decoding options"
            raise BadInputError(f"option {name}", f"the {kind} decoder does not take it ({offered})")
        options[name] = GENERATION_OPTIONS[name].check(value, kind)
    if not options.get("do_sample"):
        loose = [n for n in options if GENERATION_OPTIONS[n].needs_sampling]
        if loose:
            raise BadInputError(f"option {loose[0]}", f"the {kind} decoder uses it only with do_sample "
                                                      "(--sample; sample=true)")
    if options.get("rerank", 1) <= 1:
        loose = [n for n in options if GENERATION_OPTIONS[n].needs_rerank]
        if loose:
            raise BadInputError(f"option {loose[0]}", f"the {kind} decoder uses it only with rerank above 1 "
                                                      "(--rerank N; rerank=N)")
    if "rerank_guide" in options and "rerank_stop" not in options and "rerank_calls" not in options:
        raise BadInputError("option rerank_guide", f"the {kind} decoder uses it only with rerank_stop or rerank_calls "
                                                   "(--rerank-stop C, --rerank-calls K)")
    return options
