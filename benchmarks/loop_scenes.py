"""Closing the loop on the scenes world: does checking a caption against the input embedding (rerank,
a vec2text-style corrector) make text-only decoders name what they see, and invert text embeddings?

Same embedder, data and training budget as entity_scenes.py: the shipped bundle's embedder and
decoders (scripts/bundle.json: scratch LMs of 3 layers x 128, 600 steps of 64 on `unembed data scenes
--n 20000 --seed 0`), and a corrector per base trained here with the same budget
(`unembed train corrector --base DIR --max-steps 600 --batch-size 64 --max-captions 20000`, LM 3 x 128:
600 x 64 examples are about two passes over 20,000 captions, each decoded once by the base first).

1. The rerank weight, swept on the val split (500 images; CIDEr of clipcap, capdec and viecap with
   rerank 8, the same candidates picked at each weight); the default in unembed/generation.py is the
   weight with the best mean.
2. Captioning, test and compositional splits (1,000 images each): per base decoder, the ablations
   base only / rerank 8 / corrector K = 1, 2, 4, 8 (steps only) / edits only / K = 4 + edits (the
   corrector's defaults) / both (its defaults with 4 candidates per step) / K = 4 with no margin and
   no edits (the rule before the margin); paired ClipCap as the reference. CIDEr, BLEU-4, captions naming a held-out colour-shape pair (and
   naming one that is in the image), embedder calls per caption, seconds.
3. Inversion of the test split's first caption per image (1,000): exact match, BLEU-4, cosine,
   embedder calls per caption: base, rerank 8, corrector K = 1 and 7 (calls <= 8), its defaults.
   And an inverter: the bundle's CapDec recipe with no noise (`unembed train capdec --noise-variance 0`),
   trained 600 steps (the same budget), 2,400, 7,200 and 21,600 (about 1.5, 4.6 and 13.8 passes over the
   100,000 training captions): CapDec's noise is there to cross the modality gap and drowns the detail
   inversion needs. Rerank 8 at the captioning weight and at 100 (the cosine decides: the target is a
   text embedding, so the exact caption's cosine is 1), the same from the best 8 of 16 beams (still 8
   embedder calls), and a corrector over the 2,400-step inverter (the budget above). The 21,600-step
   inverter is then trained further (`--init`, see RESTARTS): 43,200, 54,000 and 64,800 steps in all.
   The longest is also read with rerank_stop (rerank 8, 16 and 32, stopping at cosine 0.9999): the
   mean embedder calls then fall, and at most N are made for a caption. And with at most 8 calls for
   every caption from 16 or 32 beams (rerank_calls 8), chosen in turns by rerank_guide, whose default
   is the best of GUIDES on the val split's captions (`guide_sweep` in the JSON).

4. With --small-world: the same methods in a small world (3,000 scenes, seed 7, an embedder trained
   here by `unembed train clip --epochs 5`, clipcap / capdec / viecap by `unembed compare` with its
   600-step 4 x 256 scratch-LM recipe, a corrector over capdec with the budget above): test and
   compositional CIDEr and held-out pairs for base / rerank 8 / corrector K=4 / both / word edits
   (`--edits 1`, alone and after rerank 8, over viecap and every plain capdec seed), on 1,000 images
   a split (--images; the training scenes do not depend on it), and the rerank weight swept on this
   world's val split by part 1's rule, with its test and compositional scores. A loop that trusts an
   unsure embedder shows here. Only the decoders of rows the JSON lacks (for this embedder) are trained.

5. Recombined captions (`unembed train KIND --recombine colours`): the bundle's recipes for capdec,
   viecap and decap trained again on the training captions plus a copy of each with its colour words
   drawn anew, so the held-out pairs are written in training text (as every other pairing is), and
   read with rerank 8 and a corrector over them (the budget above). CapDec with and without it at
   seeds 0, 1 and 2 (SEEDS), so a difference can be set against a seed's. viecap and decap also with 2
   and 4 recombined copies per caption (RATES, `--recombine-rate`; rate 2 at seeds 0, 1 and 2, with
   rerank 8, 16 and 32, and with one round of word edits (`--edits 1`) alone and after rerank 32, and
   two rounds after rerank 32, and one round at margins 2 and 3 (MARGINS; in the small world too, over
   every capdec seed); rate 1 at seeds 1 and 2 too). In the small world too (its own compare recipe, seeds 0
   and 1, a corrector over capdec only; its seed 0 without is the compare run's capdec, and plain capdec
   at SMALL_SEEDS too, each with rerank 8).
6. With --margin-sweep, after 4 and 5: the margin of one round of edits as training chooses it, on
   val, for the small world's capdec seeds and viecap and the main world's six rate-2 decoders, and
   what it gives on test and compositional against no edits and margin 1 ("margin_sweep").
7. Synonyms merged in viecap's detection (ViECapConfig.entity_merge, the default from then on): the
   shipped viecap alone and with rerank 8, and the rate-2 viecap seeds unmerged (the same weights, this
   run), merged, merged with rerank 32, and merged with rerank 32 and one round of edits at the margin
   each chose on val; and the same recipe with entity masking 0.2 (LESS_MASKED), merged (and, as part
   5 reads every recombined decoder, unmerged alone and, at seed 0, with rerank 8). Every viecap row of
   parts 1 to 6 is measured unmerged, as it was recorded; a corrector over viecap trained today learns
   from its base's merged captions, and is measured with them.
8. A longer budget (LONGER, 1,800 steps instead of 600, the same recipes otherwise): plain capdec and the
   entity-mask-0.2 rate-2 viecap at seeds 0, 1 and 2, viecap merged alone, with rerank 32 and with rerank 32
   and one round of edits at its own margin. Are the goals at one or two seeds of three a budget's
   seed spread, and does capdec's test CIDEr (the goal's bar) move with the budget too?

    python benchmarks/loop_scenes.py --work bench-run/loop --out benchmarks/results/loop_scenes.json
    python benchmarks/loop_scenes.py --work bench-run/loop --small-world   # adds "small_world" to the JSON
    python benchmarks/loop_scenes.py --work bench-run/loop --recombined-only   # parts 5, 7 and 8's new rows alone
    python benchmarks/loop_scenes.py --work bench-run/loop --margin-sweep   # adds "margin_sweep"
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from entity_scenes import heldout_counts, pairs_in_images
from result_paths import recorded_path

from unembed.decoders.viecap import ViECapConfig

BUNDLE = Path(__file__).resolve().parents[1] / "unembed" / "bundle"
BASES = ("capdec", "viecap", "decap")
CORRECTED = ("capdec", "viecap")  # a corrector is trained over these (decap: base and rerank only, for time)
CORRECTOR = ["--lm-config", '{"n_layer": 3, "n_embd": 128}', "--max-steps", "600", "--batch-size", "64",
             "--max-captions", "20000"]
WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 100.0)
STEPS = (1, 2, 4, 8)
# The bundle's text-only recipe (scripts/bundle.json over the prefix kinds' compare recipe), less its steps.
BUNDLE_RECIPE = ["--lm", "scratch", "--lm-config", '{"n_layer": 3, "n_embd": 128}', "--tokenizer", "corpus:4000",
                 "--batch-size", "64", "--lr", "1e-3", "--warmup-steps", "100"]
KIND_RECIPE = {"capdec": [], "viecap": ["--mapper", "mlp"], "decap": ["--projection-size", "5000"]}
# The inverter: the bundle's capdec without noise.
INVERTER = BUNDLE_RECIPE + ["--mapper", "mlp", "--noise-variance", "0"]
# The small world's: `unembed compare`'s recipe for the prefix kinds (unembed/decoders/prefix.py), less its steps.
SMALL_RECIPE = ["--lm", "scratch", "--lm-config", '{"n_layer": 4, "n_embd": 256}', "--tokenizer", "corpus:4000",
                "--batch-size", "64", "--lr", "1e-3", "--warmup-steps", "100"]
# Part 5: the bundle's recipes again on the same captions plus a recombined copy of each (colours traded).
RECOMBINE = ["--recombine", "colours"]
SEEDS = (0, 1, 2)  # capdec with and without recombined captions: is a difference larger than a seed's?
# The small world's plain capdec beyond the compare run's (seed 0), each also with rerank 8: the goal there
# is "no worse than CapDec", and one seed's rerank change (-0.3 test CIDEr) is smaller than two seeds' gap.
SMALL_SEEDS = (1, 2, 3)
# More recombined copies per caption for the kinds nearest the goals (viecap on held-out pairs, decap on
# CIDEr): kind -> {copies per caption: seeds}. Rate 1 at seeds 1 and 2 pairs with rate 2's (rate 1 at
# seed 0 is "{kind} recombined").
RATES = {"viecap": {1: (1, 2), 2: (0, 1, 2), 4: (0,)}, "decap": {1: (1, 2), 2: (0, 1, 2), 4: (0,)}}
# The decoders nearest the goals, read with rerank 16 and 32 too, and with EDITS rounds of edits (the
# corrector's default; its default margin), alone and after rerank 32.
EDITS = 1
MORE = ("decap recombined", "viecap recombined", "decap recombined, rate 2", "viecap recombined, rate 2",
        "viecap recombined, rate 2, seed 1", "decap recombined, rate 2, seed 1",
        "viecap recombined, rate 2, seed 2", "decap recombined, rate 2, seed 2")
# The rate-2 decoders (every seed) also with two rounds after rerank 32 (one round changes one word, and a
# caption can need both the colour and the shape of a pair changed to name the held-out one), and with one
# round at each of MARGINS.
RATE_TWO = tuple(name for name in MORE if "rate 2" in name)
# Larger margins for one round of edits, in both worlds (RATE_TWO; every small-world capdec seed): edits
# lose small-world test CIDEr at the default margin; does a larger one keep the main world's gains
# without those losses?
MARGINS = (2.0, 3.0)
# Part 7: viecap's detection with synonyms merged (ViECapConfig.entity_merge, its default since this part),
# against the same weights unmerged (UNMERGED, as every viecap row before it was measured): the shipped
# viecap, and the rate-2 viecap seeds, alone, with rerank 32, and with rerank 32 and one round of edits at
# the margin each chose on val at the end of training, merged.
UNMERGED = 0.0
MERGED = ViECapConfig.entity_merge
MERGED_RATE_TWO = tuple(name for name in RATE_TWO if name.startswith("viecap"))
# ... and trained with each entity left out of the prompt less often (0.2, ViECap's is 0.4), so the LM
# copies the detected shape more: at seed 1 the rate-2 viecap wrote "an orange cross" under a prompt
# that said "heart".
LESS_MASKED = {"viecap recombined, rate 2, entity mask 0.2" + (f", seed {s}" if s else ""):
               ("viecap", RECOMBINE + ["--recombine-rate", "2", "--entity-mask", "0.2"], s) for s in SEEDS}
# Part 8: three times the steps for plain capdec (the test goal's bar) and LESS_MASKED's recipe, each seed.
STEPS_SHORT, STEPS_LONG = 600, 1800
LONGER = {f"capdec, {STEPS_LONG} steps, seed {s}": ("capdec", [], s, STEPS_LONG) for s in SEEDS}
LONGER.update({f"viecap recombined, rate 2, entity mask 0.2, {STEPS_LONG} steps, seed {s}":
               (kind, options, s, STEPS_LONG) for kind, options, s in LESS_MASKED.values()})
INVERTER_STEPS = (600, 2400, 7200, 21600)
# The longest inverter trained further (`--init`), each time for (steps, peak lr): a new data order, half the
# last peak lr, its own warm-up and cosine decay (warm restarts, as in SGDR).
RESTARTS = ((21600, "5e-4"), (10800, "2.5e-4"), (10800, "1.25e-4"))
CORRECTED_INVERTER = 2400
STOP = 0.9999  # rerank_stop for inversion: the target's own text has cosine 1
GUIDES = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0)


def restart_options(steps: int, lr: str, seed: int) -> list[str]:
    return ["--max-steps", str(steps), "--batch-size", "64", "--lr", lr, "--warmup-steps", "100", "--seed", str(seed)]


def corrector_steps(name: str, corrector: Path) -> dict:
    """K = 1 and 7 steps of a corrector with no edits: 1 embedder call for the base's caption, then one
    per step that changed it, so at most 8, as the issue's inversion goal allows."""
    return {f"{name} corrector K={k} (no edits)": (corrector, {"correct": k, "edits": 0}) for k in (1, 7)}


