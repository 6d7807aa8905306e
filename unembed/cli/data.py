"""`unembed data`: make datasets."""
from __future__ import annotations

import time

from unembed.cli.common import EXIT_OK, log


def cmd_data_scenes(args) -> int:
    from unembed.data.scenes import write_scenes

    t0 = time.time()
    counts = write_scenes(args.out, n=args.n, seed=args.seed, n_eval=args.n_eval, image_size=args.image_size,
                          text_only=args.text_only)
    log(f"wrote scenes to {args.out} in {time.time() - t0:.1f}s: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return EXIT_OK


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
