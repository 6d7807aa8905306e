"""Recombined training captions (unembed/data/recombine.py, `unembed train KIND --recombine`): colour
words trade places, so a text-only decoder reads pairings its captions never have."""
import json
from collections import Counter

import pytest

from unembed.cli import EXIT_FAILED, EXIT_OK, main
from unembed.data.recombine import BUILTIN_CLASSES, recombined, word_classes
from unembed.errors import BadInputError

CAPTIONS = ["a red star beside a blue circle", "An orange heart.", "two green squares, and a red ring",
            "a plain background"]


def test_every_colour_word_is_drawn_from_the_colours_the_captions_use():
    copies = recombined(CAPTIONS, word_classes("colours"), 1.0, seed=0)
    assert len(copies) == 3  # one per caption with a colour word; "a plain background" has none
    assert copies != CAPTIONS[:3]  # (a copy may keep its colour: each is drawn from the whole class)
    used = {"red", "blue", "orange", "green"}
    for original, copy in zip(CAPTIONS, copies):
        before, after = original.split(), copy.split()
        assert len(before) == len(after)
        for old, new in zip(before, after):
            core = old.strip(",.").lower()
            if core in used:
                assert new.strip(",.").lower() in used
                assert new[len(new.rstrip(",.")):] == old[len(old.rstrip(",.")):]  # the punctuation stays
            elif core in ("a", "an"):
                assert new.lower() in ("a", "an")
            else:
                assert new == old


def test_recombination_writes_the_pairings_the_captions_never_have():
    copies = recombined(["a red star", "a blue heart", "an orange circle"], word_classes("colours"), 30.0, seed=1)
    pairs = Counter(" ".join(c.split()[1:]) for c in copies)
    assert {f"{colour} {shape}" for colour in ("red", "blue", "orange") for shape in ("star", "heart", "circle")} \
        == set(pairs)
    # the article fits the colour drawn; capitals and punctuation stay where they were
    assert all(c.split()[0] == ("an" if c.split()[1] == "orange" else "a") for c in copies)
    copies = recombined(["An orange heart.", "a red star"], [("orange", "red")], 8.0, seed=0)
    assert set(copies[:8]) == {"An orange heart.", "A red heart."}


def test_the_rate_is_copies_per_caption():
    captions = [f"a red thing number {i}" for i in range(200)] + ["a blue thing"]
    classes = word_classes("colours")
    assert len(recombined(captions, classes, 2.0, seed=0)) == 2 * len(captions)
    half = len(recombined(captions, classes, 0.5, seed=0))
    assert 0.35 * len(captions) < half < 0.65 * len(captions)
    assert recombined(captions, classes, 0.5, seed=0) == recombined(captions, classes, 0.5, seed=0)


def test_word_classes_from_names_files_and_inline_json(tmp_path):
    (tmp_path / "list.json").write_text('[["Cat", "dog"]]')
    (tmp_path / "named.json").write_text('{"sizes": ["big", "small"]}')
    assert word_classes(f"colours,{tmp_path / 'list.json'},{tmp_path / 'named.json'}") == [
        BUILTIN_CLASSES["colours"], ("cat", "dog"), ("big", "small")]
    assert word_classes('[["up", "down"]]') == [("up", "down")]


@pytest.mark.parametrize("content, says", [("not json", "malformed JSON"), ('[["cat"], "dog"]', "must hold word classes"),
                                           ("[]", "must hold word classes")])
def test_a_bad_word_class_file_is_named(tmp_path, content, says):
    path = tmp_path / "classes.json"
    path.write_text(content)
    with pytest.raises(BadInputError) as error:
        word_classes(str(path))
    assert str(path) in str(error.value) and says in str(error.value)


def test_classes_that_match_nothing_are_refused():
    with pytest.raises(BadInputError, match="nothing to recombine"):
        recombined(["a cat on a mat"], word_classes("colours"), 1.0, seed=0)
    with pytest.raises(BadInputError, match="nothing to recombine"):  # only one of its members is used
        recombined(["An orange heart."], [("orange", "red", "blue")], 1.0, seed=0)


def _lines(text):
    return [line for line in text.splitlines() if line.strip()]


