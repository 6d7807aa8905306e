"""`unembed models`: the names `--decoder` takes: pretrained models (downloaded from the Hugging Face
hub and converted on first use, then cached: unembed/zoo.py) and the bundle's decoders."""
from __future__ import annotations

import json

from unembed.cli.common import EXIT_OK, log

COLUMNS = (("name", "NAME"), ("method", "METHOD"), ("embedder", "EMBEDDER"), ("lm", "LM"), ("source", "SOURCE"),
           ("size", "SIZE"), ("licence", "LICENCE"), ("published", "SCORES"), ("status", "STATUS"))


def cmd_models(args) -> int:
    from unembed import zoo

    if args.fetch:
        for name in args.fetch:
            print(zoo.prefetch(name))
        return EXIT_OK
    rows = zoo.listing()
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return EXIT_OK
    table = [{**r, "source": f"{r['repo']}/{r['file']}" if r["repo"] else r["from"],
              "lm": r["lm"].split(" (")[0] if r["lm"] else "-", "published": _scores(r["scores"]),
              "embedder": r["embedder"].removeprefix("hf-hub:"),
              "name": r["name"] + (" (default)" if r.get("default") else "")} for r in rows]
    widths = {key: max(len(title), *(len(str(r[key] or "-")) for r in table)) for key, title in COLUMNS}
    print("  ".join(title.ljust(widths[key]) for key, title in COLUMNS).rstrip())
    for r in table:
        print("  ".join(str(r[key] or "-").ljust(widths[key]) for key, _ in COLUMNS).rstrip())
    log("pretrained models download once into the Hugging Face cache and are converted into "
        f"{zoo.cache_root() / 'zoo'}; offline (HF_HUB_OFFLINE=1) they load from there. Also: any decoder "
        "directory, or hf-hub:ORG/NAME (a hub repo holding an unembed decoder). `unembed models --json` has "
        "the details (settings, training data, where the scores come from).")
    return EXIT_OK


def _scores(scores: dict) -> str:
    """The headline score (CIDEr where there is one) and where it was measured; --json has them all."""
    values = {k: v for k, v in scores.items() if k != "dataset" and isinstance(v, (int, float))}
    if not values:
        return ""
    metric = "CIDEr" if "CIDEr" in values else next(iter(values))
    return f"{metric} {values[metric]:g} ({scores['dataset']})"


def register(sub) -> None:
    p = sub.add_parser("models", help="list the decoders --decoder NAME names: pretrained ones (downloaded and "
                       "converted on first use, then cached) and the bundle's")
    p.add_argument("--json", action="store_true", help="every field, as JSON")
    p.add_argument("--fetch", nargs="+", metavar="NAME", help="download and convert these pretrained models now, "
                   "with their embedders (e.g. before going offline); prints each decoder directory")
    p.set_defaults(func=cmd_models)
