"""Dataset importers: Karpathy, raw COCO, NoCaps, `datasets` and CSV/JSON Lines files, each written
by the test in exactly that format (from scenes images), imported into the layout every command
reads; bad rows skipped and named; NoCaps domains scored separately by eval and compare."""
import csv
import json
import shutil
from pathlib import Path

import pytest

from unembed.cli import EXIT_OK, EXIT_PARTIAL, main
from unembed.data.splits import has_split, image_domains, load_split


@pytest.fixture(scope="module")
def photos(scenes_dir, tmp_path_factory):
    """Scenes images and captions laid out as the originals would be: images in folders of their own."""
    root = tmp_path_factory.mktemp("originals")
    paths, captions, ids = load_split(scenes_dir / "test")
    for sub in ("train2014", "val2014"):
        (root / sub).mkdir()
    items = []
    for n, (path, caps, image_id) in enumerate(zip(paths, captions, ids)):
        sub = "train2014" if n % 2 else "val2014"
        name = f"COCO_{sub}_{image_id:012d}.png"
        shutil.copyfile(path, root / sub / name)
        items.append({"sub": sub, "name": name, "captions": caps, "id": 1000 + image_id})
    return root, items


def karpathy(photos, out: Path) -> Path:
    root, items = photos
    splits = ["train", "restval", "val", "test"]
    images = [{"filepath": it["sub"], "filename": it["name"], "cocoid": it["id"], "imgid": n,
               "split": splits[n % 4], "sentences": [{"raw": c, "tokens": c.split()} for c in it["captions"]]}
              for n, it in enumerate(items)]
    images[0]["sentences"].append({"raw": "   ", "tokens": []})  # an empty caption
    images.append(dict(images[1], filename="COCO_missing.png", cocoid=99999))  # a missing image
    out.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return out


def test_karpathy_restval_joins_train_and_bad_rows_are_named(photos, tmp_path, capsys):
    annotations = karpathy(photos, tmp_path / "dataset_coco.json")
    code = main(["data", "import", "--format", "karpathy", "--annotations", str(annotations), "--images",
                 str(photos[0]), "--out", str(tmp_path / "coco")])
    assert code == EXIT_PARTIAL
    err = capsys.readouterr().err
    assert "COCO_missing.png not found" in err and "an empty caption" in err and "skipped 2 bad rows" in err
    n = len(photos[1])
    sizes = {s: len(load_split(tmp_path / "coco" / s)[0]) for s in ("train", "val", "test")}
    assert sizes == {"train": len(range(0, n, 4)) + len(range(1, n, 4)), "val": len(range(2, n, 4)),
                     "test": len(range(3, n, 4))}
    paths, captions, ids = load_split(tmp_path / "coco" / "val")
    assert all(p.is_symlink() for p in paths)  # linked, not copied
    assert ids[0] == photos[1][2]["id"] and captions[0] == photos[1][2]["captions"]
    assert paths[0].name == f"{ids[0]}.png"  # captioning the folder gives records with matching ids


DOMAINS = ["in-domain", "near-domain", "out-domain"]


def nocaps_file(items) -> dict:
    """NoCaps' COCO-format file: each image with its domain, five captions each."""
    return {"images": [{"id": it["id"], "file_name": f"{it['sub']}/{it['name']}", "domain": DOMAINS[n % 3]}
                       for n, it in enumerate(items)],
            "annotations": [{"id": 10 * it["id"] + j, "image_id": it["id"], "caption": c}
                            for it in items for j, c in enumerate(it["captions"])]}


