"""The one reader of dataset splits. A dataset directory holds splits (train/, val/, test/, ...);
a split is a directory with SPLIT_FILE (COCO caption format: images[] with file_name, annotations[]
with image_id and caption) and its images. Every command reads splits through these functions, and
every dataset importer writes this layout, so a new format plugs in at one point.

A split's image embeddings are computed once per embedder and cached beside it, so training,
validation, captioning and comparison share one embedding pass."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from unembed.errors import BadInputError
from unembed.io import read_json

CACHE_DIR = ".unembed-cache"
SPLIT_FILE = "captions.json"  # written last by every writer: its presence marks a finished split


def split_file(split_dir) -> Path:
    return Path(split_dir) / SPLIT_FILE


def has_split(data_dir, name: str) -> bool:
    """Whether DATA/<name> is a finished split."""
    return split_file(Path(data_dir) / name).is_file()


def split_dirs(data_dir) -> list[Path]:
    """Every finished split of a dataset directory, by name."""
    return sorted(p.parent for p in Path(data_dir).glob(f"*/{SPLIT_FILE}"))


def load_split(split_dir) -> tuple[list[Path], list[list[str]], list[int]]:
    """(image paths, their captions, image ids) of a COCO caption split directory."""
    split_dir = Path(split_dir)
    coco = read_json(split_file(split_dir))
    captions: dict[int, list[str]] = {}
    for ann in coco.get("annotations", []):
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    images = [im for im in coco.get("images", []) if im["id"] in captions and im.get("file_name")]
    if not images:
        raise BadInputError(split_file(split_dir), "has no images with captions")
    return ([split_dir / im["file_name"] for im in images], [captions[im["id"]] for im in images],
            [im["id"] for im in images])


def split_captions(split_dir) -> list[str]:
    """Every caption of a split, images or not (text-only splits have no image files)."""
    coco = read_json(split_file(split_dir))
    return [ann["caption"] for ann in coco.get("annotations", [])]


def image_domains(captions_file) -> dict:
    """{image_id: domain} of a split whose images carry one (NoCaps: in-domain, near-domain,
    out-domain); empty for other datasets."""
    coco = read_json(captions_file)
    images = coco.get("images", []) if isinstance(coco, dict) else []
    return {im["id"]: im["domain"] for im in images if isinstance(im, dict) and "domain" in im and "id" in im}


def split_cache(split_dir, embedder_id: str, with_tokens: bool = False) -> Path:
    """Where embed_split keeps a split's embeddings by one embedder."""
    return Path(split_dir) / CACHE_DIR / f"{embedder_id}{'-tokens' if with_tokens else ''}.safetensors"


def split_fingerprint(split_dir) -> str:
    """What a split holds, cheaply: the size and modification time of captions.json and of every image
    it lists. Rewriting the split (another seed, another dataset) changes it; reading does not."""
    split_dir = Path(split_dir)
    digest = hashlib.sha256()
    names = [split_file(split_dir)]
    try:
        names += load_split(split_dir)[0]
    except BadInputError:  # a text-only split: its captions are all it holds
        pass
    for path in names:
        try:
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        except OSError:
            digest.update(f"{path}\0missing\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:20]
