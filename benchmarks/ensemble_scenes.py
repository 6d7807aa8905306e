"""Do decoders trained alike from different seeds do better as one? `unembed build ensemble` pools the
members' candidates and the embedder picks (unembed/decoders/ensemble.py). Issue 27's worlds miss their
goals because one seed's entity-aware decoder is not good enough on both splits at once; its three seeds
make different mistakes, and the embedder can tell which caption of the pool lands nearest the image.

- Main world (loop_scenes.py's: 20,000 scenes, the shipped embedder): keep_best.py's kept decoders (1,800
  steps, the step val chose), seeds 0, 1, 2: viecap (the decoder nearest the goals), capdec (the test
  goal's bar) and paired ClipCap (the compositional goal's bar).
- Small world (entity_merge_small.py's: 3,000 scenes, seed 7, a 5-epoch CLIP): its 600-step capdec (the
  bar) and viecap whose detector is checked on val, seeds 0, 1, 2.

- The README's example: the bundled capdec and viecap as shipped, alone and as one ensemble, read as the
  README reads them (own captions; `--rerank 8 --edits 1`) on the main world's images.

Each kind's three seeds are made into one ensemble, as unembed trains them today
(rerank_choice.as_trained_today), and read as its members were read: its own captions (each member's own,
the embedder's pick) and `--rerank 32 --edits 1` (32 from each member, no-repeat 3, synonyms merged; edits
at the largest of the members' val-chosen margins) on the 1,000 test and 1,000 compositional images. The
members' rows are keep_best.json's and entity_merge_small.json's, the same decoders, options and images.
An ensemble costs its members' searches together and reranks three times as many candidates.

    python benchmarks/ensemble_scenes.py --keep-best bench-run/keep-best --loop bench-run/loop \
        --small bench-run/merge-small
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from entity_scenes import pairs_in_images
from keep_best import LOOP, ROWS, paired_clipcap, split_scores
from loop_scenes import BUNDLE, SEEDS, eval_splits, write
from rerank_choice import RESULTS, SPLITS, as_trained_today, ciders, mean_pair

MAIN_KINDS = ("viecap", "capdec", "clipcap")
SMALL_KINDS = ("viecap checked", "capdec")
SMALL_ROWS = {"capdec": {"own": "capdec"},  # entity_merge_small.json's seed rows, by read
              "viecap checked": {"own": "viecap, detector checked on val", LOOP: "same, --rerank 32 --edits 1"}}


def worlds(keep_best: Path, loop: Path, small: Path) -> dict:
    """world -> (its data, its embedder, {kind: the members' directories, seeds 0, 1, 2})."""
    seeded = lambda name, seed: small / (name if seed == 0 else f"{name}-seed-{seed}")
    return {"main": (loop / "scenes", BUNDLE / "embedder",
                     {kind: [keep_best / f"{kind}-seed-{s}" for s in SEEDS] for kind in MAIN_KINDS}),
            "small": (small / "scenes", small / "embedder",
                      {kind: [seeded(kind.replace(" ", "-"), s) for s in SEEDS] for kind in SMALL_KINDS})}


def measure(places: dict, result: dict, save) -> None:
    from unembed.decoders.ensemble import EnsembleDecoder
    from unembed.embedders import load_embedder

    for world, (data, embedder_dir, kinds) in places.items():
        rows = result.setdefault(world, {})
        if all(name in rows.get(kind, {}) for kind in kinds for name in ROWS):
            continue
        embedder = load_embedder(str(embedder_dir), "cpu")
        splits = eval_splits(embedder, data, {"test": 1000, "compositional": 1000})
        in_image = pairs_in_images(data / "compositional")
        for kind, paths in kinds.items():
            row = rows.setdefault(kind, {})
            if all(name in row for name in ROWS):
                continue
            ensemble = EnsembleDecoder.build([as_trained_today(path, embedder) for path in paths])
            row["edit_margin"] = ensemble.edit_margin_record["margin"]  # "off": a member's val chose no edits
            for name, options in ROWS.items():
                if name not in row:
                    row[name] = split_scores(ensemble, embedder, splits, in_image, **options)
                    print(world, kind, name, {s: row[name][s]["CIDEr"] for s in row[name]}, flush=True)
                    save()


BUNDLED = ("capdec", "viecap")  # the README's example: the bundle's two entity-free and entity-aware text-only kinds
README_READ = {"own": {}, "rerank 8, edits 1": {"rerank": 8, "edits": 1}}  # as the README's command reads it


def measure_bundled(data: Path, result: dict, save) -> None:
    """The README's `unembed build ensemble --member capdec --member viecap`: the bundled decoders as
    shipped, alone and as one ensemble, each read as the README reads it, on the main world's images."""
    from unembed.decoders import find_decoder, load_decoder
    from unembed.decoders.ensemble import EnsembleDecoder
    from unembed.embedders import BUNDLED as BUNDLE_EMBEDDER, load_embedder

    rows = result.setdefault("bundled", {})
    names = [*BUNDLED, " + ".join(BUNDLED)]
    if all(read in rows.get(name, {}) for name in names for read in README_READ):
        return
    embedder = load_embedder(BUNDLE_EMBEDDER, "cpu")
    splits = eval_splits(embedder, data, {"test": 1000, "compositional": 1000})
    in_image = pairs_in_images(data / "compositional")
    decoders = [load_decoder(find_decoder(name)[0], device="cpu", embedder=embedder) for name in BUNDLED]
    decoders.append(EnsembleDecoder.build(decoders))
    for name, decoder in zip(names, decoders):
        row = rows.setdefault(name, {})
        for read, options in README_READ.items():
            if read not in row:
                row[read] = split_scores(decoder, embedder, splits, in_image, **options)
                print("bundled", name, read, {s: row[read][s]["CIDEr"] for s in row[read]}, flush=True)
                save()


MORE_CANDIDATES = {"rerank": 64, "edits": 1, "no_repeat_ngram_size": 3}  # rerank's most: twice the 32 of one seed


def measure_more_candidates(keep_best: Path, data: Path, result: dict, save) -> None:
    """Is the ensemble's gain only its three times as many candidates? Each main-world viecap seed alone with
    `--rerank 64 --edits 1` (rerank's most), read as the ensemble was."""
    from unembed.embedders import load_embedder

    rows = result.setdefault("viecap alone, rerank 64, edits 1", {})
    if all(f"seed {s}" in rows for s in SEEDS):
        return
    embedder = load_embedder(str(BUNDLE / "embedder"), "cpu")
    splits = eval_splits(embedder, data, {"test": 1000, "compositional": 1000})
    in_image = pairs_in_images(data / "compositional")
    for seed in SEEDS:
        if f"seed {seed}" not in rows:
            decoder = as_trained_today(keep_best / f"viecap-seed-{seed}", embedder)
            rows[f"seed {seed}"] = split_scores(decoder, embedder, splits, in_image, **MORE_CANDIDATES)
            print("viecap alone, rerank 64", seed, {s: rows[f"seed {seed}"][s]["CIDEr"] for s in SPLITS}, flush=True)
            save()



def members(world: str, kind: str) -> list[dict]:
    """The members' own rows, seeds 0, 1, 2 ({read: {split: scores}}, the reads measured): the main world's
    from keep_best.json, the small world's from entity_merge_small.json; the same decoders, options, images."""
    if world == "main":
        kept = json.loads((RESULTS / "keep_best.json").read_text())
        return [kept["paired"][f"clipcap, seed {s}"] if kind == "clipcap" else kept[f"{kind}, seed {s}"]["kept"]
                for s in SEEDS]
    seeds = json.loads((RESULTS / "entity_merge_small.json").read_text())["seeds"]
    return [{read: seeds[f"seed {s}"][name] for read, name in SMALL_ROWS[kind].items()} for s in SEEDS]


def cell(scores: dict) -> str:
    """"test / compositional (held-out pairs)", CIDEr x100."""
    return (f"{100 * scores['test']['CIDEr']:.1f} / {100 * scores['compositional']['CIDEr']:.1f} "
            f"({scores['compositional']['names_heldout_pair']})")


def mean_cell(rows: list[dict]) -> str:
    mean = lambda split, what: sum(r[split][what] for r in rows) / len(rows)
    return (f"{100 * mean('test', 'CIDEr'):.1f} / {100 * mean('compositional', 'CIDEr'):.1f} "
            f"({mean('compositional', 'names_heldout_pair'):.0f})")


def table(result: dict) -> str:
    lines = ["| ensemble of seeds 0-2 | own captions, each seed | mean | ensemble | `--rerank 32 --edits 1`, "
             "each seed | mean | ensemble |", "|---|---|---|---|---|---|---|"]
    for world, rows in result.items():
        if world not in ("main", "small"):
            continue
        for kind, row in rows.items():
            cells = []
            for read in ROWS:
                alone = [m.get(read) for m in members(world, kind)]
                cells += (["; ".join(cell(r) for r in alone), mean_cell(alone)] if all(alone) else ["—", "—"])
                cells.append(cell(row[read]))
            lines.append(f"| {world}: {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(result: dict) -> dict:
    """world -> bar -> issue 27's goals for the entity-aware ensemble with `--rerank 32 --edits 1` (the worlds
    measured). Main world: at least 600 held-out pairs, compositional CIDEr above ClipCap's, test CIDEr at
    least capdec's; small world: test and compositional CIDEr at least capdec's. Bars "alike": the ClipCap and
    capdec ensembles' own captions; "each seed": every seed's ClipCap and capdec alone (their own captions)."""
    ciders = lambda scores: {split: scores[split]["CIDEr"] for split in ("test", "compositional")}
    own = lambda world, kind: [m["own"] for m in members(world, kind)]
    out = {}
    if "main" in result:
        viecap = result["main"]["viecap"][LOOP]
        heldout = viecap["compositional"]["names_heldout_pair"] >= 600
        main = lambda clipcaps, capdecs: {
            "heldout": heldout,
            "compositional": all(ciders(viecap)["compositional"] > ciders(c)["compositional"] for c in clipcaps),
            "test": all(ciders(viecap)["test"] >= ciders(c)["test"] for c in capdecs)}
        out["main"] = {"alike": main([result["main"]["clipcap"]["own"]], [result["main"]["capdec"]["own"]]),
                       "each seed": main(own("main", "clipcap"), own("main", "capdec")),
                       "the bundle's ClipCap": {"heldout": heldout,
                                                "compositional": ciders(viecap)["compositional"] > paired_clipcap()}}
    if "small" in result:
        viecap = result["small"]["viecap checked"][LOOP]
        level = lambda capdecs: {split: all(ciders(viecap)[split] >= ciders(c)[split] for c in capdecs)
                                 for split in ("test", "compositional")}
        out["small"] = {"alike": level([result["small"]["capdec"]["own"]]), "each seed": level(own("small", "capdec"))}
    return out


def pair(scores: dict) -> str:
    return f"{100 * scores['test']['CIDEr']:.1f} / {100 * scores['compositional']['CIDEr']:.1f}"


def verdict(met: dict) -> str:
    missed = [goal for goal, ok in met.items() if not ok]
    return "meets every goal" if not missed else f"misses {', '.join(missed)}"


def sentence(result: dict) -> str:
    """The README's account of the main world's table."""
    main, met = result["main"], goals(result)["main"]
    mean = lambda kind, read: mean_pair([ciders(m[read]) for m in members("main", kind)])
    calls = lambda row: row["test"]["embedder_calls_per_caption"]
    alone = [m[LOOP] for m in members("main", "viecap")]
    return (f"Main world, mean of the three seeds and their ensemble (test / compositional CIDEr): viecap with "
            f"`--rerank 32 --edits 1` {mean('viecap', LOOP)} and {pair(main['viecap'][LOOP])} "
            f"({main['viecap'][LOOP]['compositional']['names_heldout_pair']} held-out pairs), for "
            f"{calls(main['viecap'][LOOP]):.1f} embedder calls per test caption against "
            f"{sum(calls(r) for r in alone) / len(alone):.1f}; capdec's own captions {mean('capdec', 'own')} and "
            f"{pair(main['capdec']['own'])}; paired ClipCap's {mean('clipcap', 'own')} and "
            f"{pair(main['clipcap']['own'])}. Against every seed's paired ClipCap and capdec alone, the viecap "
            f"ensemble {verdict(met['each seed'])}; against ClipCap and capdec ensembles made the same way it "
            f"{verdict(met['alike'])}.")


def small_sentence(result: dict) -> str:
    """The README's account of the small world's rows."""
    small, met = result["small"], goals(result)["small"]
    mean = lambda kind, read: mean_pair([ciders(m[read]) for m in members("small", kind)])
    return (f"Small world, the same way: the checked viecap with `--rerank 32 --edits 1` {mean('viecap checked', LOOP)} "
            f"(mean of seeds) and {pair(small['viecap checked'][LOOP])} (ensemble); capdec's own captions "
            f"{mean('capdec', 'own')} and {pair(small['capdec']['own'])}. The goal there is to be level with capdec on "
            f"both splits: against every seed's capdec alone the viecap ensemble {verdict(met['each seed'])}; "
            f"against the capdec ensemble it {verdict(met['alike'])}.")


def bundled_sentence(result: dict) -> str:
    """The README's account of its own example, the bundled capdec and viecap as one ensemble."""
    rows = result["bundled"]
    both = " + ".join(BUNDLED)
    said = lambda read: "; ".join(f"{name} {pair(rows[name][read])} ({rows[name][read]['compositional']['names_heldout_pair']})"
                                  for name in (both, *BUNDLED))
    return (f"The README's example above, the bundle's capdec and viecap as one ensemble, read on the same main-world "
            f"images (test / compositional CIDEr, held-out pairs): own captions {said('own')}; with `--rerank 8 "
            f"--edits 1` {said('rerank 8, edits 1')}.")


def more_candidates_sentence(result: dict) -> str:
    """The README's account of one seed given more candidates instead of more seeds."""
    more = [result["viecap alone, rerank 64, edits 1"][f"seed {s}"] for s in SEEDS]
    calls = lambda rows: sum(r["test"]["embedder_calls_per_caption"] for r in rows) / len(rows)
    return (f"Not only more candidates: each viecap seed alone with `--rerank 64 --edits 1` (rerank's most, twice "
            f"the 32) averages {mean_pair([ciders(r) for r in more])} ({sum(r['compositional']['names_heldout_pair'] for r in more) / 3:.0f} "
            f"held-out pairs, {calls(more):.1f} embedder calls per test caption), against "
            f"{mean_pair([ciders(m[LOOP]) for m in members('main', 'viecap')])} with 32 and {pair(result['main']['viecap'][LOOP])} "
            f"for the ensemble of the three.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-best", default="bench-run/keep-best", help="keep_best.py's --work")
    parser.add_argument("--loop", default="bench-run/loop")
    parser.add_argument("--small", default="bench-run/merge-small", help="entity_merge_small.py's --work")
    parser.add_argument("--out", default=str(RESULTS / "ensemble_scenes.json"))
    args = parser.parse_args()
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result["recipe"] = {"members": "seeds 0, 1, 2 of keep_best.py's kept decoders (main world) and of "
                        "entity_merge_small.py's (small world)", "read_with": ROWS}
    measure(worlds(Path(args.keep_best), Path(args.loop), Path(args.small)), result, lambda: write(str(out), result))
    measure_bundled(Path(args.loop) / "scenes", result, lambda: write(str(out), result))
    measure_more_candidates(Path(args.keep_best), Path(args.loop) / "scenes", result, lambda: write(str(out), result))
    print(table(result))
    print(sentence(result))
    if "small" in result:
        print(small_sentence(result))
    print(bundled_sentence(result))
    print(more_candidates_sentence(result))


if __name__ == "__main__":
    main()