def inversion_rows(bases, correctors: dict, inverters: dict, corrected_inverter: Path) -> dict:
    """Part 3's rows in groups (each captioning base, then the inverters): name -> (directory, options)."""
    groups = {}
    for base in bases:
        rows = groups[base] = {base: (BUNDLE / base, {}), f"{base} rerank 8": (BUNDLE / base, {"rerank": 8})}
        if base in correctors:
            rows.update(corrector_steps(base, correctors[base]))
            rows[f"{base} corrector K=4 + edits (its defaults)"] = (correctors[base], {})
    rows = groups["inverters"] = {}
    for steps, path in inverters.items():
        name, inverse = f"inverter ({steps} steps)", {"rerank": 8, "rerank_weight": 100.0}
        rows.update({name: (path, {}), f"{name} rerank 8": (path, {"rerank": 8}),
                     f"{name} rerank 8, weight 100": (path, inverse),
                     f"{name} rerank 8 of 16 beams, weight 100": (path, {**inverse, "num_beams": 16})})
    # The longest inverter with rerank_stop: candidates embedded best first until one has the target's
    # own embedding (cosine 0.9999), so most captions cost one call and N can grow past 8.
    for n in (8, 16, 32):
        rows[f"{name} rerank {n}, weight 100, stop at cosine 0.9999"] = (
            path, {"rerank": n, "rerank_weight": 100.0, "rerank_stop": STOP, "rerank_guide": 0.0})
    # at most 8 calls for every caption, from 16 or 32 beams: the guide picks which 8 (its default, then off)
    for n in (16, 32):
        rows[f"{name} rerank {n}, weight 100, stop at 0.9999, at most 8 calls"] = (
            path, {"rerank": n, "rerank_weight": 100.0, "rerank_stop": STOP, "rerank_calls": 8})
    rows[f"{name} rerank 32, weight 100, stop at 0.9999, at most 8 calls, guide 0"] = (
        path, {"rerank": 32, "rerank_weight": 100.0, "rerank_stop": STOP, "rerank_calls": 8, "rerank_guide": 0.0})
    rows.update(corrector_steps(f"inverter ({CORRECTED_INVERTER} steps)", corrected_inverter))
    return groups


