"""Wall time of `unembed caption` with the bundled decoder, as a user runs it: a fresh process for one
image and for 100, each run 5 times, the trees taking turns (the median is kept), for this tree and for another checkout
(`--against DIR`, e.g. a worktree of the previous main), side by side in one run, with the captions
asserted equal. The import cost is listed from `python -X importtime` (the largest top-level packages).

    git worktree add ../unembed-before <commit>
    python benchmarks/startup.py --against ../unembed-before --out benchmarks/results/startup_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from result_paths import recorded_path

ROOT = Path(__file__).resolve().parents[1]


def caption(tree: Path, files: list[str], out: Path) -> tuple[float, list]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "unembed.cli", "caption", *files, "--out", str(out)], env=env, check=True,
                   capture_output=True)
    seconds = time.perf_counter() - t0
    return seconds, [json.loads(line)["caption"] for line in out.read_text().splitlines()]


def import_costs(tree: Path, image: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "unembed.cli", "caption", image], env=env,
                          capture_output=True, text=True, check=True)
    costs = {}
    for line in done.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(2)) == 1:  # top-level imports only
            costs[m.group(3)] = round(int(m.group(1)) / 1e6, 3)
    return dict(sorted(costs.items(), key=lambda kv: -kv[1])[:8])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", help="another checkout of unembed to time beside this one")
    parser.add_argument("--out", default="benchmarks/results/startup_cpu.json")
    parser.add_argument("--work", default="bench-run/startup")
    args = parser.parse_args()
    from unembed.data.scenes import write_scenes

    work = Path(args.work)
    if not (work / "scenes" / "test" / "captions.json").is_file():
        write_scenes(work / "scenes", n=8, n_eval=100, seed=3)
    hundred = sorted(str(p) for p in (work / "scenes" / "test" / "images").glob("*.png"))[:100]
    one = [str(ROOT / "examples" / "scene-0.png")]
    trees = {"this tree": ROOT, **({"against": Path(args.against)} if args.against else {})}
    result = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(), "runs": {}}
    times = {(name, label): [] for name in trees for label in ("1 image", "100 images")}
    captions = {}
    for _ in range(5):  # the trees take turns, so a slow moment of the machine hits both alike
        for name, tree in trees.items():
            for label, files in (("1 image", one), ("100 images", hundred)):
                seconds, captions[name, label] = caption(tree, files, work / "out.jsonl")
                times[name, label].append(seconds)
    for name, tree in trees.items():
        row = {"tree": recorded_path(tree)}
        for label in ("1 image", "100 images"):
            row[f"{label} seconds"] = round(statistics.median(times[name, label]), 2)
            row[f"{label} seconds, all runs"] = [round(t, 2) for t in times[name, label]]
            row[f"{label} captions"] = captions[name, label]
        row["largest imports (s)"] = import_costs(tree, one[0])
        result["runs"][name] = row
        print(name, json.dumps({k: v for k, v in row.items() if "captions" not in k}), flush=True)
    if args.against:
        a, b = result["runs"]["this tree"], result["runs"]["against"]
        for label in ("1 image", "100 images"):
            assert a[f"{label} captions"] == b[f"{label} captions"], f"{label}: the two trees caption differently"
            result[f"{label} speedup"] = round(b[f"{label} seconds"] / a[f"{label} seconds"], 2)
    shutil.rmtree(work / "out.jsonl", ignore_errors=True)
    from unembed.io import write_json

    write_json(args.out, result)


if __name__ == "__main__":
    main()
