"""Caption corpora from the formats users have: plain text (one caption a line), JSON / JSON Lines
(strings or records with a "caption" or "text" field), COCO caption annotation files, and
`datasets` directories saved with save_to_disk."""
from __future__ import annotations

import json
from pathlib import Path

from unembed.errors import BadInputError
from unembed.io import read_json

TEXT_FIELDS = ("caption", "text")


def indefinite_article(word: str) -> str:
    """"an" before a word that starts with a vowel letter, else "a" (by spelling: scene and colour words
    have no "an hour" or "a unicorn")."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def _record_text(record, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for key in TEXT_FIELDS:
            if isinstance(record.get(key), str):
                return record[key]
    raise BadInputError(where, 'expected a string or a record with a "caption" or "text" string')


def _from_json(obj, path: Path) -> list[str]:
    if isinstance(obj, dict) and isinstance(obj.get("annotations"), list):
        obj = obj["annotations"]
    if not isinstance(obj, list):
        raise BadInputError(path, "expected a list of captions or a COCO annotation file")
    return [_record_text(r, f"{path} record {i}") for i, r in enumerate(obj)]


def _from_jsonl(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    texts.append(_record_text(json.loads(line), f"{path} line {n}"))
                except json.JSONDecodeError as e:
                    raise BadInputError(f"{path} line {n}", f"malformed JSON ({e.msg})") from None
    return texts


def _from_dataset_dir(path: Path) -> list[str]:
    from datasets import load_from_disk

    ds = load_from_disk(str(path))
    if hasattr(ds, "keys"):  # a DatasetDict: take its train split, or its only one
        ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
    for key in TEXT_FIELDS:
        if key in ds.column_names:
            return [str(t) for t in ds[key]]
    raise BadInputError(path, f"dataset has no 'caption' or 'text' column (columns: {ds.column_names})")


def load_captions(path) -> list[str]:
    """All non-empty captions of a corpus file, whitespace-normalised, in file order."""
    path = Path(path)
    try:
        if path.is_dir():
            texts = _from_dataset_dir(path)
        elif path.suffix == ".json":
            texts = _from_json(read_json(path), path)
        elif path.suffix == ".jsonl":
            texts = _from_jsonl(path)
        else:
            texts = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise BadInputError(path, "is not UTF-8 text") from None
    except OSError as e:
        raise BadInputError(path, f"cannot read ({e.strerror or e})") from None
    texts = [" ".join(t.split()) for t in texts]
    texts = [t for t in texts if t]
    if not texts:
        raise BadInputError(path, "holds no captions")
    return texts


def caption_corpus(caption_files=(), data_dir=None) -> tuple[list[str], list[str] | None]:
    """Training captions from corpus files and DATA/train, and validation captions from DATA/val
    (None when there is none): what every text-trained model reads."""
    from unembed.data.splits import has_split, split_captions

    captions = [c for path in caption_files for c in load_captions(path)]
    validation = None
    if data_dir:
        captions += split_captions(Path(data_dir) / "train")
        if has_split(data_dir, "val"):
            validation = split_captions(Path(data_dir) / "val")
    return captions, validation
