"""Images per second of the embedding pass with image decoding and preprocessing in the main process
(--workers 0) and in 2 DataLoader workers (--workers 2), side by side:
- the scenes embedder (the bundle's) on 2,000 scenes images (64 x 64 PNG);
- open_clip ViT-B-32 with random weights on 500 JPEG photos of 640 x 480, generated here.
For each, the loading alone (decode + preprocess, no model) and the model alone (preprocessed pixels)
are timed too: the larger of the two says what bounds the pass. Every timed pass is checked: the
vectors of --workers 2 and of the model alone (on the pixels the loading-alone pass made) equal
those of --workers 0, bit for bit, on every image. The 1-minute load average is recorded at the start
and the end (other jobs on the machine slow every pass), with a note when it is above 1.5.

    python benchmarks/embed_workers.py --out benchmarks/results/embed_workers_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from machine_load import load_average, load_record


def photos(folder: Path, n: int) -> list[str]:
    """n 640 x 480 JPEG 'photos': smooth colour fields with noise (JPEG decoding cost is what matters)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        path = folder / f"photo-{i:04d}.jpg"
        if not path.is_file():
            y, x = np.mgrid[0:480, 0:640]
            base = np.stack([np.sin(x / rng.uniform(20, 90) + c) * 90 + np.cos(y / rng.uniform(20, 90)) * 60 + 128
                             for c in range(3)], axis=-1)
            image = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype("uint8")
            Image.fromarray(image).save(path, quality=90)
        files.append(str(path))
    return files


def measure(embedder, files: list[str], batch_size: int) -> dict:
    from unembed.pipeline import iter_pixel_batches

    row, vectors = {"images": len(files)}, {}
    for workers in (0, 2):
        t0 = time.perf_counter()
        parts = [embedder.embed_pixels(px, p).vectors
                 for p, px in iter_pixel_batches(files, batch_size, embedder.preprocess, workers=workers)]
        seconds = time.perf_counter() - t0
        vectors[workers] = torch.cat(parts)
        row[f"images_per_s_workers_{workers}"] = round(len(files) / seconds, 1)
    assert torch.equal(vectors[0], vectors[2]), "workers changed the vectors"
    t0 = time.perf_counter()
    pixels = [px for _, px in iter_pixel_batches(files, batch_size, embedder.preprocess)]
    row["loading_only_images_per_s"] = round(len(files) / (time.perf_counter() - t0), 1)
    t0 = time.perf_counter()
    model_only = [embedder.embed_pixels(px, [""] * len(px)).vectors for px in pixels]
    row["model_only_images_per_s"] = round(len(files) / (time.perf_counter() - t0), 1)
    assert torch.equal(torch.cat(model_only), vectors[0]), "the model alone gave other vectors than the pass"
    row["images_checked"] = len(files)
    row["same_vectors"] = True
    row["bound_by"] = "decoding" if row["loading_only_images_per_s"] < row["model_only_images_per_s"] else "the model"
    row["speedup_workers_2"] = round(row["images_per_s_workers_2"] / row["images_per_s_workers_0"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/embed_workers_cpu.json")
    parser.add_argument("--work", default="bench-run/embed-workers")
    parser.add_argument("--scenes", type=int, default=2000)
    parser.add_argument("--photos", type=int, default=500)
    args = parser.parse_args()
    from unembed.data.scenes import write_scenes
    from unembed.embedders import Embedder, load_embedder

    work = Path(args.work)
    scenes = work / "scenes"
    if not (scenes / "test" / "captions.json").is_file():
        write_scenes(scenes, n=8, n_eval=args.scenes, seed=1)
    scene_files = sorted(str(p) for p in (scenes / "test" / "images").glob("*.png"))[:args.scenes]
    bundle = Path(__file__).resolve().parents[1] / "unembed" / "bundle" / "embedder"
    load_start = load_average()
    result = {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
              "torch": torch.__version__,
              "checked": "every image of every timed pass: --workers 2 and the model alone give vectors equal "
                         "(torch.equal) to --workers 0's", "runs": {}}
    result["runs"]["scenes embedder, 64x64 PNG"] = measure(load_embedder(str(bundle), "cpu"), scene_files, 128)
    print(json.dumps(result["runs"]), flush=True)
    torch.manual_seed(0)
    result["runs"]["ViT-B-32 (random weights), 640x480 JPEG"] = measure(
        Embedder.from_spec("ViT-B-32", "cpu"), photos(work / "photos", args.photos), 64)
    print(json.dumps(result["runs"]), flush=True)
    result.update(load_record(load_start, load_average(), interleaved=False))
    from unembed.io import write_json

    write_json(args.out, result)


if __name__ == "__main__":
    main()