def unembed(*args: str) -> None:
    print("+ unembed", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "unembed.cli", *args], check=True)


def decoded(decoder, embedded, **generation) -> list[str]:
    """The decoder's captions of `embedded`, 100 inputs a batch."""
    return [c for s in range(0, len(embedded), 100) for c in decoder.decode(embedded.select(slice(s, s + 100)), **generation)]


def caption_scores(decoder, embedder, embedded, references, in_image=None, **generation) -> dict:
    calls, start = embedder.texts_embedded, time.perf_counter()
    captions = decoded(decoder, embedded, **generation)
    seconds = time.perf_counter() - start
    row = scored(captions, embedded, references, in_image)
    return {"CIDEr": row.pop("CIDEr"), "BLEU-4": row.pop("BLEU-4"),
            "embedder_calls_per_caption": round((embedder.texts_embedded - calls) / len(captions), 2),
            "seconds": round(seconds, 1), **row}


def scored(captions: list[str], embedded, references: dict, in_image: dict | None = None) -> dict:
    """CIDEr and BLEU-4 of the captions of `embedded`'s inputs, the first as an example, and the
    held-out counts given `in_image` (the compositional split's pairs)."""
    from unembed.eval.metrics import coco_caption_metrics

    predictions = dict(zip(embedded.ids, captions))
    metrics = coco_caption_metrics(predictions, references, spice=False, meteor=False)
    row = {"CIDEr": round(metrics["CIDEr"], 4), "BLEU-4": round(metrics["BLEU-4"], 4), "example": captions[0]}
    if in_image is not None:
        row.update(heldout_counts(predictions, in_image))
    return row


def candidate_rows(decoder, embedded, n: int, **generation) -> list[list[tuple[str, float]]]:
    """The decoder's n candidates for each input (its decoding options `generation`), 100 inputs a
    batch, each text once (rerank.dedupe)."""
    from unembed.decoders.rerank import dedupe

    return [dedupe(row) for s in range(0, len(embedded), 100)
            for row in decoder.candidates(embedded.select(slice(s, s + 100)), n, **generation)]


def weight_sweep(decoder, embedder, embedded, references) -> dict:
    """CIDEr of the decoder alone, then of rerank 8 at each of WEIGHTS: its 8 candidates and their
    cosines computed once, then picked at every weight."""
    from unembed.decoders.rerank import logit_scale, pick, row_cosines
    from unembed.eval.metrics import coco_caption_metrics

    rows = candidate_rows(decoder, embedded, 8)
    cosines = row_cosines(embedder, embedded, rows)
    sweep = {"base (its default beams, no rerank)": round(caption_scores(decoder, embedder, embedded, references)["CIDEr"], 4)}
    for weight in WEIGHTS:
        picked = dict(zip(embedded.ids, pick(rows, cosines, weight, logit_scale(embedder))))
        sweep[f"rerank 8, weight {weight:g}"] = round(coco_caption_metrics(picked, references, spice=False,
                                                                           meteor=False)["CIDEr"], 4)
    return sweep


def chosen_weight(sweeps: dict) -> dict:
    """The weight with the best mean val CIDEr over the swept decoders, and those means."""
    means = {w: sum(s[f"rerank 8, weight {w:g}"] for s in sweeps.values()) / len(sweeps) for w in WEIGHTS}
    return {"weight": max(means, key=means.get), "mean_val_CIDEr": {f"{w:g}": round(m, 4) for w, m in means.items()}}


def guide_sweep(decoder, embedder, captions: list[str]) -> dict:
    """Exact inversions of `captions` (%) and embedder calls per caption at each of GUIDES, from the
    decoder's 32 beams with rerank_calls 8 and rerank_stop STOP: the beams once, then embedded in turns."""
    from unembed.decoders.rerank import rerank
    from unembed.eval.inversion import exact_matches, text_targets

    embedded = text_targets(embedder, captions)
    beams = [row for s in range(0, len(captions), 100) for row in decoder.candidates(embedded.select(slice(s, s + 100)), 32)]
    sweep = {"captions": len(captions), "rerank": 32, "rerank_calls": 8, "rerank_stop": STOP}
    for guide in GUIDES:
        before = embedder.texts_embedded
        got = rerank(embedder, embedded, beams, 100.0, STOP, 8, guide)
        sweep[f"guide {guide:g}"] = {"exact_match": round(sum(exact_matches(got, captions)) / len(captions), 4),
                                     "embedder_calls_per_caption": round((embedder.texts_embedded - before) / len(captions), 2)}
    return sweep


def eval_splits(embedder, data: Path, images: dict[str, int]) -> dict:
    """split -> (its first `images[split]` image embeddings, {image id: references})."""
    from unembed.data.splits import load_split
    from unembed.pipeline import embed_split

    splits = {}
    for split, limit in images.items():
        embedded = embed_split(embedder, data / split)
        _, captions, ids = load_split(data / split)
        splits[split] = (embedded.select(range(min(limit, len(embedded)))), {str(i): c for i, c in zip(ids, captions)})
    return splits


def decoder_loader(embedder):
    """decoder_at(path, entity_merge): the decoder at `path` on the CPU with `embedder`, each loaded
    once per entity_merge, which a viecap decoder takes instead of its own. By default UNMERGED: the
    rows measured before viecap merged synonyms are measured as they were. (A corrector's viecap base
    keeps its own: the corrector learnt from the hypotheses that base wrote when it was trained.)"""
    from unembed.decoders import load_decoder

    loaded = {}

    def decoder_at(path: Path, entity_merge: float = UNMERGED):
        if (path, entity_merge) not in loaded:
            decoder = load_decoder(path, device="cpu", embedder=embedder)
            if hasattr(decoder.config, "no_repeat_ngram_size"):  # every row was measured before decoders
                decoder.config.no_repeat_ngram_size = 0        # blocked repeats (repeats_consensus.py)
            if hasattr(decoder.config, "entity_merge"):
                decoder.config.entity_merge = entity_merge
                if entity_merge and not decoder.config.has_entity_counts:  # a row called merged must be
                    raise SystemExit(f"{path} keeps no entity counts (trained before them): train it again")
            loaded[path, entity_merge] = decoder
        return loaded[path, entity_merge]
    return decoder_at


