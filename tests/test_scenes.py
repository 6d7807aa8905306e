"""The scenes world: deterministic files, true captions, an honest checker, held-out pairs."""
import json

import numpy as np
import pytest
from PIL import Image

from unembed.data.scenes import (
    COLOUR_WORDS, HELDOUT_PAIRS, SHAPE_WORDS, SPLITS, Scene, SceneObject, caption_is_true, describe,
    generate_split, load_split, render, sample_scene, text_captions, write_scenes,
)

N_TRAIN, N_EVAL, SEED = 40, 12, 3


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    return out, write_scenes(out, n=N_TRAIN, seed=SEED, n_eval=N_EVAL)


def _files(split_dir):
    return {p.relative_to(split_dir).as_posix(): p.read_bytes() for p in sorted(split_dir.rglob("*")) if p.is_file()}


def _heldout_phrases():
    """Every way a caption could name a held-out pair, e.g. "violet star" or "orange hearts"."""
    return [f"{c} {s}" for colour, shape in HELDOUT_PAIRS
            for c in COLOUR_WORDS[colour] for s in SHAPE_WORDS[shape]]


def test_summary_counts(written):
    _, summary = written
    assert summary == {"train": N_TRAIN, "val": N_EVAL, "test": N_EVAL, "compositional": N_EVAL}


def test_same_seed_same_bytes_other_seed_differs(written, tmp_path):
    out, _ = written
    write_scenes(tmp_path / "again", n=N_TRAIN, seed=SEED, n_eval=N_EVAL)
    for split in SPLITS:
        first, second = _files(out / split), _files(tmp_path / "again" / split)
        assert first.keys() == second.keys() and first == second, split
    write_scenes(tmp_path / "other", n=N_TRAIN, seed=SEED + 1, n_eval=N_EVAL)
    other = _files(tmp_path / "other" / "train")
    assert other["captions.json"] != _files(out / "train")["captions.json"]


def test_first_items_do_not_depend_on_n():
    short = [(s, c) for s, c, _ in generate_split("val", 5, 0)]
    long = [(s, c) for s, c, _ in generate_split("val", 20, 0)][:5]
    assert short == long


def test_render_is_deterministic_and_sized():
    scene = sample_scene(np.random.default_rng(0))
    scene = Scene(scene.objects, "noisy")
    assert render(scene, seed=5).tobytes() == render(scene, seed=5).tobytes()
    assert render(scene, seed=5).tobytes() != render(scene, seed=6).tobytes()
    image = render(scene, image_size=96)
    assert image.mode == "RGB" and image.size == (96, 96)


def test_every_description_is_true():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = sample_scene(rng)
        captions = describe(scene, rng)
        assert len(captions) == 5 and len(set(captions)) == 5
        for caption in captions:
            assert caption == caption.lower() and 5 <= len(caption.split()) <= 15, caption
            assert caption_is_true(caption, scene), (caption, scene)


def test_checker_rejects_captions_of_other_scenes():
    rng = np.random.default_rng(1)
    verdicts = []
    for _ in range(300):
        scene, other = sample_scene(rng), sample_scene(rng)
        verdicts += [caption_is_true(c, other) for c in describe(scene, rng)]
    assert np.mean(verdicts) < 0.2


# small red circle top left, big blue square top middle, big red circle bottom right
SCENE = Scene([SceneObject("circle", "red", "small", 0, 0), SceneObject("square", "blue", "large", 0, 1),
               SceneObject("circle", "red", "large", 2, 2)], "noisy")


@pytest.mark.parametrize("caption", [
    "two red circles and a big blue square",
    "a picture of a red circle, a red circle and a blue square",
    "a small red circle to the left of a blue square",
    "a blue box with a tiny red disc to its left",
    "a blue square next to a red circle on a grainy background",
    "in the top left corner there is a little red circle",
    "there is a large red circle in the bottom right",
    "a red circle at the top and a blue square at the top",
    "one blue square and two red circles against a noisy background",
])
def test_true_captions_accepted(caption):
    assert caption_is_true(caption, SCENE)


