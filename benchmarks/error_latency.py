"""How fast a mistake is reported: the wall time from starting `unembed ...` to its exit, for the
mistakes a new user makes first, each run 5 times in a fresh process (the median is kept), with the
exit code and the one error line checked for each. Goal: every one within 2 s (issue: inputs,
names and required options are checked before any model loads). `python -c "import torch"` is timed
beside them, as the floor of anything that loads a model.

    python benchmarks/error_latency.py --out benchmarks/results/error_latency_cpu.json
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 2.0

# (what, argv after `unembed`, exit code, the last stderr line as a prefix)
MISTAKES = [
    ("missing image file", ["caption", "no-such-photo.jpg"], 2, "unembed: no image to caption"),
    ("empty folder", ["caption", "empty/"], 2, "unembed: no image to caption"),
    ("train capdec without data", ["train", "capdec", "--embedder", "ViT-B-32:openai", "--out", "m"], 2,
     "unembed: capdec: needs captions"),
    ("train capdec, missing --data", ["train", "capdec", "--embedder", "ViT-B-32:openai", "--out", "m",
                                      "--data", "no-such-data"], 2, "unembed: no-such-data: no such data directory"),
    ("unknown command", ["captoin", "x.png"], 2, "unembed: unknown command 'captoin'"),
    ("unknown decoder name", ["caption", str(ROOT / "examples" / "scene-0.png"), "--decoder", "clipcpa"], 2,
     "unembed: decoder 'clipcpa'"),
    ("option the decoder does not take", ["caption", str(ROOT / "examples" / "scene-0.png"), "--decoder",
                                          "retrieval", "--num-beams", "3"], 2, "unembed: option num_beams"),
]


def run(argv: list[str], cwd: Path) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - t0, done.returncode, (done.stderr.strip().splitlines() or [""])[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/error_latency_cpu.json")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    result = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
              "load_average_start": os.getloadavg()[0], "goal_seconds": GOAL_S, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "empty").mkdir()
        floor = [run([sys.executable, "-c", "import torch"], cwd)[0] for _ in range(args.repeats)]
        result["import_torch_seconds"] = round(statistics.median(floor), 2)
        for what, argv, code, line in MISTAKES:
            times = []
            for _ in range(args.repeats):
                seconds, rc, last = run([sys.executable, "-m", "unembed.cli", *argv], cwd)
                assert rc == code and last.startswith(line), f"{what}: exit {rc}, {last!r}"
                times.append(seconds)
            row = {"mistake": what, "command": "unembed " + " ".join(Path(a).name if a.startswith("/") else a
                                                                      for a in argv),
                   "exit": code, "error": last, "seconds": round(statistics.median(times), 2),
                   "within_goal": statistics.median(times) <= GOAL_S}
            result["runs"].append(row)
            print(row, flush=True)
    result["load_average_end"] = os.getloadavg()[0]
    result["all_within_goal"] = all(r["within_goal"] for r in result["runs"])
    sys.path.insert(0, str(ROOT))
    from unembed.io import write_json

    write_json(args.out, result)


if __name__ == "__main__":
    main()