def phrase_variants(caption: str) -> list[str]:
    """Every caption one colour-shape phrase away from `caption`: each "<colour> <shape>" in it replaced
    by each of the 8 x 8 colours and shapes (singular or plural as it was, "a"/"an" fitted)."""
    from unembed.data.captions import indefinite_article
    from unembed.data.scenes import COLOUR_WORDS, COLOURS, SHAPE_WORDS, SHAPES, _plural

    colours = {w for ws in COLOUR_WORDS.values() for w in ws}
    shapes = {w: False for ws in SHAPE_WORDS.values() for w in ws}
    shapes |= {_plural(w): True for w in list(shapes)}
    words, out = caption.split(), []
    for i in range(len(words) - 1):
        for n in (1, 2) if words[i] in colours else ():  # "plus sign" is two words
            phrase = " ".join(words[i + 1:i + 1 + n])
            if phrase.rstrip(",") not in shapes:
                continue
            plural, tail = shapes[phrase.rstrip(",")], "," if phrase.endswith(",") else ""
            before = words[:i]
            for colour in COLOURS:
                if before and before[-1] in ("a", "an"):
                    before = before[:-1] + [indefinite_article(colour)]
                for shape in SHAPES:
                    name = _plural(SHAPE_WORDS[shape][0]) if plural else SHAPE_WORDS[shape][0]
                    out.append(" ".join(before + [colour, name + tail] + words[i + 1 + n:]))
    return [v for v in dict.fromkeys(out) if v != caption]


def heldout_ceiling(embedder, split_dir: Path, images: int) -> dict:
    """How many held-out pairs the embedder itself would name: for each compositional image, its
    reference captions and every caption one colour-shape phrase away from them, the embedder picking
    the closest to the image. What a decoder that wrote the references' other words exactly could
    reach by asking the embedder which colour and shape they hold."""
    import torch.nn.functional as F

    from unembed.data.scenes import HELDOUT_PAIRS, named_pairs
    from unembed.data.splits import load_split
    from unembed.pipeline import embed_split

    targets = embed_split(embedder, split_dir).unit()[:images]
    _, references, _ = load_split(split_dir)
    closest_reference = closest_of_all = 0
    for target, refs in zip(targets, references):
        refs = list(dict.fromkeys(refs))  # the candidates below start with them, each once
        candidates = list(dict.fromkeys(refs + [v for r in refs for v in phrase_variants(r)]))
        cosines = F.normalize(embedder.embed_texts(candidates).float(), dim=-1) @ target.float()
        closest_of_all += bool(named_pairs(candidates[int(cosines.argmax())]) & HELDOUT_PAIRS)
        closest_reference += bool(named_pairs(refs[int(cosines[:len(refs)].argmax())]) & HELDOUT_PAIRS)
    return {"images": len(targets), "closest_reference_names_heldout": closest_reference,
            "closest_of_references_and_phrase_variants_names_heldout": closest_of_all}


def run_dir(work: Path, name: str) -> Path:
    """Where the plan trains the decoder it calls `name` ("viecap recombined, rate 2" -> viecap-recombined-rate-2)."""
    return work / name.replace(", ", "-").replace(" ", "-")


def recombined_plan(work: Path, data: Path, embedder: str, recipe: list[str], kind_recipe: dict,
                    plain_seeds=SEEDS, seeds=SEEDS, corrected=("capdec", "viecap"), rates=None,
                    more_runs=None) -> dict:
    """Part 5's decoders: name -> (directory, the `unembed` arguments that train it, the plan's name of
    the decoder it needs first or None). capdec without recombined captions at `plain_seeds` and with
    them at `seeds`; the other kinds of `kind_recipe` recombined at seed 0, and at the copies per
    caption of `rates` (kind -> {rate: seeds}); `more_runs` (name -> (kind, its options, seed)); a
    corrector over the recombined kinds in `corrected`."""
    runs = {f"capdec, seed {s}": ("capdec", [], s) for s in plain_seeds}
    runs.update({f"capdec recombined, seed {s}": ("capdec", RECOMBINE, s) for s in seeds})
    runs.update({f"{k} recombined": (k, RECOMBINE, 0) for k in kind_recipe if k != "capdec"})
    runs.update({f"{k} recombined, rate {r:g}" + (f", seed {s}" if s else ""): (k, RECOMBINE + ["--recombine-rate", f"{r:g}"], s)
                 for k, rs in (rates or {}).items() for r, seeds in rs.items() for s in seeds})
    runs.update(more_runs or {})
    plan = {}
    for name, (kind, extra, seed, *steps) in runs.items():
        path = run_dir(work, name)
        plan[name] = (path, ["train", kind, "--data", str(data), "--embedder", embedder, "--out", str(path), *recipe,
                             "--max-steps", str(steps[0] if steps else STEPS_SHORT), *kind_recipe.get(kind, []),
                             *extra, "--seed", str(seed)], None)
    for kind in corrected:
        base = f"{kind} recombined" if kind != "capdec" else "capdec recombined, seed 0"
        if base in plan:
            path = work / f"corrector-{plan[base][0].name}"
            plan[f"corrector over {kind} recombined"] = (
                path, ["train", "corrector", "--base", str(plan[base][0]), "--data", str(data), "--out", str(path),
                       *CORRECTOR], base)
    return plan


def trained(plan: dict, names=None) -> dict:
    """name -> directory for the plan's decoders in `names` (all by default), each trained first when
    missing, and the decoder it needs before it."""
    names = set(plan if names is None else names)
    names |= {plan[n][2] for n in names if plan[n][2]}
    models = {}
    for name in (n for n in plan if n in names):  # the plan's order: a base before its corrector
        path, args, _ = plan[name]
        if not (path / "config.json").is_file():
            unembed(*args)
        models[name] = path
    return models


def training_summary(path: Path) -> dict:
    """What the JSON keeps of a decoder's training (its metrics.json)."""
    metrics = json.loads((path / "metrics.json").read_text())
    summary = {k: metrics.get(k) for k in ("train_steps", "train_seconds", "final_loss", "val_CIDEr", "val_BLEU-4")}
    # a viecap trained since its detector is checked on val: how sure that detector was
    summary.update({k: metrics[k] for k in ("entity_val_precision", "detection_threshold") if k in metrics})
    return summary


def split_scorer(decoder_at, embedder, splits: dict, in_image: dict):
    """measure(path, split, options) for measure_rows: caption_scores of the decoder at `path` on a split
    of `splits` (eval_splits), with the held-out counts on the compositional one."""
    from unembed.decoders.edits import EDIT_MARGIN

    def measure(path: Path, split: str, options: dict) -> dict:
        if options.get("edits") and "margin" not in options:  # the rows' margin, whatever the decoder chose
            options = {**options, "margin": EDIT_MARGIN}  # (margin None: the decoder's own)
        generation = {k: v for k, v in options.items() if k != "entity_merge"}
        return caption_scores(decoder_at(path, options.get("entity_merge", UNMERGED)), embedder, *splits[split],
                              in_image if split == "compositional" else None, **generation)
    return measure