@pytest.mark.parametrize("caption", [
    "a picture of a green circle and a blue square",  # wrong colour
    "a red triangle next to a blue square",  # wrong shape
    "three red circles and a blue square",  # wrong count
    "one red circle and a blue square",  # "one" is an exact count
    "a red circle, a red circle, a red circle and a blue square",  # needs three different circles
    "a red circle above a blue square",  # wrong relation: same row
    "a blue square to the left of a red circle",  # columns fit but rows are two apart
    "a red circle next to a red circle",  # the two circles are not adjacent
    "a large red circle in the top left corner",  # wrong size for that position
    "two red circles on the left",  # only one circle is on the left
    "a blue square on a plain background",  # wrong background
    "a purple star in the middle",  # absent object
    "a red circle is very nice",  # not in the grammar
    "",
])
def test_false_captions_rejected(caption):
    assert not caption_is_true(caption, SCENE)


def test_heldout_pairs_only_in_compositional(written):
    out, _ = written
    for split in SPLITS:
        records = load_split(out / split)
        annotations = json.loads((out / split / "captions.json").read_text())["annotations"]
        pairs = [{(o.colour, o.shape) for o in r["scene"].objects} for r in records]
        if split == "compositional":
            assert all(p & HELDOUT_PAIRS for p in pairs)
        else:
            assert not any(p & HELDOUT_PAIRS for p in pairs)
            assert not any(h in a["caption"] for a in annotations for h in _heldout_phrases())
    more = [s for s, _, _ in generate_split("train", 1000, 0)]
    assert not any((o.colour, o.shape) in HELDOUT_PAIRS for s in more for o in s.objects)
    assert not any(h in c for c in text_captions(1000, 0) for h in _heldout_phrases())


def test_coco_files(written):
    out, _ = written
    for split in SPLITS:
        coco = json.loads((out / split / "captions.json").read_text())
        assert coco["info"]["seed"] == SEED and coco["info"]["split"] == split
        ids = [im["id"] for im in coco["images"]]
        assert len(ids) == len(set(ids)) == (N_TRAIN if split == "train" else N_EVAL)
        per_image = {i: 0 for i in ids}
        for ann in coco["annotations"]:
            per_image[ann["image_id"]] += 1
        assert set(per_image.values()) == {5}
        assert len({a["id"] for a in coco["annotations"]}) == 5 * len(ids)
        for im in coco["images"]:
            with Image.open(out / split / im["file_name"]) as image:
                assert image.size == (im["width"], im["height"]) == (64, 64) and image.mode == "RGB"
        metadata = (out / split / "images" / "metadata.jsonl").read_text().splitlines()
        assert [json.loads(line)["image_id"] for line in metadata] == ids


def test_load_split_round_trips(written):
    out, _ = written
    records = load_split(out / "val")
    first_scene, _, _ = next(generate_split("val", 1, SEED))
    assert records[0]["scene"] == first_scene and records[0]["file_name"] == "images/000000.png"
    assert Scene.from_dict(first_scene.to_dict()) == first_scene


def test_imagefolder_loads_offline(written, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets  # a dependency: a broken install fails here, it is not a skip
    out, _ = written
    ds = datasets.load_dataset("imagefolder", data_dir=str(out / "train" / "images"), split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert len(ds) == N_TRAIN
    row = ds[0]
    assert row["image"].size == (64, 64) and len(row["captions"]) == 5
    coco = json.loads((out / "train" / "captions.json").read_text())
    first = [a["caption"] for a in coco["annotations"] if a["image_id"] == row["image_id"]]
    assert row["captions"] == first


def test_text_only_writes_no_images(written, tmp_path):
    out, _ = written
    write_scenes(tmp_path, n=N_TRAIN, seed=SEED, n_eval=N_EVAL, text_only=True)
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("images"))
    for split in SPLITS:
        coco = json.loads((tmp_path / split / "captions.json").read_text())
        full = json.loads((out / split / "captions.json").read_text())
        assert all("file_name" not in im for im in coco["images"])
        assert coco["annotations"] == full["annotations"]  # same captions as with images
        assert len(load_split(tmp_path / split)) == len(coco["images"])


def test_text_captions_deterministic():
    captions = text_captions(50, seed=7)
    assert captions == text_captions(50, seed=7) and len(captions) == 50
    assert captions[:10] == text_captions(10, seed=7)
