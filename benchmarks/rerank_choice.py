"""Should each decoder choose its own rerank weight on its val split, as it chooses its edit margin?
For the decoders nearest issue 27's goals in both scenes worlds, the weight is chosen as training
would choose it (`chosen_weight`: val CIDEr, image by image, of rerank CHOICE_CANDIDATES at each of
WEIGHT_GRID and of the decoder's own captions, "off"; of the weights whose gain over "off" is more than
TRUST_Z standard errors, the best; "off" where none is); then test and compositional CIDEr with
`--rerank 32 --edits 1` at that choice ("off": `--edits 1` alone), beside the same at the default
weight (generation.RERANK_WEIGHT, 0.05) and the decoder alone. Does a decoder notice when the embedder
is unsure, and does acting on it help?

- Small world (entity_merge_small.py's: 3,000 scenes, seed 7, a 5-epoch CLIP): capdec and the viecap
  whose detector is checked on val, training seeds 0, 1, 2.
- Main world (loop_scenes.py's: 20,000 scenes, the shipped embedder): capdec and the rate-2
  entity-mask-0.2 viecap (synonyms merged), seeds 0, 1, 2.

Each decoder is read as unembed trains it today (no_repeat_ngram_size 3; viecap merged); its edit margin
is its own (edits.json). The rows at the default weight and without rerank are not measured again: they
are the seed rows of entity_merge_small.json and the rows of repeats_consensus.json, the same decoders,
options and images, and `table` sets them side by side. Answer (results/rerank_choice.json): every
small-world decoder chooses "off" and every main-world one a weight, but the choice loses to 0.05 on
both splits in both worlds, so unembed keeps the one default weight.

    python benchmarks/rerank_choice.py --loop bench-run/loop --small bench-run/merge-small
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from entity_scenes import pairs_in_images
from loop_scenes import BUNDLE, LESS_MASKED, MERGED, SEEDS, candidate_rows, caption_scores, decoded, eval_splits, write
from repeats_consensus import NO_REPEAT, setting
from unembed.generation import RERANK_WEIGHT

RECIPE = {"rerank": 32, "edits": 1, "no_repeat_ngram_size": NO_REPEAT}
WEIGHT_GRID = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
CHOICE_CANDIDATES = 8  # rerank 8, the README's first recipe: a quarter of 32's beams
TRUST_Z = 2.0          # a weight is kept when its paired val gain over "off" is this many standard errors
OFF = "off"            # the decoder's own captions
SPLITS = ("test", "compositional")
RESULTS = Path(__file__).parent / "results"
VIECAP = list(LESS_MASKED)  # the main world's viecaps, seeds 0, 1, 2


def worlds(loop: Path, small: Path) -> dict:
    """world -> (its data, its embedder, {row name: decoder directory})."""
    seeded = lambda name, seed: name if seed == 0 else f"{name}-seed-{seed}"
    return {
        "small": (small / "scenes", small / "embedder",
                  {**{f"capdec, seed {s}": small / seeded("capdec", s) for s in SEEDS},
                   **{f"viecap checked, seed {s}": small / seeded("viecap-checked", s) for s in SEEDS}}),
        "main": (loop / "scenes", BUNDLE / "embedder",
                 {**{f"capdec, seed {s}": loop / f"capdec-seed-{s}" for s in SEEDS},
                  **{f"viecap, seed {s}": loop / seeded("viecap-recombined-rate-2-entity-mask-0.2", s) for s in SEEDS}}),
    }


def as_trained_today(path: Path, embedder):
    """The decoder at `path` with today's defaults of the options its format predates."""
    from unembed.decoders import load_decoder

    decoder = load_decoder(path, device="cpu", embedder=embedder)
    decoder.config.no_repeat_ngram_size = NO_REPEAT
    if hasattr(decoder.config, "entity_merge"):
        decoder.config.entity_merge = MERGED
    return decoder


