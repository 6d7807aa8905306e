"""Mixed-precision training (`--mixed-precision no|bf16|fp16`) at real size: the same CapDec run
(a scratch LM of GPT-2 124M's blocks, 12 x 768, on the scenes world's captions, the shipped scenes
embedder) trained once per precision with the same seed and steps, then the test split captioned by
each model in fp32. Reported per precision: training steps/s, final loss, the fp16 grad scaler's
skipped (overflowed) steps, and, once scored, test CIDEr and the share of captions identical to the
fp32 model's.

It runs in two halves because the GPU machine has no Java, which the COCO metrics need:
    python benchmarks/train_precision.py run --data DIR --work DIR --out RESULT.json --device cuda
    python benchmarks/train_precision.py score --data DIR --result RESULT.json
`run` trains and captions through the CLI (the user's path) and writes each precision's captions as
JSON Lines beside RESULT.json; `score` adds CIDEr (`unembed eval`) and the agreement with fp32.
DIR is a scenes world (`unembed data scenes --out DIR --n 20000 --seed 0`). On a CPU, fp16 trains in
fp32 (accelerate has no CPU fp16; the CLI says so), so the fp16 row is a GPU measurement only.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from result_paths import recorded_path

GPT2_BLOCKS = {"n_layer": 12, "n_embd": 768, "n_head": 12}
PRECISIONS = ("no", "bf16", "fp16")


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "unembed.cli", *args], check=True)


def _log_rows(model_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (model_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]


def train_and_caption(precision: str, args) -> dict:
    model_dir = Path(args.work) / f"capdec-{precision}"
    t0 = time.time()
    _cli("train", "capdec", "--data", args.data, "--embedder", "bundle", "--out", str(model_dir), "--overwrite",
         "--lm", "scratch", "--lm-config", args.lm_config, "--tokenizer", "corpus:4000",
         "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", args.lr,
         "--warmup-steps", "100", "--seed", "0", "--checkpoint-every", str(args.steps),
         "--device", args.device, "--mixed-precision", precision)
    train_wall = time.time() - t0
    metrics = json.loads((model_dir / "metrics.json").read_text())
    rows = _log_rows(model_dir)
    losses = {row["step"]: row["loss"] for row in rows if "loss" in row}
    overflows = [row for row in rows if row.get("skipped") == "fp16 overflow"]
    captions = Path(args.out).with_name(f"{Path(args.out).stem}-captions-{precision}.jsonl")
    images = sorted(str(p) for p in (Path(args.data) / "test" / "images").glob("*.png"))[: args.max_images]
    t0 = time.time()
    _cli("caption", *images, "--decoder", str(model_dir), "--device", args.device, "--out", str(captions))
    caption_wall = time.time() - t0
    rows = [json.loads(line) for line in captions.read_text().splitlines() if line.strip()]
    # ids and captions only: the files' paths name the machine the run was on
    captions.write_text("".join(json.dumps({"image_id": r["image_id"], "caption": r["caption"]}) + "\n" for r in rows))
    return {"train_steps": metrics["train_steps"], "train_seconds": metrics["train_seconds"],
            "steps_per_second": round(metrics["train_steps"] / metrics["train_seconds"], 2),
            "train_wall_seconds": round(train_wall, 1), "final_loss": round(metrics["final_loss"], 4),
            "loss_at": {str(s): losses[s] for s in sorted(losses) if s % max(1, args.steps // 5) == 0},
            "fp16_overflow_steps": metrics["fp16_overflow_steps"], "skipped_steps": metrics["skipped_steps"],
            "overflow_at_steps": [row["step"] for row in overflows][:20],
            "grad_scale_after_overflows": overflows[-1]["grad_scale"] if overflows else None,
            "captions": captions.name, "images": len(images),
            "caption_wall_seconds": round(caption_wall, 1)}


def run(args) -> None:
    import torch

    result = {"device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
              "recipe": {"lm_config": json.loads(args.lm_config), "steps": args.steps, "batch_size": args.batch_size,
                         "lr": args.lr, "tokenizer": "corpus:4000", "embedder": "bundle", "seed": 0},
              "data": recorded_path(args.data), "precisions": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file():  # a run cut short goes on: the precisions it measured with this recipe are kept
        earlier = json.loads(out.read_text())
        if earlier.get("recipe") == result["recipe"]:
            result["precisions"] = {k: v for k, v in earlier["precisions"].items() if "failed" not in v}
    for precision in args.precisions.split(","):
        if precision in result["precisions"]:
            continue
        try:
            result["precisions"][precision] = train_and_caption(precision, args)
        except subprocess.CalledProcessError as e:  # one precision failing is a result, not the end of the run
            result["precisions"][precision] = {"failed": f"exit {e.returncode}: {' '.join(e.cmd[3:6])}"}
        out.write_text(json.dumps(result, indent=2) + "\n")  # after each: a run cut short keeps what it did
    print(json.dumps(result, indent=2))


def _captions(path: Path) -> dict:
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {row["image_id"]: row["caption"] for row in rows}


def score(args) -> None:
    result_path = Path(args.result)
    result = json.loads(result_path.read_text())
    refs = str(Path(args.data) / "test" / "captions.json")
    fp32 = None
    for precision, row in result["precisions"].items():
        if "captions" not in row:
            continue
        captions = result_path.with_name(Path(row["captions"]).name)
        scores = result_path.with_name(f"{result_path.stem}-scores-{precision}.json")
        _cli("eval", "--results", str(captions), "--refs", refs, "--no-spice", "--no-meteor", "--allow-partial",
             "--out", str(scores))
        row["test_CIDEr"] = round(100 * json.loads(scores.read_text())["scores"]["CIDEr"], 1)
        scores.unlink()
        texts = _captions(captions)
        if precision == "no":
            fp32 = texts
        elif fp32 is not None:
            row["same_captions_as_fp32"] = round(sum(texts[i] == fp32.get(i) for i in texts) / len(texts), 3)
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--data", required=True)
    r.add_argument("--work", default="bench-run/train-precision")
    r.add_argument("--out", default="benchmarks/results/train_precision_gpu.json")
    r.add_argument("--device", default="cuda")
    r.add_argument("--precisions", default=",".join(PRECISIONS))
    r.add_argument("--lm-config", default=json.dumps(GPT2_BLOCKS))
    r.add_argument("--steps", type=int, default=1000)
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--lr", default="3e-4")
    r.add_argument("--max-images", type=int, default=1000)
    s = sub.add_parser("score")
    s.add_argument("--data", required=True)
    s.add_argument("--result", required=True)
    args = parser.parse_args()
    run(args) if args.command == "run" else score(args)


if __name__ == "__main__":
    main()
