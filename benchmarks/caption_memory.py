"""Peak memory of `unembed caption`: over folders of 1,000 and 10,000 images, written as JSON Lines
and as one COCO results array (`--format coco`, streamed), and over files of 10,000 and 100,000
embedding vectors (`--embeddings`, read in slices). Captioning streams one batch at a time, so the
peak should not grow with the input (only the list of file names or ids does).

Each run is a separate `unembed caption ... --decoder D --out F` process, its resident memory
sampled every 50 ms (psutil). The embedder is the scenes architecture with random weights and the
decoder the retrieval baseline over the training captions: memory does not depend on weight values.

Every run is checked, item for item: it exits 0 and captions every input; the JSON Lines and COCO
files of a folder give each image the same caption, and the smaller folder's images get the captions
the larger folder's run gave them (streaming in batches changes no output). The 1-minute load
average is recorded at the start and the end, with a note when it is above 1.5 (other jobs on the
machine slow the runs; they do not change their memory).

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
from machine_load import load_average, load_record


def _anonymous_kb(pid: int) -> int:
    """RssAnon: resident memory that is the process's own, not pages of files it maps (safetensors
    reads an embeddings file through mmap; those pages count in RSS but the kernel can drop them)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


def peak_rss_mb(command: list[str]) -> tuple[float, float, float, int]:
    """(peak resident MB, peak anonymous resident MB, seconds, exit code) of a command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watched, peak, anonymous = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
            anonymous = max(anonymous, _anonymous_kb(proc.pid))
        except (psutil.NoSuchProcess, FileNotFoundError, StopIteration):
            break
        time.sleep(0.05)
    code = proc.wait()  # the process may have ended between a poll and a read
    return peak / 2**20, anonymous / 2**10, time.perf_counter() - t0, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="image folder sizes")
    parser.add_argument("--vector-sizes", default="10000,100000", help="embedding file sizes")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/caption_memory_cpu.json")
    args = parser.parse_args()
    load_start = load_average()
    sizes = [int(s) for s in args.sizes.split(",")]
    vector_sizes = [int(s) for s in args.vector_sizes.split(",")]

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
        runs, captions = [], {}

        def run(label: str, n: int, source: list[str], fmt: str) -> None:
            out = tmp / f"captions-{label}-{n}.{'json' if fmt == 'coco' else 'jsonl'}"
            mb, anonymous, seconds, code = peak_rss_mb([sys.executable, "-m", "unembed.cli", "caption", *source,
                                             "--decoder", str(tmp / "retrieval"), "--out", str(out), "--format", fmt,
                                             "--batch-size", str(args.batch_size), "--device", "cpu"])
            records = ((json.loads(out.read_text()) if fmt == "coco" else [json.loads(line) for line in out.open()])
                       if out.exists() else [])
            assert code == 0, f"unembed caption over {n} {label} ({fmt}) exited with {code}"
            by_id = {str(r["image_id"]): r["caption"] for r in records}
            assert len(records) == len(by_id) == n, f"{n} {label} ({fmt}): {len(records)} records, " \
                                                   f"{len(by_id)} distinct ids"
            captions[label, n, fmt] = by_id
            runs.append({"input": label, "items": n, "format": fmt, "captioned": len(records), "exit_code": code,
                         "peak_rss_mb": round(mb, 1), "peak_anonymous_mb": round(anonymous, 1),
                         "seconds": round(seconds, 1)})
            print(runs[-1], flush=True)

        for n in sizes:
            folder = tmp / f"folder-{n}"
            folder.mkdir()
            for p in images[:n]:
                (folder / p.name).symlink_to(p)
            for fmt in ("jsonl", "coco"):
                run("images", n, [str(folder)], fmt)
            assert captions["images", n, "jsonl"] == captions["images", n, "coco"], \
                f"JSON Lines and COCO captions of the {n}-image folder differ"
        largest = captions["images", max(sizes), "jsonl"]
        for n in sizes:
            differ = [i for i, c in captions["images", n, "jsonl"].items() if largest.get(i) != c]
            assert not differ, f"{len(differ)} images of the {n}-image folder got other captions at {max(sizes)}"
        from unembed.embedders import Embedded

        for n in vector_sizes:
            vectors = torch.nn.functional.normalize(torch.randn(n, embedder.dim), dim=-1)
            path = tmp / f"vectors-{n}.safetensors"
            Embedded(vectors, [str(i) for i in range(n)], embedder.id, str(tmp / "embedder"), "image").save(path)
            del vectors
            run("embeddings", n, ["--embeddings", str(path)], "jsonl")

    def growth(label: str, fmt: str, key: str = "peak_rss_mb") -> float:
        peaks = [r[key] for r in runs if r["input"] == label and r["format"] == fmt]
        return round(peaks[-1] - peaks[0], 1)

    result = {"benchmark": "caption_memory", "machine": platform.processor() or platform.machine(),
              "cpu_count": psutil.cpu_count(), "torch": torch.__version__, "batch_size": args.batch_size,
              "checked": "every run exits 0 and captions every input (distinct ids); JSON Lines and COCO give every "
                         "image of a folder the same caption; the smaller folder's images get the larger run's "
                         "captions", **load_record(load_start, load_average(), interleaved=False),
              "runs": runs, "peak_growth_mb": {"images jsonl": growth("images", "jsonl"),
                                               "images coco": growth("images", "coco"),
                                               "embeddings": growth("embeddings", "jsonl"),
                                               "embeddings, anonymous": growth("embeddings", "jsonl",
                                                                               "peak_anonymous_mb")}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