def chosen_weight(by_image: dict) -> tuple[float | str, dict]:
    """From `by_image` (weight, or OFF for the decoder's own captions -> {val image: its CIDEr}): of the
    weights whose mean gain over OFF, paired image by image, is more than TRUST_Z standard errors, the
    one with the best gain (a tie to the smaller weight); OFF where none is. Returns the choice and its
    evidence: each weight's gain and standard error."""
    gains, errors = {}, {}
    for weight in (w for w in by_image if w != OFF):
        paired = [by_image[weight][i] - by_image[OFF][i] for i in by_image[OFF]]
        gains[weight] = sum(paired) / len(paired)
        spread = (sum((g - gains[weight]) ** 2 for g in paired) / (len(paired) - 1)) ** 0.5
        errors[weight] = spread / len(paired) ** 0.5
    beyond_chance = [w for w in gains if gains[w] > TRUST_Z * errors[w]]
    choice = max(beyond_chance, key=lambda w: (gains[w], -w)) if beyond_chance else OFF
    return choice, {"gain": {f"{w:g}": round(g, 4) for w, g in gains.items()},
                    "standard_error": {f"{w:g}": round(e, 4) for w, e in errors.items()}}


def val_choice(decoder, embedder, validation) -> dict:
    """The weight `decoder` chooses on `validation` (chosen_weight), with the val CIDEr of each weight
    and of OFF: the candidates generated and embedded once, picked at every weight (rerank.pick, as
    Decoder.decode picks)."""
    from unembed.decoders.rerank import logit_scale, pick, row_cosines
    from unembed.eval.metrics import cider_by_image_of_each

    embedded, references = validation
    rows = candidate_rows(decoder, embedded, CHOICE_CANDIDATES)
    cosines = row_cosines(embedder, embedded, rows)
    picked = {OFF: decoded(decoder, embedded),
              **{w: pick(rows, cosines, w, logit_scale(embedder)) for w in WEIGHT_GRID}}
    scored = cider_by_image_of_each({w: dict(zip(embedded.ids, c)) for w, c in picked.items()}, references)
    weight, evidence = chosen_weight({w: by_image for w, (_, by_image) in scored.items()})
    return {"weight": weight, "candidates": CHOICE_CANDIDATES, **evidence,
            "val_CIDEr": {(w if w == OFF else f"{w:g}"): round(corpus, 4) for w, (corpus, _) in scored.items()}}


def measure(world: str, data: Path, embedder_dir: Path, decoders: dict, done: dict, save) -> None:
    from unembed.embedders import load_embedder
    from unembed.training.prefix import validation_set

    embedder = load_embedder(str(embedder_dir), "cpu")
    validation = validation_set(embedder, data)
    splits = eval_splits(embedder, data, {"test": 1000, "compositional": 1000})
    in_image = pairs_in_images(data / "compositional")
    for name, path in decoders.items():
        if name in done:
            continue
        decoder = as_trained_today(path, embedder)
        start = time.perf_counter()
        choice = val_choice(decoder, embedder, validation)
        row = {"choice": choice, "val_images": len(validation[0]),
               "choice_seconds": round(time.perf_counter() - start, 1)}
        options = ({k: v for k, v in RECIPE.items() if k != "rerank"} if choice["weight"] == OFF
                   else {**RECIPE, "rerank_weight": choice["weight"]})
        for split in SPLITS:
            row[split] = caption_scores(decoder, embedder, *splits[split],
                                        in_image if split == "compositional" else None, **options)
        done[name] = row
        print(world, name, choice["weight"], ciders(row), flush=True)
        save()


def ciders(by_split: dict, row: str | None = None) -> tuple:
    """(test, compositional) CIDEr of a decoder's {split: scores}, or of its `row` in each split."""
    return tuple((by_split[split][row] if row else by_split[split])["CIDEr"] for split in SPLITS)


