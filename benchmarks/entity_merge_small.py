"""Synonyms merged in viecap's detection where the embedder is unsure: the small world of
loop_scenes.py (3,000 training scenes, seed 7, a CLIP from `unembed train clip --epochs 5`), with
capdec and viecap trained by that world's recipe (SMALL_RECIPE, 600 steps), viecap read unmerged
(entity_merge 0) and merged (the default), the same weights, on 1,000 test and compositional images.
And viecap trained again as unembed trains it since its detector is checked on the val split
(ViECapConfig.entity_min_precision): in this world no threshold reaches precision 0.5, so it names no
entity ("viecap, detector checked on val"); the val precisions it measured are `detection_check`.

`unembed train clip` repeats to the bit on one machine only, so this run trains its own embedder
and measures every row against it; it does not reuse loop_scenes.py's small-world rows.

`--seeds` (added to the JSON as `seeds`): issue 27's small-world goal, the main world's method "no worse
than CapDec on either split", at training seeds 0, 1 and 2 (seed 0's are the decoders above): capdec
and the checked viecap as unembed trains them now (no_repeat_ngram_size 3, their default), and the
viecap with the main world's recipe, `--rerank 32 --edits 1` (its own edit margin).

    python benchmarks/entity_merge_small.py --work bench-run/merge-small
    python benchmarks/entity_merge_small.py --work bench-run/merge-small --seeds
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from loop_scenes import SEEDS, SMALL_RECIPE, UNMERGED, MERGED, caption_scores, decoder_loader, eval_splits, unembed, write
from entity_scenes import pairs_in_images


RUNS = {"capdec": ("capdec", []), "viecap": ("viecap", ["--mapper", "mlp"])}  # kind -> (command, its flags)


def train_missing(work: Path, runs: dict, extra: list[str] = ()) -> None:
    """Each of `runs` (directory name under `work` -> RUNS entry) trained by SMALL_RECIPE at 600 steps on
    work/scenes with work/embedder, where its directory holds no decoder yet."""
    for name, (kind, flags) in runs.items():
        if not (work / name / "config.json").is_file():
            unembed("train", kind, "--data", str(work / "scenes"), "--embedder", str(work / "embedder"),
                    "--out", str(work / name), *SMALL_RECIPE, "--max-steps", "600", *extra, *flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench-run/merge-small")
    parser.add_argument("--out", default="benchmarks/results/entity_merge_small.json")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--seeds", action="store_true", help="add the three-seed rows to --out's JSON")
    args = parser.parse_args()
    if args.seeds:
        return seeds(Path(args.work), args.out, args.images)
    work = Path(args.work)
    data, embedder_dir = work / "scenes", work / "embedder"
    start = time.perf_counter()
    if not (data / "train" / "captions.json").is_file():
        unembed("data", "scenes", "--out", str(data), "--n", "3000", "--n-eval", str(args.images), "--seed", "7")
    if not (embedder_dir / "config.json").is_file():
        unembed("train", "clip", "--data", str(data), "--out", str(embedder_dir), "--epochs", "5")
    # viecap-checked: the same recipe and seed as viecap, trained after the val check existed (the
    # same weights: the check reads no weights and draws no random number)
    train_missing(work, {name: RUNS[kind] for name, kind in
                         (("capdec", "capdec"), ("viecap", "viecap"), ("viecap-checked", "viecap"))})

    from unembed.embedders import load_embedder

    embedder = load_embedder(str(embedder_dir), "cpu")
    splits = eval_splits(embedder, data, {"test": args.images, "compositional": args.images})
    in_image = pairs_in_images(data / "compositional")
    decoder_at = decoder_loader(embedder)
    viecap = decoder_at(work / "viecap", MERGED)
    groups = viecap.synonym_groups()
    result = {"data": f"scenes world, 3000 training images, seed 7, {args.images} images per eval split",
              "embedder": "unembed train clip --epochs 5", "embedder_id": embedder.id,
              "recipe": " ".join(SMALL_RECIPE + ["--max-steps", "600"]),
              "merged_groups": {e: viecap.config.entities[g] for e, g in zip(viecap.config.entities, groups)
                                if e != viecap.config.entities[g]},
              "rows": {}}
    checked = decoder_at(work / "viecap-checked", MERGED)
    if not checked.config.entity_val_precision:
        raise SystemExit(f"{work / 'viecap-checked'} was trained before the val check: remove it and run again")
    result["detection_check"] = {"val_precision": checked.config.entity_val_precision,
                                 "min_precision": checked.config.entity_min_precision,
                                 "threshold": checked.detection_threshold()}
    rows = {"capdec": (work / "capdec", UNMERGED), "viecap, unmerged": (work / "viecap", UNMERGED),
            "viecap, synonyms merged": (work / "viecap", MERGED),
            "viecap, detector checked on val": (work / "viecap-checked", MERGED)}
    for name, (path, merge) in rows.items():
        result["rows"][name] = {split: caption_scores(decoder_at(path, merge), embedder, *splits[split],
                                                      in_image if split == "compositional" else None)
                                for split in ("test", "compositional")}
        print(name, json.dumps({s: r["CIDEr"] for s, r in result["rows"][name].items()}), flush=True)
    result["minutes"] = round((time.perf_counter() - start) / 60, 1)
    write(args.out, result)


# no_repeat_ngram_size given explicitly: seed 0's decoders were saved before it was their default
SEED_ROWS = {"capdec": ("capdec", {"no_repeat_ngram_size": 3}),
             "viecap, detector checked on val": ("viecap-checked", {"no_repeat_ngram_size": 3}),
             "same, --rerank 32 --edits 1": ("viecap-checked", {"no_repeat_ngram_size": 3, "rerank": 32, "edits": 1})}


def seeds(work: Path, out: str, images: int) -> None:
    """The SEED_ROWS at each of SEEDS, added to `out`'s JSON (made by a run without --seeds)."""
    from unembed.embedders import load_embedder

    result = json.loads(Path(out).read_text())
    data, embedder_dir = work / "scenes", work / "embedder"
    embedder = load_embedder(str(embedder_dir), "cpu")
    if embedder.id != result["embedder_id"]:
        raise SystemExit(f"{embedder_dir} is not the embedder {out} was measured with: run without --seeds first")
    for seed in SEEDS[1:]:
        train_missing(work, {f"capdec-seed-{seed}": RUNS["capdec"], f"viecap-checked-seed-{seed}": RUNS["viecap"]},
                      ["--seed", str(seed)])
    splits = eval_splits(embedder, data, {"test": images, "compositional": images})
    in_image = pairs_in_images(data / "compositional")
    decoder_at = decoder_loader(embedder)
    table = result["seeds"] = {}
    for seed in SEEDS:
        rows = table[f"seed {seed}"] = {}
        for name, (directory, options) in SEED_ROWS.items():
            path = work / (directory if seed == 0 else f"{directory}-seed-{seed}")
            rows[name] = {split: caption_scores(decoder_at(path, MERGED), embedder, *splits[split],
                                                in_image if split == "compositional" else None, **options)
                          for split in ("test", "compositional")}
            print(seed, name, json.dumps({s: r["CIDEr"] for s, r in rows[name].items()}), flush=True)
        write(out, result)


if __name__ == "__main__":
    main()