def test_train_recombine_records_its_word_lists_and_init_needs_no_file(scenes_dir, embedder_dir, tmp_path, capsys):
    """The CLI trains on the captions plus their copies (it says how many), and the decoder's config keeps
    the word lists themselves: the class file can go, and `--init` still trains the decoder further."""
    from unembed.data.splits import split_captions

    classes = tmp_path / "classes.json"
    classes.write_text('{"colours": ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]}')
    first, further = tmp_path / "first", tmp_path / "further"
    common = ["--embedder", str(embedder_dir), "--data", str(scenes_dir), "--device", "cpu", "--max-steps", "1",
              "--batch-size", "8"]
    capsys.readouterr()
    assert main(["train", "capdec", *common, "--out", str(first), "--recombine", str(classes),
                 "--recombine-rate", "0.5", "--lm", "scratch", "--tokenizer", "corpus:200",
                 "--lm-config", '{"n_layer": 1, "n_embd": 32, "n_head": 2}']) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    train = split_captions(scenes_dir / "train")
    assert report["recombined_captions"] == len(recombined(train, word_classes(str(classes)), 0.5, seed=0)) > 0
    config = json.loads((first / "config.json").read_text())["config"]
    assert json.loads(config["recombine"]) == [json.loads(classes.read_text())["colours"]]
    assert config["recombine_rate"] == 0.5 and str(tmp_path) not in (first / "config.json").read_text()
    classes.unlink()
    assert main(["train", "capdec", *common, "--out", str(further), "--init", str(first)]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["recombined_captions"] == report["recombined_captions"]


@pytest.mark.parametrize("argv, says", [
    (["--recombine", "nosuch"], "unembed: nosuch: is neither a word class"),
    (["--recombine", "colours", "--recombine-rate", "0"], "unembed: --recombine-rate: must be above 0 and at most 100 (got 0)"),
    (["--recombine", "colours", "--recombine-rate", "inf"], "unembed: --recombine-rate: must be above 0 and at most 100 (got inf)"),
    (["--recombine-rate", "2"], "unembed: --recombine-rate: needs --recombine"),
    (["--recombine", ","], "unembed: --recombine: names no word class (',')"),
    (["--recombine", "[[\"light blue\", \"red\"]]"], "unembed: --recombine: has 'light blue': a class member must be one word"),
    (["--recombine", "[[\"red\""], "unembed: --recombine: is not JSON")])
def test_a_bad_recombine_option_is_one_line_and_exit_2(argv, says, scenes_dir, embedder_dir, tmp_path, capsys):
    code = main(["train", "capdec", "--embedder", str(embedder_dir), "--data", str(scenes_dir), "--device", "cpu",
                 "--max-steps", "1", "--out", str(tmp_path / "out"), *argv])
    assert code == EXIT_FAILED
    [line] = _lines(capsys.readouterr().err)
    assert line.startswith(says)
    assert not (tmp_path / "out" / "config.json").exists()


def test_a_word_in_two_classes_trades_in_the_first():
    copies = recombined(["an orange apple", "a red pear"], [("orange", "red"), ("orange", "apple", "pear")], 20.0,
                        seed=0)
    assert {c.split()[1] for c in copies} == {"orange", "red"}  # the word "orange" trades as a colour, never a fruit


def test_a_capitalised_class_word_stays_capitalised():
    copies = recombined(["Red star.", "a blue circle"], word_classes("colours"), 10.0, seed=0)[:10]
    assert {c for c in copies} == {"Red star.", "Blue star."}


def test_the_copies_reach_training(scenes_dir, embedder_dir, tmp_path):
    """DeCap's memory, drawn from every caption it trains on, holds captions the training split does not."""
    from unembed.data.splits import split_captions

    out = tmp_path / "decap"
    assert main(["train", "decap", "--embedder", str(embedder_dir), "--data", str(scenes_dir), "--device", "cpu",
                 "--max-steps", "1", "--batch-size", "8", "--out", str(out), "--recombine", "colours",
                 "--projection-size", "100000", "--lm-config", '{"n_layer": 1, "n_embd": 32, "n_head": 2}']) == EXIT_OK
    memory = set(json.loads((out / "memory_captions.json").read_text()))
    train = set(split_captions(scenes_dir / "train"))
    assert train <= memory and memory - train
