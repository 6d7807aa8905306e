"""ViECap on the scenes world: does naming detected entities let a text-only captioner name colour-shape
pairs it never saw described?

One run, all on the same embedder (by default the shipped bundle's), data (`unembed data scenes
--n 20000 --seed 0`) and recipe style as the bundle's compare run (scripts/bundle.json: scratch LMs of
3 layers x 128, 600 steps of 64). `unembed compare` trains clipcap (paired), capdec, decap and the
viecap variants and scores them on the test split; a second compare scores the same models on the
compositional split, where every image holds a pair ("purple star", "orange heart") that no
training caption names. Then, per decoder:
- the COCO metrics and CLIPScore on both splits (from compare.json);
- how many compositional captions name a held-out pair (`named_pairs`), and how many name one that
  is in the image;
- for the viecap variants, entity detection precision and recall against the entities the
  reference captions name (the union over each image's five references).

Variants (the ablations): viecap (noun vocabulary, ViECap's), phrases (attribute-noun vocabulary),
phrases_nomask (no entity masking in training), noprompt (no hard prompt: CapDec with the same
mapper and budget).

    python benchmarks/entity_scenes.py --work bench-run/entity --out benchmarks/results/entity_scenes.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from result_paths import recorded_path

LM = {"n_layer": 3, "n_embd": 128}
VIECAP = {"lm_config": LM, "mapper": "mlp"}  # CapDec's mapper, so the hard prompt is the difference
CONFIG = {
    "clipcap": {"lm_config": LM},
    "capdec": {"lm_config": LM},
    "decap": {"lm_config": LM, "projection_size": 5000},
    "viecap": VIECAP,
    "phrases": {**VIECAP, "entity_vocabulary": "phrases"},
    "phrases_nomask": {**VIECAP, "entity_vocabulary": "phrases", "entity_mask": 0.0},
    "noprompt": {**VIECAP, "hard_prompt": False},
}
DECODERS = "clipcap,capdec,decap,viecap,phrases=viecap,phrases_nomask=viecap,noprompt=viecap"
SPLITS = ("test", "compositional")


def unembed(*args: str) -> None:
    print("+ unembed", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "unembed.cli", *args], check=True)


def heldout_counts(captions: dict[str, str], scenes: dict[str, set]) -> dict:
    from unembed.data.scenes import HELDOUT_PAIRS, named_pairs

    named = {i: named_pairs(c) & HELDOUT_PAIRS for i, c in captions.items()}
    return {"names_heldout_pair": sum(bool(p) for p in named.values()),
            "names_heldout_pair_in_image": sum(bool(p & scenes.get(i, set())) for i, p in named.items()),
            "captions": len(captions)}


def pairs_in_images(split_dir: Path) -> dict[str, set]:
    from unembed.data.scenes import load_split

    return {str(s["image_id"]): {(o.colour, o.shape) for o in s["scene"].objects}
            for s in load_split(split_dir)}


def detection(model_dir: Path, split_dir: Path, embedder) -> dict:
    from unembed.data.splits import load_split
    from unembed.pipeline import embed_split
    from unembed.decoders import load_decoder
    from unembed.entities import detection_scores

    decoder = load_decoder(model_dir)
    if not getattr(decoder.config, "hard_prompt", False):
        return {}
    embedded = embed_split(embedder, split_dir)
    _, references, _ = load_split(split_dir)
    found = decoder.detect(embedded.vectors)
    return {"vocabulary_size": len(decoder.config.entities), **detection_scores(found, references, decoder.vocabulary),
            "example": found[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench-run/entity")
    parser.add_argument("--out", default="benchmarks/results/entity_scenes.json")
    parser.add_argument("--embedder", default=str(Path(__file__).resolve().parents[1] / "unembed" / "bundle" / "embedder"))
    parser.add_argument("--n", type=int, default=20000, help="training images of the scenes world")
    parser.add_argument("--max-steps", type=int, help="override the recipe's 600 steps (a quick check)")
    args = parser.parse_args()
    work = Path(args.work)
    data = work / "scenes"
    if not (data / "train" / "captions.json").is_file():
        unembed("data", "scenes", "--out", str(data), "--n", str(args.n), "--seed", "0")
    config = work / "config.json"
    config.write_text(json.dumps(CONFIG))
    steps = ["--max-steps", str(args.max_steps)] if args.max_steps else []
    unembed("compare", "--data", str(data), "--decoders", DECODERS, "--embedder", args.embedder, "--out",
            str(work / "test"), "--config", str(config), "--no-spice", *steps)
    names = list(CONFIG)
    trained = ",".join(f"{n}={work / 'test' / 'models' / n}" for n in names)
    unembed("compare", "--data", str(data), "--decoders", trained, "--embedder", args.embedder, "--out",
            str(work / "compositional"), "--split", "compositional", "--no-spice")

    from unembed.embedders import load_embedder

    embedder = load_embedder(args.embedder, "cpu")  # detection embeds each split once, with this
    result = {"embedder": recorded_path(args.embedder), "embedder_id": embedder.id, "data": f"scenes world, {args.n} training images, seed 0",
              "recipe": CONFIG, "decoders": {}}
    in_image = pairs_in_images(data / "compositional")
    for name in names:
        row = {}
        for split in SPLITS:
            compared = json.loads((work / split / "compare.json").read_text())
            metrics = next(r for r in compared["decoders"] if r["name"] == name)["metrics"]
            row[split] = {k: metrics.get(k) for k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "CLIPScore")}
            row[split]["detection"] = detection(work / "test" / "models" / name, data / split, embedder)
        records = [json.loads(line) for line in (work / "compositional" / "captions" / f"{name}.jsonl").open()]
        row["compositional"].update(heldout_counts({str(r["image_id"]): r["caption"] for r in records}, in_image))
        row["example_compositional_caption"] = records[0]["caption"]
        result["decoders"][name] = row
        print(name, json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def detection_cell(detection: dict) -> str:
    """Entity precision / recall in %, or a dash for a decoder that detects nothing."""
    if detection.get("precision") is None:
        return "—"
    return f"{100 * detection['precision']:.0f} / {100 * (detection['recall'] or 0):.0f}"


def heldout_cell(compositional: dict) -> str:
    return f"{compositional['names_heldout_pair']} ({compositional['names_heldout_pair_in_image']})"


def table(result: dict) -> str:
    lines = ["| decoder | test CIDEr | test CLIPScore | comp. CIDEr | comp. CLIPScore | names a held-out pair "
             "(in the image) / 1,000 | detection P / R (test) | detection P / R (comp.) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in result["decoders"].items():
        t, c = row["test"], row["compositional"]
        lines.append(f"| {name} | {100 * t['CIDEr']:.1f} | {100 * t['CLIPScore']:.1f} | {100 * c['CIDEr']:.1f} | "
                     f"{100 * c['CLIPScore']:.1f} | {heldout_cell(c)} | {detection_cell(t['detection'])} | "
                     f"{detection_cell(c['detection'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
