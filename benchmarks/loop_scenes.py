"""Closing the loop on the scenes world: does checking a caption against the input embedding (rerank,
a vec2text-style corrector) make text-only decoders name what they see, and invert text embeddings?

Same embedder, data and training budget as entity_scenes.py: the shipped bundle's embedder and
decoders (scripts/bundle.json: scratch LMs of 3 layers x 128, 600 steps of 64 on `unembed data scenes
--n 20000 --seed 0`), and a corrector per base trained here with the same budget
(`unembed train corrector --base DIR --max-steps 600 --batch-size 64`, LM 3 x 128).

1. The rerank weight, swept on the val split (500 images; CIDEr of capdec and viecap with rerank 8);
   the default in unembed/generation.py is the best of this sweep.
2. Captioning, test and compositional splits (1,000 images each): per base decoder, the ablations
   base only / rerank 8 / corrector K = 1, 2, 4, 8 / both (corrector K = 4 with 4 candidates per step);
   paired ClipCap as the reference. CIDEr, BLEU-4, captions naming a held-out colour-shape pair (and
   naming one that is in the image), embedder calls per caption, seconds.
3. Inversion of the test split's first caption per image (1,000): exact match, BLEU-4, cosine,
   embedder calls per caption, for the same ablations (K <= 7, so that calls stay <= 8).

    python benchmarks/loop_scenes.py --work bench-run/loop --out benchmarks/results/loop_scenes.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from entity_scenes import heldout_counts, pairs_in_images
from result_paths import recorded_path

BUNDLE = Path(__file__).resolve().parents[1] / "unembed" / "bundle"
BASES = ("capdec", "viecap", "decap")
CORRECTED = ("capdec", "viecap")  # a corrector is trained over these (decap: base and rerank only, for time)
CORRECTOR = ["--lm-config", '{"n_layer": 3, "n_embd": 128}', "--max-steps", "600", "--batch-size", "64"]
WEIGHTS = (0.0, 0.25, 0.5, 0.65, 0.8, 1.0)
STEPS = (1, 2, 4, 8)


def unembed(*args: str) -> None:
    print("+ unembed", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "unembed.cli", *args], check=True)


def caption_scores(decoder, embedder, embedded, references, in_image=None, **generation) -> dict:
    from unembed.eval.metrics import coco_caption_metrics

    calls, start = embedder.texts_embedded, time.perf_counter()
    captions = [c for s in range(0, len(embedded), 100)
                for c in decoder.decode(embedded.select(slice(s, s + 100)), **generation)]
    seconds = time.perf_counter() - start
    predictions = dict(zip(embedded.ids, captions))
    metrics = coco_caption_metrics(predictions, references, spice=False, meteor=False)
    row = {"CIDEr": round(metrics["CIDEr"], 4), "BLEU-4": round(metrics["BLEU-4"], 4),
           "embedder_calls_per_caption": round((embedder.texts_embedded - calls) / len(captions), 2),
           "seconds": round(seconds, 1), "example": captions[0]}
    if in_image is not None:
        row.update(heldout_counts(predictions, in_image))
    return row


def variants(base: str, corrector: Path | None) -> dict:
    """name -> (decoder directory, generation options)."""
    out = {f"{base}": (BUNDLE / base, {}), f"{base} rerank 8": (BUNDLE / base, {"rerank": 8})}
    if corrector is not None:
        for k in STEPS:
            out[f"{base} corrector K={k}"] = (corrector, {"correct": k})
        out[f"{base} corrector K=4 + rerank 4"] = (corrector, {"correct": 4, "rerank": 4})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench-run/loop")
    parser.add_argument("--out", default="benchmarks/results/loop_scenes.json")
    parser.add_argument("--bases", default=",".join(BASES))
    parser.add_argument("--images", type=int, default=1000, help="images per split (test, compositional)")
    args = parser.parse_args()
    work = Path(args.work)
    data = work / "scenes"
    if not (data / "train" / "captions.json").is_file():
        unembed("data", "scenes", "--out", str(data), "--n", "20000", "--seed", "0")
    bases = [b for b in args.bases.split(",") if b]
    correctors = {}
    for base in [b for b in bases if b in CORRECTED]:
        correctors[base] = work / f"corrector-{base}"
        if not (correctors[base] / "config.json").is_file():
            unembed("train", "corrector", "--base", str(BUNDLE / base), "--data", str(data), "--out",
                    str(correctors[base]), *CORRECTOR)

    import torch

    from unembed.data.splits import load_split
    from unembed.decoders import load_decoder
    from unembed.embedders import load_embedder
    from unembed.eval.inversion import held_out_captions, invert
    from unembed.pipeline import embed_split

    torch.manual_seed(0)
    embedder = load_embedder(str(BUNDLE / "embedder"), "cpu")
    splits = {}
    for split in ("val", "test", "compositional"):
        embedded = embed_split(embedder, data / split)
        _, captions, ids = load_split(data / split)
        limit = 500 if split == "val" else args.images
        splits[split] = (embedded.select(range(min(limit, len(embedded)))), {str(i): c for i, c in zip(ids, captions)})
    in_image = pairs_in_images(data / "compositional")
    loaded = {}

    def decoder_at(path: Path):
        if path not in loaded:
            loaded[path] = load_decoder(path, device="cpu", embedder=embedder)
        return loaded[path]

    result = {"embedder": recorded_path(str(BUNDLE / "embedder")), "embedder_id": embedder.id,
              "data": "scenes world, 20000 training images, seed 0", "corrector_training": " ".join(CORRECTOR),
              "machine": {"cpus": __import__("os").cpu_count(), "torch": torch.__version__},
              "weight_sweep": {}, "captioning": {}, "inversion": {}}
    for path in correctors.values():
        metrics = json.loads((path / "metrics.json").read_text())
        result.setdefault("correctors", {})[path.name] = {k: metrics.get(k) for k in
                                                          ("train_seconds", "final_loss", "val_CIDEr", "val_BLEU-4")}

    # 1. the rerank weight on val
    embedded, references = splits["val"]
    for base in ("capdec", "viecap"):
        for weight in WEIGHTS:
            options = {"rerank": 8, "rerank_weight": weight}
            row = caption_scores(decoder_at(BUNDLE / base), embedder, embedded, references, **options)
            result["weight_sweep"][f"{base} w={weight}"] = row
            print("val", base, weight, row["CIDEr"], flush=True)
        result["weight_sweep"][f"{base} base"] = caption_scores(decoder_at(BUNDLE / base), embedder, embedded, references)

    # 2. captioning
    rows = {"clipcap (paired)": (BUNDLE / "clipcap", {}), "clipcap (paired) rerank 8": (BUNDLE / "clipcap", {"rerank": 8})}
    for base in bases:
        rows.update(variants(base, correctors.get(base)))
    for name, (path, options) in rows.items():
        result["captioning"][name] = {"options": options}
        for split in ("test", "compositional"):
            embedded, references = splits[split]
            row = caption_scores(decoder_at(path), embedder, embedded, references,
                                 in_image if split == "compositional" else None, **options)
            result["captioning"][name][split] = row
            print(split, name, json.dumps(row), flush=True)
        write(args.out, result)

    # 3. inversion
    captions = held_out_captions(data / "test", args.images)
    for base in bases:
        inversions = {f"{base}": (BUNDLE / base, {}), f"{base} rerank 8": (BUNDLE / base, {"rerank": 8})}
        if base in correctors:
            for k in (1, 3, 7):
                inversions[f"{base} corrector K={k}"] = (correctors[base], {"correct": k})
        for name, (path, options) in inversions.items():
            scores = invert(decoder_at(path), embedder, captions, 100, **options)
            result["inversion"][name] = scores
            print("invert", name, json.dumps({k: v for k, v in scores.items() if k != "misses"}), flush=True)
        write(args.out, result)
    print(table(result))


def write(out: str, result: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")


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
