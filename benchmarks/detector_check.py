"""ViECap's detector check (ViECapDecoder.check_on_val) for the shipped viecap on the main scenes world's
val split: the precision that decides whether a viecap trained with the bundle's embedder names
entities. entity_merge_small.py records the same check in the small world (its `detection_check`).

    python benchmarks/detector_check.py --data bench-run/loop/scenes
"""
from __future__ import annotations

import argparse
from pathlib import Path

from loop_scenes import BUNDLE, unembed, write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="bench-run/loop/scenes", help="the main world (made if missing)")
    parser.add_argument("--out", default="benchmarks/results/detector_check.json")
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "train" / "captions.json").is_file():
        unembed("data", "scenes", "--out", str(data), "--n", "20000", "--seed", "0")

    from unembed.decoders import load_decoder
    from unembed.embedders import load_embedder
    from unembed.training.prefix import validation_set

    embedder = load_embedder(str(BUNDLE / "embedder"), "cpu")
    decoder = load_decoder(BUNDLE / "viecap", device="cpu", embedder=embedder)
    validation = validation_set(embedder, data)
    warning = decoder.check_on_val(validation)
    cfg = decoder.config
    write(args.out, {"decoder": "the shipped viecap (unembed/bundle/viecap)", "data": "scenes world, seed 0, val split",
                     "val_images": len(validation[0]), "entity_merge": cfg.entity_merge,
                     "min_precision": cfg.entity_min_precision, "val_precision": cfg.entity_val_precision,
                     "threshold": decoder.detection_threshold(), "warning": warning})
    print(cfg.entity_val_precision, decoder.detection_threshold())


if __name__ == "__main__":
    main()