def main_world_plan(work: Path, data: Path) -> dict:
    """Part 5's decoders in the main world (recombined_plan)."""
    return recombined_plan(work, data, str(BUNDLE / "embedder"), BUNDLE_RECIPE, KIND_RECIPE, rates=RATES,
                           more_runs={**LESS_MASKED, **LONGER})


def is_measured(done: dict | None, options: dict) -> bool:
    """Whether a row of the JSON (`done`) was measured on both splits with these options."""
    return bool(done) and done.get("options") == options and "compositional" in done


def trained_for(plan: dict, rows: dict, kept: dict) -> dict:
    """trained(): the plan's decoders that the rows (name -> (directory, options)) not measured in
    `kept` need."""
    named = {path: name for name, (path, _, _) in plan.items()}  # (the shipped decoders are no plan's)
    return trained(plan, {named[path] for name, (path, options) in rows.items()
                          if path in named and not is_measured(kept.get(name), options)})


def measure_rows(rows: dict, earlier: dict, into: dict, measure, save, label: str) -> None:
    """Each row (name -> (decoder directory, options)) on the test and compositional splits into
    `into[name]`, by measure(path, split, options); a row `earlier` holds with the same options is kept,
    not measured again; save() after each row measured."""
    for name, (path, options) in rows.items():
        if is_measured(earlier.get(name), options):
            into[name] = earlier[name]
            continue
        into[name] = {"options": options}
        for split in ("test", "compositional"):
            into[name][split] = measure(path, split, options)
            print(label, split, name, json.dumps(into[name][split]), flush=True)
        save()


def recombined_rows(models: dict, more=(), rate_two=()) -> dict:
    """Part 5's captioning rows: name -> (directory, options). Each recombined decoder at seed 0 also with
    rerank 8, those named in `more` with rerank 8, 16 and 32, and with EDITS rounds of edits, alone
    and after rerank 32, and those in `rate_two` with 2 rounds after rerank 32 and EDITS rounds at
    each of MARGINS (margin_rows)."""
    rows = {}
    for name, path in models.items():
        rows[name] = (path, {})
        seed_0 = "recombined" in name and not name.startswith("corrector") and "seed" not in name.removesuffix(", seed 0")
        if seed_0 or name in more:
            for n in (8, 16, 32) if name in more else (8,):
                rows[f"{name.removesuffix(', seed 0')} rerank {n}"] = (path, {"rerank": n})
        if name in more:
            rows[f"{name} edits {EDITS}"] = (path, {"edits": EDITS})
            rows[f"{name} rerank 32, edits {EDITS}"] = (path, {"rerank": 32, "edits": EDITS})
        if name in rate_two:
            rows[f"{name} rerank 32, edits 2"] = (path, {"rerank": 32, "edits": 2})
            rows.update(margin_rows(name, path))
    return rows


def merged_rows(models: dict) -> dict:
    """Part 7's rows: name -> (directory, options), for the shipped viecap and MERGED_RATE_TWO and
    LESS_MASKED of `models`."""
    rows = {"viecap, entities merged": (BUNDLE / "viecap", {"entity_merge": MERGED}),
            "viecap rerank 8, entities merged": (BUNDLE / "viecap", {"rerank": 8, "entity_merge": MERGED})}
    for name in MERGED_RATE_TWO:
        rows[f"{name}, entities unmerged (this run)"] = (models[name], {"entity_merge": UNMERGED})
    for name in MERGED_RATE_TWO + tuple(LESS_MASKED):
        rows.update(merged_viecap_rows(name, models[name]))
    return rows


def merged_viecap_rows(name: str, path: Path) -> dict:
    """The viecap at `path` merged: alone, with rerank 32, and with rerank 32 and EDITS rounds of edits
    at the margin it chose on val."""
    return {f"{name}, entities merged": (path, {"entity_merge": MERGED}),
            f"{name}, entities merged, rerank 32": (path, {"rerank": 32, "entity_merge": MERGED}),
            f"{name}, entities merged, rerank 32, edits {EDITS} (its margin)": (
                path, {"rerank": 32, "edits": EDITS, "margin": None, "entity_merge": MERGED})}


def longer_rows(models: dict) -> dict:
    """Part 8's rows: name -> (directory, options): LONGER's capdecs alone, its viecaps as merged_viecap_rows."""
    rows = {}
    for name, (kind, *_) in LONGER.items():
        rows.update({name: (models[name], {})} if kind == "capdec" else merged_viecap_rows(name, models[name]))
    return rows


def but_longer(models: dict) -> dict:
    """`models` less part 8's (longer_rows reads those, and part 5's rows do not)."""
    return {name: path for name, path in models.items() if name not in LONGER}


def margin_rows(name: str, path: Path) -> dict:
    """EDITS rounds of edits over the decoder at `path` at each of MARGINS."""
    return {f"{name} edits {EDITS}, margin {m:g}": (path, {"edits": EDITS, "margin": m}) for m in MARGINS}


def with_substitutes(rows: dict, data: Path) -> None:
    """Give the decoders of rows with edits that were trained before unembed saved substitutes.json the
    table training now writes: `substitutes` of the training split's captions (train_prefix takes them
    from the captions before any recombined copy), so the rows measure what a decoder trained today does."""
    from unembed.data.splits import split_captions
    from unembed.decoders.edits import FILE, substitutes
    from unembed.io import write_json

    missing = {path for path, options in rows.values() if options.get("edits") and not (path / FILE).is_file()}
    if missing:
        table = substitutes(split_captions(data / "train"))
        for path in missing:
            write_json(path / FILE, table)


def margin_sweep(decoder, embedder, embedded, references, in_image=None) -> dict:
    """CIDEr (and held-out counts, given `in_image`) of the decoder alone and after one round of edits
    at each of edits.MARGIN_GRID (the margins training chooses among), every margin from one embedding pass (edits.one_round_by_margin)."""
    from unembed.decoders.edits import MARGIN_GRID, one_round_by_margin
    from unembed.eval.metrics import cider_of_each

    captions = decoded(decoder, embedded)
    by_margin = {"off": captions, **{f"{m:g}": c for m, c in one_round_by_margin(
        embedder, embedded.unit(), captions, decoder.substitutes, MARGIN_GRID).items()}}
    predictions = {margin: dict(zip(embedded.ids, edited)) for margin, edited in by_margin.items()}
    cider = cider_of_each(predictions, references)  # every margin's CIDEr as coco_caption_metrics gives it
    sweep = {}
    for margin, edited_captions in by_margin.items():
        sweep[margin] = {"CIDEr": round(cider[margin], 4),
                         "changed": sum(a != b for a, b in zip(edited_captions, captions))}
        if in_image is not None:
            sweep[margin].update(heldout_counts(predictions[margin], in_image))
    return sweep


