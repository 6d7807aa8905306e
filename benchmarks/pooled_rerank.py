"""Two text-only decoders, one rerank: does the embedder, picking among both decoders' candidates, get
viecap's held-out pairs and decap's CIDEr at once?

Issue 27's two compositional goals (600 of 1,000 captions naming the held-out pair; compositional CIDEr
above paired ClipCap's) are each met by a different decoder of `loop_scenes.py`'s part 5: viecap
`--recombine colours --recombine-rate 2` names the most held-out pairs, decap with the same captions
has the best CIDEr. Here each writes 16 candidates for every image of the test and compositional
splits (1,000 each), and the embedder reranks each decoder's 16 alone and the 32 pooled, at the default
weight and two larger ones (the pooled scores are two LMs' mean token log-probs, which need not share
a scale, so a larger weight lets the cosine decide more). Same embedder calls for the pool as for
`--rerank 32` of one decoder.

Needs loop_scenes.py's part 5 decoders (its `--recombined-only` trains them):

    python benchmarks/pooled_rerank.py --work bench-run/loop --seeds 0,1
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from entity_scenes import heldout_counts, pairs_in_images
from loop_scenes import BUNDLE, candidate_rows, decoder_loader, eval_splits, main_world_plan, write

KINDS = ("viecap", "decap")
CANDIDATES = 16
WEIGHTS = (0.05, 0.1, 0.2)


def picks(embedder, embedded, rows, references, in_image) -> dict:
    """CIDEr (x100) of the rerank pick at each of WEIGHTS, and the held-out counts on the compositional split."""
    from unembed.decoders.rerank import dedupe, logit_scale, pick, row_cosines
    from unembed.eval.metrics import coco_caption_metrics

    rows = [dedupe(row) for row in rows]  # a text both decoders wrote, once
    cosines = row_cosines(embedder, embedded, rows)
    out = {}
    for weight in WEIGHTS:
        picked = dict(zip(embedded.ids, pick(rows, cosines, weight, logit_scale(embedder))))
        scores = {"CIDEr": round(100 * coco_caption_metrics(picked, references, spice=False, meteor=False)["CIDEr"], 1)}
        if in_image is not None:
            scores.update(heldout_counts(picked, in_image))
        out[f"weight {weight:g}"] = scores
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench-run/loop")
    parser.add_argument("--out", default="benchmarks/results/pooled_rerank.json")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()

    from unembed.embedders import load_embedder

    work, data = Path(args.work), Path(args.work) / "scenes"
    plan = main_world_plan(work, data)
    embedder = load_embedder(str(BUNDLE / "embedder"), "cpu")
    splits = eval_splits(embedder, data, {"test": args.images, "compositional": args.images})
    in_image = pairs_in_images(data / "compositional")
    decoder_at = decoder_loader(embedder)
    result = {"embedder_id": embedder.id, "candidates_per_decoder": CANDIDATES, "images": args.images,
              "decoders": "{kind} recombined, rate 2 (loop_scenes.py part 5)", "seeds": {}}
    for seed in (int(s) for s in args.seeds.split(",")):
        names = {kind: f"{kind} recombined, rate 2" + (f", seed {seed}" if seed else "") for kind in KINDS}
        missing = [name for name in names.values() if not (plan[name][0] / "config.json").is_file()]
        if missing:
            raise SystemExit(f"pooled_rerank: {', '.join(missing)} not trained; run loop_scenes.py --recombined-only")
        rows = result["seeds"][str(seed)] = {}
        for split, (embedded, references) in splits.items():
            start, written = time.perf_counter(), {}
            for kind, name in names.items():
                written[kind] = candidate_rows(decoder_at(plan[name][0]), embedded, CANDIDATES)
            held = in_image if split == "compositional" else None
            for kind in KINDS:
                rows.setdefault(kind, {})[split] = picks(embedder, embedded, written[kind], references, held)
            pooled = [a + b for a, b in zip(*(written[kind] for kind in KINDS))]
            rows.setdefault(" + ".join(KINDS), {})[split] = picks(embedder, embedded, pooled, references, held)
            print(seed, split, json.dumps({k: v[split] for k, v in rows.items()}), f"{time.perf_counter() - start:.0f} s",
                  flush=True)
        write(args.out, result)


if __name__ == "__main__":
    main()
