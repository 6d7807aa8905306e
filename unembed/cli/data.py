"""`unembed data`: make datasets."""
from __future__ import annotations

import time

from unembed.cli.common import EXIT_OK, EXIT_PARTIAL, err, log


def cmd_data_scenes(args) -> int:
    from unembed.data.scenes import write_scenes

    t0 = time.time()
    counts = write_scenes(args.out, n=args.n, seed=args.seed, n_eval=args.n_eval, image_size=args.image_size,
                          text_only=args.text_only)
    log(f"wrote scenes to {args.out} in {time.time() - t0:.1f}s: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return EXIT_OK


def cmd_data_import(args) -> int:
    from unembed.data.importers import import_dataset

    t0 = time.time()
    report = import_dataset(args.format, args.annotations, args.out, images=args.images, split=args.split,
                            image_column=args.image_column, caption_column=args.caption_column)
    for what in report.examples:
        err(f"skipped {what}")
    if report.skipped > len(report.examples):
        err(f"... {report.skipped - len(report.examples)} more rows skipped")
    log(f"imported {args.format} into {args.out} in {time.time() - t0:.1f}s: "
        + ", ".join(f"{name} {n['images']} images / {n['captions']} captions" for name, n in report.splits.items())
        + (f"; skipped {report.skipped} bad rows" if report.skipped else ""))
    return EXIT_PARTIAL if report.skipped else EXIT_OK


def register(sub) -> None:
    p = sub.add_parser("data", help="make datasets")
    data = p.add_subparsers(dest="what", required=True)
    d = data.add_parser("scenes", help="the procedural scenes world (offline stand-in for COCO)")
    d.add_argument("--out", required=True)
    d.add_argument("--n", type=int, default=20000, help="training images")
    d.add_argument("--n-eval", type=int, help="images in each of val, test, compositional (default n/20)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--image-size", type=int, default=64)
    d.add_argument("--text-only", action="store_true", help="captions and scene descriptions only, no images")
    d.set_defaults(func=cmd_data_scenes)
    d = data.add_parser("import", help="a dataset in its own layout (Karpathy, COCO, NoCaps, datasets, CSV) "
                        "written as the layout every command reads (images linked, not copied)")
    d.add_argument("--format", required=True, choices=["karpathy", "coco", "nocaps", "hf", "csv"],
                   help="the annotations' format: Karpathy's dataset_coco.json, COCO captions, NoCaps, a Hugging Face "
                   "datasets directory, or a CSV of image,caption")
    d.add_argument("--annotations", required=True, help="the annotation file (a save_to_disk directory for hf)")
    d.add_argument("--images", help="the image folder (default: beside the annotations; Karpathy COCO: the folder "
                   "holding train2014/ and val2014/)")
    d.add_argument("--out", required=True)
    d.add_argument("--split", help="the split name for a one-split file (default: from the file name, or train)")
    d.add_argument("--image-column", default="image", help="hf: the image column")
    d.add_argument("--caption-column", default="caption", help="hf: the caption column")
    d.set_defaults(func=cmd_data_import)
