"""Ids that match: raw COCO file names find their annotation ids through the captions file, keys keep
their exact spelling, and `unembed eval` says (and fails) when predictions and references differ."""
import json

from unembed.cli import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, main
from unembed.data.ids import IdIndex
from unembed.pipeline import image_id

COCO = {"images": [{"id": 391895, "file_name": "COCO_val2014_000000391895.jpg"},
                   {"id": 522418, "file_name": "COCO_val2014_000000522418.jpg"},
                   {"id": 184613, "file_name": "COCO_val2014_000000184613.jpg"}],
        "annotations": [{"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate([
            (391895, "a man riding a bike down a dirt road"), (391895, "a person on a bicycle on a path"),
            (522418, "a woman cutting a large cake"), (522418, "a woman with a knife and a cake"),
            (184613, "a boy holding an umbrella near cows"), (184613, "cattle standing in a field")])]}


def _files(tmp_path, records):
    (tmp_path / "refs.json").write_text(json.dumps(COCO))
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return ["--results", str(tmp_path / "results.jsonl"), "--refs", str(tmp_path / "refs.json"), "--no-spice",
            "--no-meteor"]


def _lines(err):
    return [line for line in err.splitlines() if line.strip()]


def test_raw_coco_file_names_are_scored_against_their_annotation_ids(tmp_path, capsys):
    # as `unembed caption val2014/` names them (the stem), and as other tools do (the file name)
    records = [{"image_id": "COCO_val2014_000000391895", "caption": "a man riding a bike"},
               {"image_id": "COCO_val2014_000000522418.jpg", "caption": "a woman cutting a cake"},
               {"image_id": 184613, "caption": "cows in a field"}]
    assert main(["eval", *_files(tmp_path, records)]) == EXIT_OK
    assert "3 of 3 predictions matched references" in capsys.readouterr().err


def test_eval_names_both_counts_and_fails_on_a_mismatch(tmp_path, capsys):
    records = [{"image_id": 391895, "caption": "a man riding a bike"},
               {"image_id": "COCO_val2014_000000999999", "caption": "a cat"}]
    args = _files(tmp_path, records)
    assert main(["eval", *args]) == EXIT_PARTIAL
    captured = capsys.readouterr()
    [line] = [line for line in _lines(captured.err) if "matched" in line]
    assert line.startswith("unembed: 1 of 2 predictions matched references; 1 predictions have no references")
    assert "'COCO_val2014_000000999999'" in line and "2 of 3 reference images have no prediction" in line
    assert "|" in captured.out  # the matched ones are still scored
    # --allow-partial: not a failure, the counts still said
    assert main(["eval", *args, "--allow-partial"]) == EXIT_OK
    assert "2 of 3 reference images have no prediction" in capsys.readouterr().err


def test_eval_with_no_prediction_matching_says_so_once(tmp_path, capsys):
    records = [{"image_id": "000000030", "caption": "a cat"}]
    assert main(["eval", *_files(tmp_path, records), "--allow-partial"]) == EXIT_FAILED
    [line] = _lines(capsys.readouterr().err)
    assert "0 of 1 predictions matched references" in line and "nothing to score" in line


def test_all_digit_keys_keep_their_spelling():
    # img2dataset's key is a name, not a number: never image 30
    assert image_id("shards/000000030.jpg") == "000000030"
    assert image_id("shard-0000.tar/000000030.jpg") == "000000030"
    index = IdIndex([{"id": 30, "file_name": "elsewhere.jpg"}, {"id": 7, "file_name": "images/000007.png"}])
    assert index.resolve("000000030") == "000000030"  # no file of that name: unchanged
    assert image_id("a/000007.png", index) == 7 and index.resolve("30") == 30 and index.resolve(7) == 7


def test_a_name_two_images_share_names_neither():
    index = IdIndex([{"id": 1, "file_name": "a/x.jpg"}, {"id": 2, "file_name": "b/x.jpg"}])
    assert index.resolve("x") == "x" and index.resolve("a/x.jpg") == 1


def test_two_predictions_of_one_image_are_refused(tmp_path, capsys):
    records = [{"image_id": 391895, "caption": "a bike"}, {"image_id": "COCO_val2014_000000391895", "caption": "a man"}]
    assert main(["eval", *_files(tmp_path, records)]) == EXIT_FAILED
    [line] = _lines(capsys.readouterr().err)
    assert "both name image 391895" in line


def test_scenes_stems_match_their_ids_through_the_split(scenes_dir, retrieval_dir, tmp_path, capsys):
    """The guide's flow: scenes files are named by their id (000012.png is image 12); caption keeps the
    stem, eval finds the id through captions.json; `caption --refs` writes the ids themselves."""
    split = scenes_dir / "test"
    ids = [im["id"] for im in json.loads((split / "captions.json").read_text())["images"]]
    stems, with_ids = tmp_path / "stems.jsonl", tmp_path / "ids.jsonl"
    assert main(["caption", str(split / "images"), "--decoder", str(retrieval_dir), "--out", str(stems),
                 "--device", "cpu"]) == EXIT_OK
    assert sorted(json.loads(line)["image_id"] for line in stems.read_text().splitlines()) == \
        [f"{i:06d}" for i in sorted(ids)]
    assert main(["caption", str(split / "images"), "--decoder", str(retrieval_dir), "--out", str(with_ids),
                 "--refs", str(split / "captions.json"), "--device", "cpu"]) == EXIT_OK
    assert sorted(json.loads(line)["image_id"] for line in with_ids.read_text().splitlines()) == sorted(ids)
    capsys.readouterr()
    assert main(["eval", "--results", str(stems), "--refs", str(split / "captions.json"), "--no-spice",
                 "--no-meteor"]) == EXIT_OK
    assert f"{len(ids)} of {len(ids)} predictions matched references" in capsys.readouterr().err


def test_caption_embeddings_take_the_ids_of_the_refs(scenes_dir, retrieval_dir, embedder_dir, tmp_path):
    """A split's embeddings carry its ids as text ("12"); with --refs they come back as the split's ids."""
    split = scenes_dir / "test"
    vectors, out = tmp_path / "test.safetensors", tmp_path / "captions.jsonl"
    assert main(["embed", str(split / "images"), "--embedder", str(embedder_dir), "--out", str(vectors),
                 "--device", "cpu"]) == EXIT_OK
    assert main(["caption", "--embeddings", str(vectors), "--decoder", str(retrieval_dir), "--out", str(out),
                 "--refs", str(split / "captions.json"), "--device", "cpu"]) == EXIT_OK
    ids = [im["id"] for im in json.loads((split / "captions.json").read_text())["images"]]
    assert sorted(json.loads(line)["image_id"] for line in out.read_text().splitlines()) == sorted(ids)


def test_ids_written_as_text_find_refs_that_list_no_images(tmp_path):
    (tmp_path / "refs.json").write_text(json.dumps({"annotations": [{"image_id": 12, "caption": "a cat"}]}))
    index = IdIndex.from_file(tmp_path / "refs.json")
    assert index.resolve("12") == 12 and index.resolve("000012") == "000012"