def val_chosen_margins(work: Path, out: str, images: int) -> None:
    """--margin-sweep: for the small world's capdec seeds and viecap and the main world's six rate-2
    decoders, one round of edits at each of edits.MARGIN_GRID on val, test and compositional (1,000
    images each); the margin training would choose (edits.chosen_margin of the val CIDEr) is each
    decoder's, and its test and compositional rows are what that margin gives."""
    from unembed.decoders.edits import chosen_margin
    from unembed.embedders import load_embedder

    result = json.loads(Path(out).read_text())
    sweeps = result.setdefault("margin_sweep", {})
    small = work / "small"
    worlds = {"small": (str(small / "embedder"), small / "scenes",
                        {"capdec, seed 0": small / "compare" / "models" / "capdec",
                         **{f"capdec, seed {s}": small / f"capdec-seed-{s}" for s in SMALL_SEEDS},
                         "viecap": small / "compare" / "models" / "viecap"}),
              "main": (str(BUNDLE / "embedder"), work / "scenes",
                       {name: run_dir(work, name) for name in RATE_TWO})}
    for world, (embedder_spec, data, decoders) in worlds.items():
        embedder = load_embedder(embedder_spec, "cpu")
        splits = eval_splits(embedder, data, {"val": images, "test": images, "compositional": images})
        in_image = pairs_in_images(data / "compositional")
        decoder_at = decoder_loader(embedder)
        done = sweeps.setdefault(world, {})
        for name, path in decoders.items():
            row = done.setdefault(name, {})
            for split in ("val", "test", "compositional"):
                if split not in row:
                    row[split] = margin_sweep(decoder_at(path), embedder, *splits[split],
                                              in_image if split == "compositional" else None)
                    print(world, name, split, json.dumps({m: r["CIDEr"] for m, r in row[split].items()}), flush=True)
                    write(out, result)
            key = {(math.inf if k == "off" else float(k)): k for k in row["val"]}  # margin -> its key, "1.5" or "off"
            chosen = key[chosen_margin({m: row["val"][k]["CIDEr"] for m, k in key.items()})]
            row["val_chosen"] = {"margin": chosen, **{split: {"chosen": row[split][chosen]["CIDEr"],
                                                              "off": row[split]["off"]["CIDEr"],
                                                              "margin 1": row[split]["1"]["CIDEr"]}
                                                      for split in ("test", "compositional")}}
            write(out, result)


def rerank_n_sweep(decoder, embedder, embedded, references) -> dict:
    """Val CIDEr of the decoder with rerank N for N in 1 (none), 8, 16 and 32 at the default weight."""
    return {f"rerank {n}": round(caption_scores(decoder, embedder, embedded, references,
                                                **({"rerank": n} if n > 1 else {}))["CIDEr"], 4) for n in (1, 8, 16, 32)}