def test_raw_coco_and_nocaps_keep_ids_and_domains(photos, tmp_path, embedder_dir, retrieval_dir):
    root, items = photos
    domains, nocaps = DOMAINS, nocaps_file(items)
    (tmp_path / "nocaps_val_4500_captions.json").write_text(json.dumps(nocaps))
    assert main(["data", "import", "--format", "nocaps", "--annotations", str(tmp_path / "nocaps_val_4500_captions.json"),
                 "--images", str(root), "--out", str(tmp_path / "nocaps")]) == EXIT_OK
    assert has_split(tmp_path / "nocaps", "val")
    found = image_domains(tmp_path / "nocaps" / "val" / "captions.json")
    assert found == {it["id"]: domains[n % 3] for n, it in enumerate(items)}
    # compare runs on it and scores each domain apart
    out = tmp_path / "compare"
    assert main(["compare", "--data", str(tmp_path / "nocaps"), "--split", "val", "--embedder", str(embedder_dir),
                 "--decoders", f"retrieval={retrieval_dir}", "--out", str(out), "--no-spice", "--no-gap", "--no-meteor",
                 "--device", "cpu"]) == EXIT_OK
    row = json.loads((out / "compare.json").read_text())["decoders"][0]
    assert set(row["domains"]) == {"in-domain", "near-domain", "out-domain", "overall"}
    assert row["domains"]["overall"]["CIDEr"] == pytest.approx(row["metrics"]["CIDEr"])
    (tmp_path / "captions_train2014.json").write_text(json.dumps({k: v for k, v in nocaps.items()}))
    assert main(["data", "import", "--format", "coco", "--annotations", str(tmp_path / "captions_train2014.json"),
                 "--images", str(root), "--out", str(tmp_path / "raw")]) == EXIT_OK
    assert load_split(tmp_path / "raw" / "train")[2] == [it["id"] for it in items]


def test_nocaps_domains_are_scored_by_eval(photos, tmp_path, capsys):
    root, items = photos
    (tmp_path / "refs.json").write_text(json.dumps(nocaps_file(items)))
    # Perfect captions in-domain, wrong ones elsewhere: the domain rows must tell them apart.
    results = [{"image_id": it["id"], "caption": it["captions"][0] if n % 3 == 0 else "zzz qqq"}
               for n, it in enumerate(items)]
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main(["eval", "--results", str(tmp_path / "results.json"), "--refs", str(tmp_path / "refs.json"),
                 "--no-spice", "--out", str(tmp_path / "scores.json"), "--name", "run"]) == EXIT_OK
    table = capsys.readouterr().out
    assert "| run in-domain |" in table and "| run overall |" in table
    scores = json.loads((tmp_path / "scores.json").read_text())["scores"]["domains"]
    assert set(scores) == {"in-domain", "near-domain", "out-domain", "overall"}
    assert scores["in-domain"]["CIDEr"] > 1.0 > 0.01 > scores["out-domain"]["CIDEr"]


def test_csv_jsonl_and_datasets_import(photos, tmp_path, capsys):
    root, items = photos
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for it in items:
            for c in it["captions"][:2]:
                writer.writerow([f"{it['sub']}/{it['name']}", c])
        writer.writerow(["nowhere.png", "a caption of no image"])
    assert main(["data", "import", "--format", "csv", "--annotations", str(tmp_path / "pairs.csv"),
                 "--out", str(tmp_path / "from-csv"), "--images", str(root)]) == EXIT_PARTIAL
    assert "nowhere.png not found" in capsys.readouterr().err
    paths, captions, _ = load_split(tmp_path / "from-csv" / "train")
    assert len(paths) == len(items) and all(len(c) == 2 for c in captions)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"file": str(root / it["sub"] / it["name"]),
                                                              "text": it["captions"][0], "split": "test"}) + "\n"
                                                  for it in items))
    assert main(["data", "import", "--format", "csv", "--annotations", str(tmp_path / "pairs.jsonl"),
                 "--out", str(tmp_path / "from-jsonl")]) == EXIT_OK
    assert len(load_split(tmp_path / "from-jsonl" / "test")[0]) == len(items)

    from datasets import Dataset, DatasetDict, Features, Image, Sequence, Value
    from PIL import Image as PILImage

    rows = {"img": [PILImage.open(root / it["sub"] / it["name"]).convert("RGB") for it in items],
            "sentences": [it["captions"] for it in items]}
    features = Features({"img": Image(), "sentences": Sequence(Value("string"))})
    DatasetDict({"train": Dataset.from_dict(rows, features=features),
                 "validation": Dataset.from_dict(rows, features=features)}).save_to_disk(str(tmp_path / "hf"))
    assert main(["data", "import", "--format", "hf", "--annotations", str(tmp_path / "hf"), "--image-column", "img",
                 "--caption-column", "sentences", "--out", str(tmp_path / "from-hf")]) == EXIT_OK
    paths, captions, _ = load_split(tmp_path / "from-hf" / "val")
    assert len(paths) == len(items) and captions[0] == items[0]["captions"]
    assert main(["data", "import", "--format", "hf", "--annotations", str(tmp_path / "hf"),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "no column 'image'" in capsys.readouterr().err
