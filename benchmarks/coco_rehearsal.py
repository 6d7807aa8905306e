"""A COCO-shaped rehearsal of the real path, end to end, on this machine (not a test: tens of minutes).

It writes N generated JPEGs of mixed sizes (each side 320-640 px) under raw COCO file names
(`train2014/COCO_train2014_000000000042.jpg`, `val2014/COCO_val2014_...`) with 5 captions each in a
Karpathy `dataset_coco.json` (the scenes world draws the pictures and captions, resized and stored as
JPEG like photos), then runs the stages a COCO user runs, each as its own `unembed` process:

    data import (Karpathy)  ->  embed (the test split)  ->  train capdec (text only, --steps)
    ->  train clip (one epoch over a --clip-images subset, streaming)  ->  caption the test images
    (raw COCO file names)  ->  eval against the test references (a COCO annotation file: integer ids,
    raw file names; every caption must find its image)

and records each stage's wall time and peak RSS (the process tree's, sampled every 0.1 s) in JSON.
Run it at two sizes to see whether memory grows with the number of images:

    python benchmarks/coco_rehearsal.py --images 20000 --work bench-run/coco-20k --out benchmarks/results/coco_rehearsal_20k.json
    python benchmarks/coco_rehearsal.py --images 120000 --work bench-run/coco-120k --out benchmarks/results/coco_rehearsal_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPLIT_OF = {"train": "train2014", "val": "val2014", "test": "val2014"}


def _write_images(job: tuple) -> list[dict]:
    """Render, resize and save one chunk of images; returns their Karpathy records."""
    from unembed.data.scenes import generate_split, render

    root, split, start, count, seed = job
    rng = random.Random(seed * 1_000_003 + start)
    records = []
    for i, (scene, captions, scene_seed) in enumerate(generate_split("train", count, seed + start)):
        cocoid = start + i
        folder = SPLIT_OF[split]
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        size = (rng.randint(320, 640), rng.randint(320, 640))
        render(scene, seed=scene_seed).resize(size).save(Path(root) / folder / name, quality=85)
        sentences = (captions * 5)[:5]
        records.append({"filepath": folder, "filename": name, "cocoid": cocoid, "imgid": cocoid, "split": split,
                        "sentences": [{"raw": c, "tokens": c.split()} for c in sentences]})
    return records


def make_dataset(root: Path, n_train: int, n_val: int, n_test: int, seed: int, workers: int) -> dict:
    for folder in set(SPLIT_OF.values()):
        (root / folder).mkdir(parents=True, exist_ok=True)
    jobs, start, chunk = [], 0, 2000
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for offset in range(0, n, chunk):
            jobs.append((str(root), split, start + offset, min(chunk, n - offset), seed))
        start += n
    with ProcessPoolExecutor(workers) as pool:
        records = [r for part in pool.map(_write_images, jobs) for r in part]
    (root / "dataset_coco.json").write_text(json.dumps({"images": records, "dataset": "coco"}))
    # The test references as COCO's own annotation files hold them: integer ids, raw file names.
    test = [r for r in records if r["split"] == "test"]
    refs = {"images": [{"id": r["cocoid"], "file_name": r["filename"]} for r in test],
            "annotations": [{"id": n, "image_id": r["cocoid"], "caption": s["raw"]}
                            for n, (r, s) in enumerate((r, s) for r in test for s in r["sentences"])]}
    (root / "captions_test.json").write_text(json.dumps(refs))
    return {"images": len(records)}


def subset(root: Path, n_train: int, name: str) -> Path:
    """A Karpathy file holding the first n_train training images and every val/test image."""
    data = json.loads((root / "dataset_coco.json").read_text())
    kept, seen = [], 0
    for im in data["images"]:
        if im["split"] == "train":
            seen += 1
            if seen > n_train:
                continue
        kept.append(im)
    path = root / name
    path.write_text(json.dumps({"images": kept, "dataset": "coco"}))
    return path


def run_stage(argv: list[str], cwd: Path) -> dict:
    """One `unembed` command: its exit code, wall seconds and the peak RSS of its process tree."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "unembed.cli", *argv], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    watched, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [watched] + watched.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    out, err = proc.communicate()
    return {"argv": argv, "exit": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(peak / 2 ** 20, 1), "stdout_tail": out[-1500:], "stderr_tail": err[-1500:]}