def variants(base: str, corrector: Path | None, steps=STEPS) -> dict:
    """name -> (decoder directory, generation options): the issue's ablations, and the corrector's parts."""
    out = {f"{base}": (BUNDLE / base, {}), f"{base} rerank 8": (BUNDLE / base, {"rerank": 8})}
    if corrector is not None:
        for k in steps:
            out[f"{base} corrector K={k} (no edits)"] = (corrector, {"correct": k, "edits": 0})
        out[f"{base} corrector edits only (K=0)"] = (corrector, {"correct": 0})
        out[f"{base} corrector K=4 + edits (its defaults)"] = (corrector, {})
        out[f"{base} corrector K=4 + edits + rerank 4 (both)"] = (corrector, {"rerank": 4})
        if len(steps) > 1:
            out[f"{base} corrector K=4, margin 0, no edits"] = (corrector, {"margin": 0.0, "edits": 0})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench-run/loop")
    parser.add_argument("--out", default="benchmarks/results/loop_scenes.json")
    parser.add_argument("--bases", default=",".join(BASES))
    parser.add_argument("--images", type=int, default=1000, help="images per split (test, compositional)")
    parser.add_argument("--small-world", action="store_true", help="only part 4 (added to --out's JSON)")
    parser.add_argument("--recombined-only", action="store_true",
                        help="only the rows of parts 5, 7 and 8 not yet in --out's JSON, training only the decoders they need")
    parser.add_argument("--margin-sweep", action="store_true",
                        help="only the margin sweep of one round of edits (val, test, compositional) over the "
                             "trained rate-2 decoders and the small world's capdec seeds and viecap")
    args = parser.parse_args()
    if args.margin_sweep:
        return val_chosen_margins(Path(args.work), args.out, args.images)
    if args.small_world:
        return small_world(Path(args.work) / "small", args.out, args.images)
    work = Path(args.work)
    data = work / "scenes"
    if not (data / "train" / "captions.json").is_file():
        unembed("data", "scenes", "--out", str(data), "--n", "20000", "--seed", "0")
    if args.recombined_only:
        return recombined_only(work, data, args.out, args.images)
    bases = [b for b in args.bases.split(",") if b]
    correctors = {}
    for base in [b for b in bases if b in CORRECTED]:
        correctors[base] = work / f"corrector-{base}"
        if not (correctors[base] / "config.json").is_file():
            unembed("train", "corrector", "--base", str(BUNDLE / base), "--data", str(data), "--out",
                    str(correctors[base]), *CORRECTOR)
    inverters = {steps: work / f"inverter-{steps}" for steps in INVERTER_STEPS}
    for steps, path in inverters.items():
        if not (path / "config.json").is_file():
            unembed("train", "capdec", "--data", str(data), "--embedder", str(BUNDLE / "embedder"), "--out", str(path),
                    "--max-steps", str(steps), *INVERTER)
    label, init, continued = str(INVERTER_STEPS[-1]), inverters[INVERTER_STEPS[-1]], []
    for seed, (steps, lr) in enumerate(RESTARTS, start=1):
        label = f"{label} + {steps}"
        inverters[label] = path = work / f"inverter-{label.replace(' ', '')}"
        options = restart_options(steps, lr, seed)
        continued.append(f"unembed train capdec --init {init.name} " + " ".join(options))
        if not (path / "config.json").is_file():
            unembed("train", "capdec", "--data", str(data), "--embedder", str(BUNDLE / "embedder"), "--out", str(path),
                    "--init", str(init), *options)
        init = path
    corrected_inverter = work / f"corrector-inverter-{CORRECTED_INVERTER}"
    if not (corrected_inverter / "config.json").is_file():
        unembed("train", "corrector", "--base", str(inverters[CORRECTED_INVERTER]), "--data", str(data), "--out",
                str(corrected_inverter), *CORRECTOR)
    recombined = trained(main_world_plan(work, data))

    import torch

    from unembed.embedders import load_embedder
    from unembed.eval.inversion import held_out_captions, invert

    torch.manual_seed(0)
    embedder = load_embedder(str(BUNDLE / "embedder"), "cpu")
    splits = eval_splits(embedder, data, {"val": 500, "test": args.images, "compositional": args.images})
    in_image = pairs_in_images(data / "compositional")
    decoder_at = decoder_loader(embedder)
    earlier = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    if earlier.get("embedder_id") != embedder.id:
        earlier = {}  # rows measured with another embedder are not kept
    result = {"embedder": recorded_path(str(BUNDLE / "embedder")), "embedder_id": embedder.id,
              "data": "scenes world, 20000 training images, seed 0", "corrector_training": " ".join(CORRECTOR),
              "machine": {"cpus": __import__("os").cpu_count(), "torch": torch.__version__},
              "weight_sweep": {}, "captioning": {}, "inversion": {}}
    if "small_world" in earlier:
        result["small_world"] = earlier["small_world"]  # --small-world's rows: their own embedder, kept
    if "margin_sweep" in earlier:
        result["margin_sweep"] = earlier["margin_sweep"]  # --margin-sweep's, over decoders trained apart
    result["inverter_training"] = "unembed train capdec " + " ".join(INVERTER)
    result["inverter_continued"] = continued
    result["recombined_training"] = " ".join(BUNDLE_RECIPE + ["--max-steps", "600"] + RECOMBINE)
    for group, paths in (("correctors", [*correctors.values(), corrected_inverter]), ("inverters", inverters.values()),
                         ("recombined", recombined.values())):
        for path in paths:
            result.setdefault(group, {})[path.name] = training_summary(path)

    # 1. the rerank weight on val
    embedded, references = splits["val"]
    for base in ("clipcap", "capdec", "viecap"):
        kept = earlier.get("weight_sweep", {}).get(base, {})
        if all(f"rerank 8, weight {w:g}" in kept for w in WEIGHTS):
            result["weight_sweep"][base] = kept
            continue
        sweep = result["weight_sweep"][base] = weight_sweep(decoder_at(BUNDLE / base), embedder, embedded, references)
        print("val", base, json.dumps(sweep), flush=True)
    result["weight_chosen"] = chosen_weight(result["weight_sweep"])

    # is more candidates better on val too? (N was not chosen on test)
    result["rerank_n_val"] = earlier.get("rerank_n_val") or {
        "decoder": "decap recombined", **rerank_n_sweep(decoder_at(recombined["decap recombined"]), embedder, *splits["val"])}
    # what the embedder itself would name (the references' own words, every colour and shape tried)
    ceiling = earlier.get("heldout_ceiling", {})
    result["heldout_ceiling"] = (ceiling if ceiling.get("images") == args.images
                                 else heldout_ceiling(embedder, data / "compositional", args.images))
    # 2. captioning
    rows = {"clipcap (paired)": (BUNDLE / "clipcap", {}), "clipcap (paired) rerank 8": (BUNDLE / "clipcap", {"rerank": 8})}
    for base in bases:
        rows.update(variants(base, correctors.get(base), STEPS if base == "capdec" else (1, 4)))
    # the decoders nearest the goals read with more candidates too; paired ClipCap with as many
    rows.update(recombined_rows(but_longer(recombined), more=MORE, rate_two=RATE_TWO))
    rows.update(merged_rows(recombined))
    rows.update(longer_rows(recombined))
    rows["clipcap (paired) rerank 32"] = (BUNDLE / "clipcap", {"rerank": 32})
    with_substitutes(rows, data)
    measure_rows(rows, earlier.get("captioning", {}), result["captioning"],
                 split_scorer(decoder_at, embedder, splits, in_image), lambda: write(args.out, result), "")

    # 3. inversion. First rerank_guide, chosen on val: the longest inverter's 32 beams once, then 8 of
    # them embedded at most (stop at the target), in the order each guide gives.
    longest = list(inverters.values())[-1]
    if earlier.get("guide_sweep", {}).get("inverter") == longest.name:
        result["guide_sweep"] = earlier["guide_sweep"]
    else:
        result["guide_sweep"] = guide_sweep(decoder_at(longest), embedder, held_out_captions(data / "val", args.images))
        result["guide_sweep"]["inverter"] = longest.name
        print("val guide", json.dumps(result["guide_sweep"]), flush=True)
    captions = held_out_captions(data / "test", args.images)
    for rows in inversion_rows(bases, correctors, inverters, corrected_inverter).values():
        for name, (path, options) in rows.items():
            done = earlier.get("inversion", {}).get(name, {})
            if done.get("generation") == options and done.get("captions") == len(captions):
                result["inversion"][name] = done
                continue
            scores = invert(decoder_at(path), embedder, captions, 100, **options)
            result["inversion"][name] = scores
            print("invert", name, json.dumps({k: v for k, v in scores.items() if k != "misses"}), flush=True)
        write(args.out, result)
    print(table(result))


def recombined_only(work: Path, data: Path, out: str, images: int) -> None:
    """Parts 5, 7 and 8 alone (--recombined-only): the captioning rows of parts 5, 7 and 8 that --out's JSON lacks are
    measured, training only the decoders they need; every other row is kept. Adds a part 5 decoder
    without retraining part 3's inverters (hours); a full run measures the same rows the same way."""
    from unembed.embedders import load_embedder

    result = json.loads(Path(out).read_text())
    embedder = load_embedder(str(BUNDLE / "embedder"), "cpu")
    if result.get("embedder_id") != embedder.id:  # before any training
        raise SystemExit(f"{out} was measured with embedder {result.get('embedder_id')}, not {embedder.id}: "
                         "run the whole benchmark")
    plan = main_world_plan(work, data)
    models = {name: path for name, (path, _, _) in plan.items()}
    rows = {**recombined_rows(but_longer(models), more=MORE, rate_two=RATE_TWO), **merged_rows(models),
            **longer_rows(models)}
    earlier = result["captioning"]
    trained_for(plan, rows, earlier)
    for path in {path for path, _ in rows.values()} & {path for path, _, _ in plan.values()}:
        if (path / "metrics.json").is_file():  # each trained here, as it is now (the others as recorded)
            result.setdefault("recombined", {})[path.name] = training_summary(path)
    with_substitutes(rows, data)
    splits = eval_splits(embedder, data, {"test": images, "compositional": images})
    measure_rows(rows, earlier, earlier,
                 split_scorer(decoder_loader(embedder), embedder, splits, pairs_in_images(data / "compositional")),
                 lambda: write(out, result), "")
    print(table(result))


def split_images(split_dir: Path) -> int:
    """Images in a written split (0 before one is written: captions.json is written last)."""
    path = split_dir / "captions.json"
    return len(json.loads(path.read_text())["images"]) if path.is_file() else 0


