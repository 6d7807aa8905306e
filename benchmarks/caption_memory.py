"""Peak memory of `unembed caption` over folders of 1,000 and 10,000 images: captioning streams one
batch at a time, so the peak should not grow with the folder (only the list of file names does).

Each run is a separate `unembed caption FOLDER --decoder D --out F` process, its resident memory
sampled every 50 ms (psutil). The embedder is the scenes architecture with random weights and the
decoder the retrieval baseline over the training captions: memory does not depend on weight values.

    python benchmarks/caption_memory.py --out benchmarks/results/caption_memory_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch


def peak_rss_mb(command: list[str]) -> tuple[float, float, int]:
    """(peak resident MB, seconds, exit code) of a command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watched, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    return peak / 2**20, time.perf_counter() - t0, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/caption_memory_cpu.json")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    from unembed.data.splits import split_captions
    from unembed.data.scenes import write_scenes
    from unembed.decoders.retrieval import RetrievalDecoder
    from unembed.embedders import Embedder, scenes_config

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_scenes(tmp / "scenes", n=max(sizes), n_eval=10)
        torch.manual_seed(0)
        embedder = Embedder.from_config(scenes_config(), device="cpu")
        embedder.save(tmp / "embedder")
        RetrievalDecoder.build(embedder, split_captions(tmp / "scenes" / "train")).save(tmp / "retrieval")
        images = sorted((tmp / "scenes" / "train" / "images").glob("*.png"))
        runs = []
        for n in sizes:
            folder = tmp / f"folder-{n}"
            folder.mkdir()
            for p in images[:n]:
                (folder / p.name).symlink_to(p)
            out = tmp / f"captions-{n}.jsonl"
            mb, seconds, code = peak_rss_mb([sys.executable, "-m", "unembed.cli", "caption", str(folder),
                                             "--decoder", str(tmp / "retrieval"), "--out", str(out),
                                             "--batch-size", str(args.batch_size), "--device", "cpu"])
            lines = sum(1 for _ in out.open()) if out.exists() else 0
            runs.append({"images": n, "captioned": lines, "exit_code": code, "peak_rss_mb": round(mb, 1),
                         "seconds": round(seconds, 1)})
            print(runs[-1], flush=True)
    result = {"benchmark": "caption_memory", "machine": platform.processor() or platform.machine(),
              "cpu_count": psutil.cpu_count(), "torch": torch.__version__, "batch_size": args.batch_size,
              "runs": runs, "peak_growth_mb": round(runs[-1]["peak_rss_mb"] - runs[0]["peak_rss_mb"], 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
