"""Caption corpora in every format a user may have, and clear errors for broken ones."""
import json

import pytest

from unembed.data.captions import load_captions
from unembed.errors import BadInputError

CAPTIONS = ["a red circle", "two  blue squares", "a green heart"]
EXPECTED = ["a red circle", "two blue squares", "a green heart"]


def test_formats(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(CAPTIONS) + "\n\n")
    (tmp_path / "c.json").write_text(json.dumps(CAPTIONS))
    (tmp_path / "records.json").write_text(json.dumps([{"caption": c} for c in CAPTIONS]))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": c}) for c in CAPTIONS))
    coco = {"images": [{"id": 1}], "annotations": [{"image_id": 1, "id": i, "caption": c} for i, c in enumerate(CAPTIONS)]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    for name in ("c.txt", "c.json", "records.json", "c.jsonl", "coco.json"):
        assert load_captions(tmp_path / name) == EXPECTED, name


def test_datasets_directory(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"caption": CAPTIONS}).save_to_disk(str(tmp_path / "ds"))
    assert load_captions(tmp_path / "ds") == EXPECTED


def test_broken_corpora_name_the_file(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "bad.json").write_text("[1, 2")
    (tmp_path / "wrong.json").write_text(json.dumps([{"url": "x"}]))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for name, message in (("empty.txt", "holds no captions"), ("bad.json", "malformed JSON"),
                          ("wrong.json", "record 0"), ("latin1.txt", "not UTF-8"), ("missing.txt", "cannot read")):
        with pytest.raises(BadInputError, match=message) as info:
            load_captions(tmp_path / name)
        assert name in str(info.value)
