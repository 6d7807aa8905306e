"""Dataset importers: the layouts real caption datasets come in, written as the one layout every
command reads (`splits.py`: DATA/<split>/captions.json + images/, images linked, never copied).

- karpathy: Karpathy's dataset_coco.json / dataset_flickr30k.json / dataset_flickr8k.json
  (images[].{filepath?, filename, split, sentences[].raw, cocoid?|imgid}); restval joins train,
  val and test stay as they are;
- coco: a raw COCO captions_*.json with its image folder (the split named by --split, or by the
  file: captions_train2014.json -> train, captions_val2014.json -> val);
- nocaps: NoCaps' nocaps_val_4500_captions.json; each image keeps its domain (in-domain,
  near-domain, out-domain), which eval and compare then score separately;
- hf: a `datasets` dataset saved with save_to_disk, with an image column (images or paths) and a
  caption column (a string or a list of strings); a DatasetDict's splits become splits;
- csv: a CSV or JSON Lines file of image path and caption (one row per caption; an optional
  split column).
Bad rows (a missing image, an empty caption) are skipped, counted, and the first few named.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from unembed.data.splits import SPLIT_FILE
from unembed.errors import BadInputError
from unembed.io import read_json, write_json

FORMATS = ("karpathy", "coco", "nocaps", "hf", "csv")
SPLIT_NAMES = {"restval": "train", "validation": "val", "valid": "val", "dev": "val"}
NAMED_SKIPS = 5


@dataclass
class Item:
    """One image of a split: where it is (a file, or an image object to write), its id and captions."""

    image_id: int | str
    captions: list[str]
    path: Path | None = None
    image: object = None  # a PIL image held by a `datasets` row
    extra: dict = field(default_factory=dict)  # kept in images[] (NoCaps: domain)


@dataclass
class ImportReport:
    splits: dict = field(default_factory=dict)  # split -> {"images": n, "captions": n}
    skipped: int = 0
    examples: list = field(default_factory=list)

    def skip(self, what: str) -> None:
        self.skipped += 1
        if len(self.examples) < NAMED_SKIPS:
            self.examples.append(what)


def import_dataset(fmt: str, annotations, out, images=None, split: str | None = None,
                   image_column: str = "image", caption_column: str = "caption") -> ImportReport:
    """Read a dataset in `fmt` and write it under `out`; returns what was written and skipped."""
    if fmt not in FORMATS:
        raise BadInputError(fmt, f"is not a dataset format ({', '.join(FORMATS)})")
    annotations, report = Path(annotations), ImportReport()
    if not annotations.exists():
        raise BadInputError(annotations, "does not exist")
    images = Path(images) if images else None
    reader = {"karpathy": _karpathy, "coco": _coco, "nocaps": _coco, "csv": _table}.get(fmt)
    if fmt == "hf":
        splits = _hf(annotations, split, image_column, caption_column, report)
    else:
        splits = reader(annotations, images, split, report)
    if not any(splits.values()):
        raise BadInputError(annotations, f"holds no usable image-caption pairs ({report.skipped} rows skipped)")
    for name, items in splits.items():
        if items:
            report.splits[name] = write_split(Path(out) / name, items, {"imported_from": str(annotations),
                                                                          "format": fmt})
    return report


# --- the readers ----------------------------------------------------------------------------------

def _clean(captions, report: ImportReport, where: str) -> list[str]:
    kept = [" ".join(str(c).split()) for c in captions if isinstance(c, str) and c.strip()]
    for _ in range(len(captions) - len(kept)):
        report.skip(f"{where}: an empty caption")
    return kept


def _found(path: Path, report: ImportReport, where: str) -> bool:
    if path.is_file():
        return True
    report.skip(f"{where}: image {path} not found")
    return False


def _karpathy(annotations: Path, images: Path | None, split, report) -> dict[str, list[Item]]:
    data = read_json(annotations)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise BadInputError(annotations, 'is not a Karpathy split file (an object with an "images" list)')
    root = images or annotations.parent
    splits: dict[str, list[Item]] = {}
    for n, im in enumerate(data["images"]):
        where = f"{annotations.name} image {n}"
        try:
            name = SPLIT_NAMES.get(im["split"], im["split"])
            path = root / im.get("filepath", "") / im["filename"]
            image_id = im.get("cocoid", im.get("imgid", n))
            captions = [s.get("raw", " ".join(s.get("tokens", []))) for s in im["sentences"]]
        except (KeyError, TypeError, AttributeError):
            report.skip(f"{where}: not a Karpathy image record")
            continue
        captions = _clean(captions, report, where)
        if captions and _found(path, report, where):
            splits.setdefault(split or name, []).append(Item(image_id, captions, path))
    return splits


def _coco(annotations: Path, images: Path | None, split, report) -> dict[str, list[Item]]:
    """Raw COCO captions and NoCaps (COCO format with images[].domain)."""
    data = read_json(annotations)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list) or not isinstance(
            data.get("images"), list):
        raise BadInputError(annotations, 'is not a COCO caption file (an object with "images" and "annotations")')
    root = images or annotations.parent
    captions: dict = {}
    for ann in data["annotations"]:
        if isinstance(ann, dict) and "image_id" in ann:
            captions.setdefault(ann["image_id"], []).append(ann.get("caption"))
    items = []
    for n, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            report.skip(f"{annotations.name} image {n}: not a COCO image record")
            continue
        where = f"{annotations.name} image {im['id']}"
        kept = _clean(captions.get(im["id"], []), report, where)
        if not kept:
            report.skip(f"{where}: no captions")
        elif _found(root / im["file_name"], report, where):
            extra = {"domain": im["domain"]} if "domain" in im else {}
            items.append(Item(im["id"], kept, root / im["file_name"], extra=extra))
    return {split or _split_from_name(annotations.name): items}


def _split_from_name(name: str) -> str:
    for key, split in (("train", "train"), ("val", "val"), ("test", "test")):
        if key in name:
            return split
    return "test"


def _table(annotations: Path, images: Path | None, split, report) -> dict[str, list[Item]]:
    """CSV (header with image/file/path and caption/text columns) or JSON Lines records alike."""
    if annotations.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(annotations.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    rows.append({"_bad": f"line {n}"})
    else:
        with open(annotations, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    root = images or annotations.parent
    grouped: dict[tuple, Item] = {}
    for n, row in enumerate(rows, 1):
        where = f"{annotations.name} row {n}"
        file = next((row.get(k) for k in ("image", "file", "file_name", "path", "filepath") if row.get(k)), None)
        caption = next((row.get(k) for k in ("caption", "text") if isinstance(row.get(k), str)), "")
        if not file:
            report.skip(f"{where}: no image path")
            continue
        if not caption.strip():
            report.skip(f"{where}: an empty caption")
            continue
        path = root / file
        name = SPLIT_NAMES.get(row.get("split") or "", row.get("split") or split or "train")
        key = (name, str(path))
        if key not in grouped:
            if not _found(path, report, where):
                continue
            grouped[key] = Item(len(grouped), [], path)
        grouped[key].captions.append(" ".join(caption.split()))
    splits: dict[str, list[Item]] = {}
    for (name, _), item in grouped.items():
        splits.setdefault(name, []).append(item)
    return splits


def _hf(directory: Path, split, image_column: str, caption_column: str, report) -> dict[str, list[Item]]:
    from datasets import load_from_disk

    try:
        loaded = load_from_disk(str(directory))
    except (FileNotFoundError, ValueError) as e:
        raise BadInputError(directory, f"is not a dataset saved with save_to_disk ({e})") from None
    parts = dict(loaded) if hasattr(loaded, "keys") else {split or "train": loaded}
    splits: dict[str, list[Item]] = {}
    for name, ds in parts.items():
        for column in (image_column, caption_column):
            if column not in ds.column_names:
                raise BadInputError(directory, f"split {name!r} has no column {column!r} (columns: {ds.column_names}); "
                                    "name them with --image-column / --caption-column")
        items = []
        for n, row in enumerate(ds):
            where = f"{directory.name}/{name} row {n}"
            value = row[caption_column]
            captions = _clean(value if isinstance(value, list) else [value], report, where)
            image = row[image_column]
            if not captions:
                continue
            if isinstance(image, str):
                if _found(Path(image), report, where):
                    items.append(Item(n, captions, Path(image)))
            elif image is None:
                report.skip(f"{where}: no image")
            else:
                items.append(Item(n, captions, image=image))
        splits[SPLIT_NAMES.get(name, name)] = items
    return splits


# --- the writer -----------------------------------------------------------------------------------

def write_split(split_dir: Path, items: list[Item], info: dict) -> dict:
    """images/ (symlinks to the originals; images held in memory are written as PNG) and
    captions.json, written last."""
    folder = split_dir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations, used = [], [], set()
    for item in items:
        name = _file_name(item, used)
        target = folder / name
        if item.path is not None:
            if target.is_symlink() or target.exists():
                target.unlink()
            target.symlink_to(item.path.resolve())
        else:
            item.image.convert("RGB").save(target, format="PNG")
        images.append({"id": item.image_id, "file_name": f"images/{name}", **item.extra})
        annotations += [{"id": len(annotations) + j, "image_id": item.image_id, "caption": c}
                        for j, c in enumerate(item.captions)]
    write_json(split_dir / SPLIT_FILE, {"info": info, "images": images, "annotations": annotations})
    return {"images": len(images), "captions": len(annotations)}


def _file_name(item: Item, used: set) -> str:
    """The image id as the file name, with the original's extension: `unembed caption DIR/images`
    names each record by that stem, which `eval` (or `caption --refs`) maps to the id through
    captions.json's file_name (data/ids.py)."""
    suffix = item.path.suffix.lower() if item.path is not None else ".png"
    name = re.sub(r"[^\w.\-]", "_", f"{item.image_id}{suffix}")
    if name in used:
        raise BadInputError(name, "two images of one split have the same id")
    used.add(name)
    return name
