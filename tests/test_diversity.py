"""Diversity in every score: unique-caption share, vocabulary, mean length, novel share, and a warning
when one caption covers most images (open_clip #797/#751: fine-tuned CoCa giving one caption for all)."""
import json
from pathlib import Path

from unembed.eval.diversity import diversity, diversity_cells, same_caption_warning


def test_scores_count_what_they_say():
    d = diversity(["A red square.", "a red  square", "a blue circle", "two green dogs"], training=["a blue circle"])
    assert d["unique_share"] == 3 / 4  # case, spaces and the final stop do not make a caption new
    assert d["vocabulary"] == 8  # a red square blue circle two green dogs
    assert d["mean_words"] == 3.0
    assert d["novel_share"] == 3 / 4
    assert (d["top_caption"], d["top_share"]) == ("a red square", 2 / 4)
    assert same_caption_warning("x", d) is None  # half is not more than half
    assert diversity(["a"], None)["novel_share"] is None
    assert diversity_cells(d) == ["75", "8", "3.0", "75"]


def test_one_caption_for_most_images_is_warned_about():
    d = diversity(["a cat"] * 3 + ["a dog"])
    assert same_caption_warning("coca", d) == ("warning: coca gives 75% of the images the same caption ('a cat'): "
                                               "its scores describe one sentence, not the images")


def test_eval_reports_diversity_and_warns(tmp_path, capsys):
    from unembed.cli import main

    refs = {"images": [{"id": i, "file_name": f"{i}.png"} for i in range(4)],
            "annotations": [{"image_id": i, "id": i, "caption": c} for i, c in
                            enumerate(["a red square", "a blue circle", "a green dog", "a cat"])]}
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    (tmp_path / "train.txt").write_text("a red square\n")
    results = [{"image_id": i, "caption": "a red square"} for i in range(3)] + [{"image_id": 3, "caption": "a cat"}]
    (tmp_path / "results.json").write_text(json.dumps(results))
    code = main(["eval", "--results", str(tmp_path / "results.json"), "--refs", str(tmp_path / "refs.json"),
                 "--no-spice", "--no-meteor", "--train-captions", str(tmp_path / "train.txt"),
                 "--out", str(tmp_path / "scores.json")])
    err = capsys.readouterr().err
    assert code == 0
    assert "diversity: 50% unique captions, 4 distinct words, 2.8 words per caption, 25% not in the training captions" in err
    assert "warning: results gives 75% of the images the same caption ('a red square')" in err
    saved = json.loads(Path(tmp_path / "scores.json").read_text())["scores"]["diversity"]
    assert saved["unique_share"] == 0.5 and saved["novel_share"] == 0.25