def earlier_rows() -> dict:
    """world -> row name -> {"own": (test, comp CIDEr) of the decoder alone, "0.05": the same with
    --rerank 32 --edits 1 at the default weight}, from the JSONs that measured them."""
    small = json.loads((RESULTS / "entity_merge_small.json").read_text())["seeds"]
    main = json.loads((RESULTS / "repeats_consensus.json").read_text())["rows"]
    own, default = f"base, no repeat {NO_REPEAT}", f"{setting(NO_REPEAT, RERANK_WEIGHT, 0.0)}, edits 1 (its margin)"
    out = {"small": {}, "main": {}}
    for s in SEEDS:
        seed = small[f"seed {s}"]
        out["small"][f"capdec, seed {s}"] = {"own": ciders(seed["capdec"])}
        out["small"][f"viecap checked, seed {s}"] = {"own": ciders(seed["viecap, detector checked on val"]),
                                                     "0.05": ciders(seed["same, --rerank 32 --edits 1"])}
        for name, rows in ((f"capdec, seed {s}", main[f"capdec, seed {s}"]), (f"viecap, seed {s}", main[VIECAP[s]])):
            out["main"][name] = {"own": ciders(rows, own), "0.05": ciders(rows, default)}
    return out


def table(result: dict) -> str:
    """The README table: per world and decoder, the weight chosen on val and test / compositional
    CIDEr alone, at 0.05 and at the choice (x100)."""
    earlier = earlier_rows()
    cell = lambda pair: " / ".join(f"{100 * v:.1f}" for v in pair) if pair else "not measured"
    lines = ["| world, decoder | weight chosen on val | own captions | `--rerank 32 --edits 1` at 0.05 | "
             "the same at its choice |", "|---|---|---|---|---|"]
    for world in ("small", "main"):
        for name, row in result[world].items():
            old = earlier[world][name]
            lines.append(f"| {world}, {name} | {row['choice']['weight']} | {cell(old['own'])} | "
                         f"{cell(old.get('0.05'))} | {cell(ciders(row))} |")
    return "\n".join(lines)


def mean_pair(pairs: list) -> str:
    """The mean test / compositional CIDEr of (test, comp) pairs, x100."""
    return " / ".join(f"{100 * sum(p[k] for p in pairs) / len(pairs):.1f}" for k in (0, 1))


def sentence(result: dict) -> str:
    """The README's account of the table: what the val split chose, and what acting on it gave."""
    earlier = earlier_rows()
    weights = sorted({row["choice"]["weight"] for row in result["main"].values()})
    small = [n for n in result["small"] if n.startswith("viecap")]
    return (f"Every small-world decoder chose \"off\" ({sum(r['choice']['weight'] == OFF for r in result['small'].values())}"
            f" of {len(result['small'])}: no weight beat its own captions beyond chance) and every main-world one a weight "
            f"({', '.join(f'{w:g}' for w in weights)}), so the val split does tell an unsure embedder from a sure one. "
            f"Acting on it loses to the one default all the same: in the main world `--rerank 32 --edits 1` at each "
            f"decoder's choice gives a mean test / compositional CIDEr of "
            f"{mean_pair([ciders(result['main'][n]) for n in result['main']])} against "
            f"{mean_pair([earlier['main'][n]['0.05'] for n in result['main']])} at 0.05, and in the small world the "
            f"checked viecaps' \"off\" gives {mean_pair([ciders(result['small'][n]) for n in small])} against "
            f"{mean_pair([earlier['small'][n]['0.05'] for n in small])}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", default="bench-run/loop")
    parser.add_argument("--small", default="bench-run/merge-small")
    parser.add_argument("--out", default=str(RESULTS / "rerank_choice.json"))
    args = parser.parse_args()
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.setdefault("recipe", RECIPE)
    for world, (data, embedder_dir, decoders) in worlds(Path(args.loop), Path(args.small)).items():
        measure(world, data, embedder_dir, decoders, result.setdefault(world, {}), lambda: write(str(out), result))
    print(table(result))
    print(sentence(result))


if __name__ == "__main__":
    main()