def small_world(work: Path, out: str, images: int) -> None:
    data, models = work / "scenes", work / "compare" / "models"
    if split_images(data / "test") < images:
        # Each scene is drawn from (seed, split, index), so the 3,000 training scenes are the same at any
        # --n-eval, and a larger eval split starts with the smaller one's scenes.
        unembed("data", "scenes", "--out", str(data), "--n", "3000", "--n-eval", str(images), "--seed", "7")
    if not (work / "embedder" / "config.json").is_file():
        unembed("train", "clip", "--data", str(data), "--out", str(work / "embedder"), "--epochs", "5")
    # Decoders are trained only for the rows (and the weight sweep) that --out's JSON lacks, so a new row
    # costs its own decoder, not the whole world's. The compare run trains clipcap, capdec and viecap
    # at once (capdec there is seed 0 of plain capdec). Fewer seeds and one corrector for the recombined:
    # this world's 4 x 256 models take twice the main world's time.
    compare = ["compare", "--data", str(data), "--decoders", "clipcap,capdec,viecap", "--embedder",
               str(work / "embedder"), "--out", str(work / "compare"), "--no-spice", "--no-gap", "--no-meteor"]
    plan = {kind: (models / kind, compare, None) for kind in ("clipcap", "capdec", "viecap")}
    corrector = work / "corrector-capdec"
    plan["corrector over capdec"] = (corrector, ["train", "corrector", "--base", str(models / "capdec"), "--data",
                                                 str(data), "--out", str(corrector), *CORRECTOR], "capdec")
    part5 = recombined_plan(work, data, str(work / "embedder"), SMALL_RECIPE, {"capdec": [], "viecap": []},
                            plain_seeds=SMALL_SEEDS, seeds=(0, 1), corrected=("capdec",))
    plan.update(part5)

    from unembed.embedders import load_embedder
    from unembed.generation import RERANK_WEIGHT

    embedder = load_embedder(str(work / "embedder"), "cpu")
    splits = eval_splits(embedder, data, {"val": images, "test": images, "compositional": images})
    decoder_at = decoder_loader(embedder)
    result = json.loads(Path(out).read_text()) if Path(out).is_file() else {}
    described = f"scenes world, 3000 training images, seed 7, {images} images per eval split"
    earlier = result.get("small_world", {})
    # Rows of another world or embedder are not kept. `unembed train clip` repeats to the bit on one
    # machine, not across machines (trained again on another, this world's held-out ceiling moved from
    # 456 to 449), so rows recorded without the id may come from an embedder that is gone.
    if earlier.get("data") != described or earlier.get("embedder_id") != embedder.id:
        earlier = {}
    small = result["small_world"] = {"data": described, "embedder": "unembed train clip --epochs 5",
                                     "embedder_id": embedder.id,
                                     "recombined_training": " ".join(SMALL_RECIPE + ["--max-steps", "600"] + RECOMBINE),
                                     "weight_sweep": {}, "rows": {}}
    # This world's own rerank weight, chosen on its val split by part 1's rule: does the weight that
    # the sure embedder chose hold for an unsure one, and does a weight chosen here?
    for kind in ("clipcap", "capdec", "viecap"):
        small["weight_sweep"][kind] = (earlier.get("weight_sweep", {}).get(kind)
                                       or weight_sweep(decoder_at(trained(plan, [kind])[kind]), embedder, *splits["val"]))
        print("small val", kind, json.dumps(small["weight_sweep"][kind]), flush=True)
    small["weight_chosen"] = chosen_weight(small["weight_sweep"])
    small["heldout_ceiling"] = (earlier["heldout_ceiling"] if "heldout_ceiling" in earlier
                                else heldout_ceiling(embedder, data / "compositional", images))
    own = small["weight_chosen"]["weight"]
    rows = {"clipcap (paired)": (models / "clipcap", {}), "viecap": (models / "viecap", {}),
            "viecap rerank 8": (models / "viecap", {"rerank": 8}),
            **{name: (models / "capdec" if path == BUNDLE / "capdec" else corrector, options)
               for name, (path, options) in variants("capdec", corrector, (4,)).items()}}
    if own != RERANK_WEIGHT:  # the same weight would repeat the rerank 8 rows
        for kind in ("viecap", "capdec"):
            rows[f"{kind} rerank 8, weight {own:g} (this world's val)"] = (models / kind, {"rerank": 8, "rerank_weight": own})
    rows.update(recombined_rows({name: path for name, (path, _, _) in part5.items()}))
    # rerank 8 over each plain capdec seed too: is its change to capdec larger than a seed's?
    rows.update({f"{name} rerank 8": (part5[name][0], {"rerank": 8}) for name in part5
                 if name.startswith("capdec, seed")})
    # word edits over viecap and each plain capdec seed, alone and after rerank 8: edits trust the
    # embedder one word at a time, so does the margin keep an unsure one from changing the captions?
    edited = {"viecap": models / "viecap", "capdec": models / "capdec",
              **{name: part5[name][0] for name in part5 if name.startswith("capdec, seed")}}
    for name, path in edited.items():
        rows[f"{name} edits {EDITS}"] = (path, {"edits": EDITS})
        rows[f"{name} rerank 8, edits {EDITS}"] = (path, {"rerank": 8, "edits": EDITS})
        if name.startswith("capdec"):
            rows.update(margin_rows(name, path))
    kept = earlier.get("rows", {})
    trained_for(plan, rows, kept)
    with_substitutes(rows, data)
    measure_rows(rows, kept, small["rows"],
                 split_scorer(decoder_at, embedder, splits, pairs_in_images(data / "compositional")),
                 lambda: write(out, result), "small")


def write(out: str, result: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")


def margin_table(result: dict) -> str:
    """The README's table of margins chosen on val (--margin-sweep)."""
    lines = ["| world: decoder | margin chosen on val | test CIDEr: no edits / margin 1 / chosen | compositional "
             "CIDEr: no edits / margin 1 / chosen | held-out pairs: no edits / margin 1 / chosen | changed captions "
             "(test) |", "|---|---:|---:|---:|---:|---:|"]
    for world, rows in result.get("margin_sweep", {}).items():
        for name, row in rows.items():
            if "val_chosen" not in row:
                continue
            m = row["val_chosen"]["margin"]
            cider = lambda split: " / ".join(f"{100 * row[split][k]['CIDEr']:.1f}" for k in ("off", "1", m))
            pairs = " / ".join(str(row["compositional"][k]["names_heldout_pair"]) for k in ("off", "1", m))
            lines.append(f"| {world}: {name} | {m} | {cider('test')} | {cider('compositional')} | {pairs} | "
                         f"{row['test'][m]['changed']} |")
    return "\n".join(lines)


def table(result: dict) -> str:
    lines = ["| decoder | test CIDEr | comp. CIDEr | names a held-out pair (in the image) / 1,000 | embedder calls "
             "per caption |", "|---|---:|---:|---:|---:|"]
    for name, row in result["captioning"].items():
        t, c = row["test"], row["compositional"]
        lines.append(f"| {name} | {100 * t['CIDEr']:.1f} | {100 * c['CIDEr']:.1f} | {c['names_heldout_pair']} "
                     f"({c['names_heldout_pair_in_image']}) | {t['embedder_calls_per_caption']:g} |")
    lines += ["", "| inversion | exact match | BLEU-4 | cosine | embedder calls per caption |", "|---|---:|---:|---:|---:|"]
    for name, s in result["inversion"].items():
        lines.append(f"| {name} | {100 * s['exact_match']:.1f}% | {100 * s['BLEU-4']:.1f} | {s['cosine']:.3f} | "
                     f"{s['embedder_calls_per_caption']:g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
