"""Reduced-precision inference (`--dtype`): every bundled decoder captions the scenes test split in
fp32, bf16 and fp16 (torch.autocast; the shared embedding pass stays fp32), side by side through
`unembed compare` (a finished
precision's compare.json in --work is reused). Reported per decoder: CIDEr in each precision and its change, the share of
captions identical to fp32's, and decoding speed against fp32.

Outputs are not asserted equal across precisions: bf16 and fp16 round differently from fp32, so some
captions change by design, and how many is what this measures. What is asserted: every precision
captioned the same images, by id, in the same order, with no decoder failing; the share of identical
captions is counted over every image, matched by id. The 1-minute load average is recorded at the
start and the end, with a note when it is above 1.5 (other jobs slow the decoding-speed ratios).

    python benchmarks/precision.py --data DIR --out benchmarks/results/precision_cpu.json

DIR is a scenes world (`unembed data scenes --out DIR --seed 0`; `make bundle` leaves one).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from machine_load import load_average, load_record
from result_paths import recorded_path

BUNDLE = Path(__file__).resolve().parents[1] / "unembed" / "bundle"
DTYPES = ("fp32", "bf16", "fp16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", default="bench-run/precision")
    parser.add_argument("--max-images", type=int, default=500)
    parser.add_argument("--out", default="benchmarks/results/precision_cpu.json")
    args = parser.parse_args()
    load_start = load_average()
    names = json.loads((BUNDLE / "bundle.json").read_text())["decoders"]
    decoders = ",".join(f"{n}={BUNDLE / n}" for n in names)
    runs = {}
    for dtype in DTYPES:
        out = Path(args.work) / dtype
        done = out / "compare.json"
        if not (done.is_file() and not any(r["error"] for r in json.loads(done.read_text())["decoders"])):
            subprocess.run([sys.executable, "-m", "unembed.cli", "compare", "--data", args.data, "--decoders", decoders,
                            "--embedder", str(BUNDLE / "embedder"), "--out", str(out), "--max-images", str(args.max_images),
                            "--dtype", dtype, "--no-spice", "--no-gap", "--device", "cpu"], check=True)
        compared = json.loads((out / "compare.json").read_text())
        failed = {row["name"]: row["error"] for row in compared["decoders"] if row["error"]}
        assert not failed, f"{dtype}: decoders failed: {failed}"
        runs[dtype] = {}
        for row in compared["decoders"]:
            records = [json.loads(line) for line in (out / "captions" / f"{row['name']}.jsonl").open()]
            runs[dtype][row["name"]] = {"CIDEr": row["metrics"].get("CIDEr"),
                                        "captions_per_second": row.get("captions_per_second"),
                                        "ids": [str(r["image_id"]) for r in records],
                                        "captions": [r["caption"] for r in records]}
    result = {"data": recorded_path(args.data), "images": args.max_images,
              "checked": "every precision captioned the same images (ids, in order) with every decoder; captions "
                         "are not asserted equal across precisions: reduced precision rounds differently and changes "
                         "some by design, and 'same captions' is that share, over every image matched by id",
              "decoders": {}}
    for name in names:
        base = runs["fp32"][name]
        row = {"fp32 CIDEr": round(100 * base["CIDEr"], 1), "fp32 captions/s": base["captions_per_second"]}
        for dtype in DTYPES[1:]:
            other = runs[dtype][name]
            assert other["ids"] == base["ids"] and len(set(base["ids"])) == len(base["ids"]), \
                f"{name}: {dtype} captioned other images than fp32"
            same = sum(a == b for a, b in zip(base["captions"], other["captions"])) / len(base["captions"])
            row[dtype] = {"CIDEr change": round(100 * (other["CIDEr"] - base["CIDEr"]), 1),
                          "same captions": round(same, 3),
                          "speed vs fp32": round(other["captions_per_second"] / base["captions_per_second"], 2)}
        result["decoders"][name] = row
        print(name, json.dumps(row), flush=True)
    result.update(load_record(load_start, load_average(), interleaved=False))
    from unembed.io import write_json

    write_json(args.out, result)


if __name__ == "__main__":
    main()
