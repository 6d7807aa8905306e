"""Synonyms merged in viecap's detection where the embedder is unsure: the small world of
loop_scenes.py (3,000 training scenes, seed 7, a CLIP from `unembed train clip --epochs 5`), with
capdec and viecap trained by that world's recipe (SMALL_RECIPE, 600 steps), viecap read unmerged
(entity_merge 0) and merged (the default), the same weights, on 1,000 test and compositional images.
And viecap trained again as unembed trains it since its detector is checked on the val split
(ViECapConfig.entity_min_precision): in this world no threshold reaches precision 0.5, so it names no
entity ("viecap, detector checked on val"); the val precisions it measured are `detection_check`.

`unembed train clip` repeats to the bit on one machine only, so this run trains its own embedder
and measures every row against it; it does not reuse loop_scenes.py's small-world rows.

    python benchmarks/entity_merge_small.py --work bench-run/merge-small
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from loop_scenes import SMALL_RECIPE, UNMERGED, MERGED, caption_scores, decoder_loader, eval_splits, unembed, write
from entity_scenes import pairs_in_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench-run/merge-small")
    parser.add_argument("--out", default="benchmarks/results/entity_merge_small.json")
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    work = Path(args.work)
    data, embedder_dir = work / "scenes", work / "embedder"
    start = time.perf_counter()
    if not (data / "train" / "captions.json").is_file():
        unembed("data", "scenes", "--out", str(data), "--n", "3000", "--n-eval", str(args.images), "--seed", "7")
    if not (embedder_dir / "config.json").is_file():
        unembed("train", "clip", "--data", str(data), "--out", str(embedder_dir), "--epochs", "5")
    # viecap-checked: the same recipe and seed as viecap, trained after the val check existed (the
    # same weights: the check reads no weights and draws no random number)
    runs = {"capdec": ("capdec", []), "viecap": ("viecap", ["--mapper", "mlp"]),
            "viecap-checked": ("viecap", ["--mapper", "mlp"])}
    for name, (kind, extra) in runs.items():
        if not (work / name / "config.json").is_file():
            unembed("train", kind, "--data", str(data), "--embedder", str(embedder_dir), "--out", str(work / name),
                    *SMALL_RECIPE, "--max-steps", "600", *extra)

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


if __name__ == "__main__":
    main()