def write_result(result: dict, out, work: Path, given_work: str) -> None:
    """The JSON with this machine's folders spelled as the command gave them (relative to the repo)."""
    text = json.dumps(result, indent=2).replace(str(work), given_work).replace(str(REPO) + "/", "")
    Path(out).write_text(text + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120_000, help="training images (COCO's Karpathy train+restval: 113k)")
    parser.add_argument("--val", type=int, default=5000)
    parser.add_argument("--test", type=int, default=5000)
    parser.add_argument("--clip-images", type=int, default=20_000, help="the subset `train clip` runs one epoch over")
    parser.add_argument("--steps", type=int, default=300, help="capdec training steps")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="bench-run/coco")
    parser.add_argument("--out", default="benchmarks/results/coco_rehearsal_cpu.json")
    args = parser.parse_args(argv)

    work = Path(args.work).resolve()
    coco = work / "coco"
    embedder = str(REPO / "unembed" / "bundle" / "embedder")
    result = {"images": args.images, "val": args.val, "test": args.test, "clip_images": args.clip_images,
              "capdec_steps": args.steps, "cpu_count": os.cpu_count(), "stages": {}}
    t0 = time.perf_counter()
    if not (coco / "dataset_coco.json").is_file():
        result["generate"] = make_dataset(coco, args.images, args.val, args.test, args.seed, args.workers)
    result["generate_seconds"] = round(time.perf_counter() - t0, 1)
    small = subset(coco, args.clip_images, "dataset_coco_clip.json")
    test_files = sorted(str(p) for p in (coco / "val2014").glob("*.jpg"))
    test_ids = {im["filename"] for im in json.loads((coco / "dataset_coco.json").read_text())["images"]
                if im["split"] == "test"}
    test_files = [f for f in test_files if Path(f).name in test_ids]
    (work / "test-files.txt").write_text("\n".join(test_files) + "\n")
    stages = [
        ("data import", ["data", "import", "--format", "karpathy", "--annotations", str(coco / "dataset_coco.json"),
                         "--out", "data"]),
        ("embed", ["embed", "data/test/images", "--embedder", embedder, "--out", "test-embeddings.safetensors",
                   "--workers", str(args.workers), "--device", "cpu"]),
        ("train capdec", ["train", "capdec", "--data", "data", "--embedder", embedder, "--out", "capdec",
                          "--lm", "scratch", "--tokenizer", "corpus:2000", "--lm-config",
                          '{"n_layer": 2, "n_embd": 128}', "--max-steps", str(args.steps), "--batch-size", "64",
                          # CapDec's paper schedule warms up for 5,000 steps: in a few hundred it learns nothing
                          "--warmup-steps", str(max(1, args.steps // 10)), "--lr", "1e-3", "--device", "cpu"]),
        ("data import (clip subset)", ["data", "import", "--format", "karpathy", "--annotations", str(small),
                                       "--out", "data-clip"]),
        ("train clip", ["train", "clip", "--data", "data-clip", "--out", "clip", "--epochs", "1",
                        "--workers", str(args.workers), "--device", "cpu"]),
        ("caption", ["caption", *test_files, "--decoder", "capdec", "--out", "test-captions.jsonl",
                     "--workers", str(args.workers), "--device", "cpu"]),
        ("eval", ["eval", "--results", "test-captions.jsonl", "--refs", str(coco / "captions_test.json"),
                  "--no-spice", "--out", "scores.json"]),
    ]
    for name, stage in stages:
        print(f"{name} ...", flush=True)
        result["stages"][name] = run_stage(stage, work)
        row = result["stages"][name]
        print(f"  exit {row['exit']}, {row['seconds']} s, peak {row['peak_rss_mb']} MB", flush=True)
        write_result(result, args.out, work, args.work)
        if row["exit"] != 0:
            print(row["stderr_tail"], file=sys.stderr)
            return 1
    result["scores"] = json.loads((work / "scores.json").read_text())
    result["captions"] = sum(1 for _ in (work / "test-captions.jsonl").open())
    write_result(result, args.out, work, args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
