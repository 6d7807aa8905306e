"""ViECap: entity vocabularies (nouns; attribute-noun phrases that name pairs never seen together),
entity masking in training, zero-shot detection at inference, and the command line. Loss, save/load
and greedy-equals-a-naive-loop run for viecap with every prefix decoder (tests/test_prefix.py)."""
import json

import pytest
import torch

from unembed.cli import EXIT_FAILED, EXIT_OK, main
from unembed.data.scenes import named_pairs
from unembed.decoders import create_decoder, load_decoder
from unembed.errors import BadInputError
from unembed.entities import Chunk, EntityVocabulary, chunks, detect, detection_scores, entity_counts, synonym_groups

# Colours seen with circles and squares; stars seen only in red and green; "purple star" never.
CORPUS = ["a red circle", "a purple circle on the left", "two green circles", "a red star at the top",
          "a green star and a red square", "a purple square", "a green square", "three red stars",
          "a blue circle on a flat background", "a blue square"] * 3


def test_chunks_are_head_nouns_with_the_word_before_them():
    assert chunks("A tiny red circle at the top left, next to two big blue squares.") == [
        Chunk("circle", "red"), Chunk("squares", "blue")]
    assert chunks("there are two black plus signs on a flat background") == [
        Chunk("signs", "plus"), Chunk("background", "flat")]


def test_noun_vocabulary_folds_plurals_and_keeps_nouns_seen_often_enough():
    vocabulary = EntityVocabulary.from_captions(CORPUS, "nouns", min_count=3)
    assert vocabulary.entries == ["background", "circle", "square", "star"]
    assert EntityVocabulary.from_captions(CORPUS, "nouns", min_count=4).entries == ["circle", "square", "star"]
    assert vocabulary.caption_entities("two stars beside a circle and another star") == ["star", "circle"]


def test_phrase_vocabulary_names_pairs_the_text_never_joined():
    vocabulary = EntityVocabulary.from_captions(CORPUS, "phrases", min_count=3)
    assert "purple star" in vocabulary.entries and "blue star" in vocabulary.entries  # never in the corpus
    assert "red circle" in vocabulary.entries and "flat background" in vocabulary.entries
    assert "flat star" not in vocabulary.entries and "purple background" not in vocabulary.entries
    assert vocabulary.caption_entities("two purple stars on a flat background") == ["purple star", "flat background"]
    strict = EntityVocabulary.from_captions(CORPUS, "phrases", min_count=3, similarity=1.01)  # no transfer at all
    assert "purple star" not in strict.entries and "red star" in strict.entries


def test_detection_keeps_the_top_k_above_the_threshold():
    entries = ["circle", "square", "star", "heart"]
    vectors = torch.eye(4)
    image = torch.tensor([[1.0, 0.9, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    found = detect(image, entries, vectors, top_k=3, threshold=0.2, temperature=0.1)
    assert found[0] == ["circle", "square"] and found[1] == ["heart"] and len(found[2]) == 3
    assert detect(image, entries, vectors, top_k=1, threshold=0.0, temperature=0.1)[0] == ["circle"]
    scores = detection_scores([["circle", "star"]], [["a red circle", "a square"]],
                              EntityVocabulary(entries, "nouns"))
    assert scores["precision"] == 0.5 and scores["recall"] == 0.5
    # merged detections are read against references through the same groups: "square" is "circle" here
    merged = detection_scores([["circle"]], [["a red square"]], EntityVocabulary(entries, "nouns"), [0, 0, 2, 3])
    assert merged["precision"] == 1.0 and detection_scores([["circle"]], [["a red square"]],
                                                           EntityVocabulary(entries, "nouns"))["precision"] == 0.0


def _unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows), dim=-1)


def test_synonyms_are_one_entity_named_by_the_commonest_word():
    # ring ~ hoop (0.99), hoop ~ circle (0.99), but ring ~ circle below the bar: no chain links them
    entries = ["circle", "hoop", "ring", "star"]
    vectors = _unit([1.0, 0.0, 0.0], [0.99, 0.141, 0.0], [0.96, 0.28, 0.0], [0.0, 0.0, 1.0])
    assert synonym_groups(vectors, [5, 1, 9, 3], 0.98) == [0, 2, 2, 3]  # ring and hoop, named "ring"
    assert synonym_groups(vectors, [9, 1, 5, 3], 0.98) == [0, 0, 2, 3]  # circle and hoop, named "circle"
    assert synonym_groups(vectors, [0, 0, 0, 0], 0.98) == [0, 0, 2, 3]  # a tie: the first
    assert synonym_groups(vectors, [5, 1, 9, 3], 0.999) == [0, 1, 2, 3]
    # hoop and ring share one shape's probability: each alone under the threshold, together over it
    image = _unit([0.0, 1.0, 1.0, 0.8])
    flat = torch.eye(4)
    assert detect(image, entries, flat, top_k=3, threshold=0.5, temperature=0.25) == [[]]
    groups = [0, 2, 2, 3]
    assert detect(image, entries, flat, top_k=3, threshold=0.5, temperature=0.25, groups=groups) == [["ring"]]
    for threshold in (0.0, -1.0):  # "hoop" is no entity of its own, whatever the threshold
        assert detect(image, entries, flat, top_k=4, threshold=threshold, temperature=0.25, groups=groups)[0] == [
            "ring", "star", "circle"]
    counts, named = entity_counts(EntityVocabulary(entries), ["a red ring", "a ring and a hoop", "a ring", "a ring"])
    assert counts == [0, 1, 4, 0] and named["a ring and a hoop"] == ["ring", "hoop"]


def test_a_decoder_merges_with_the_counts_of_its_training_captions(embedder, tmp_path):
    decoder = _viecap(embedder)
    assert decoder.config.entity_counts == [3, 12, 12, 9]  # background, circle, square, star in CORPUS
    width = decoder.entity_vectors.shape[1]
    plane = lambda *rows: torch.nn.functional.pad(_unit(*rows), (0, width - 2))  # the embedder's width
    decoder.entity_vectors = plane([1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [1.0, 0.05])
    assert decoder.synonym_groups() == [3, 1, 1, 3]  # square joins circle, background joins star
    decoder.save(tmp_path / "v")
    again = load_decoder(tmp_path / "v")
    assert again.config.entity_counts == decoder.config.entity_counts and again.synonym_groups() == [3, 1, 1, 3]
    found = again.detect(plane([0.05, 1.0]))  # nearer square than circle, far from the rest
    assert found == [["circle"]]  # the commoner word (a tie here: the first)
    assert again.merged_entities() == {"star": ["background"], "circle": ["square"]}
    # a call's own bar (decoding option entity_merge), the decoder's kept as it was
    assert again.detect(plane([0.05, 1.0]), 0.0) == [["square", "circle"]] and again.merged_entities(0.0) == {}
    assert again.merged_entities(0.9999) == {} and again.config.entity_merge == 0.98
    from unembed.embedders import Embedded

    image = Embedded(plane([0.05, 1.0]), ["0"], embedder.id, embedder.spec, "image")
    said = lambda options: [_said(again, p) for p in again.text_prompts(image, image.vectors, options)]
    assert said(None) == said({}) == ["there are circle in image."]
    assert said({"entity_merge": 0.0}) == ["there are square, circle in image."]
    again.config.entity_merge = 0.0
    assert again.synonym_groups() is None and again.detect(plane([0.05, 1.0])) == [["square", "circle"]]
    again.config.entity_merge = 0.98
    again.entity_vectors = plane([1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [1.0, 0.05])  # new vectors: new groups
    assert again.synonym_groups() == [2, 1, 2, 2]
    again.config.entity_counts = []  # saved before counts were kept: no merging
    assert again.synonym_groups() is None
    again.config.entity_merge = -0.5
    with pytest.raises(BadInputError, match="entity_merge"):
        again.detect(plane([0.05, 1.0]))


def test_the_detector_is_trusted_as_far_as_the_val_split_shows_it_right(embedder, tmp_path):
    """check_on_val: precision at entity_threshold, then at higher thresholds until one reaches
    entity_min_precision; detection uses that one, or names nothing when none reaches it."""
    from unembed.embedders import Embedded

    decoder = _viecap(embedder, entity_temperature=0.5)  # background, circle, square, star
    width = decoder.entity_vectors.shape[1]
    decoder.entity_vectors = torch.eye(4, width)
    star, circle_or_square = torch.eye(4, width)[3], torch.nn.functional.normalize(torch.eye(4, width)[1:3].sum(0), dim=0)
    images = Embedded(torch.stack([star, circle_or_square]), ["a", "b"], embedder.id, embedder.spec, "image")
    # star: p 0.71; the other: circle and square at p 0.40 each
    assert decoder.detect(images.vectors) == [["star"], ["circle", "square"]]
    decoder.check_on_val((images, {"a": ["a red star"], "b": ["a blue star"]}))
    assert decoder.config.entity_val_precision == {"0.2": 0.3333, "0.3": 0.3333, "0.5": 1.0}
    assert decoder.detection_threshold() == 0.5 and decoder.detect(images.vectors) == [["star"], []]
    assert decoder.text_summary()["detection_threshold"] == 0.5
    decoder.save(tmp_path / "v")
    assert load_decoder(tmp_path / "v").detect(images.vectors) == [["star"], []]
    # wrong at every threshold: no entity is named, and the prompt says "something"
    decoder.check_on_val((images, {"a": ["a red circle"], "b": ["a blue circle"]}))
    assert decoder.config.entity_val_precision == {"0.2": 0.3333, "0.3": 0.3333, "0.5": 0.0, "0.7": 0.0, "0.9": 0.0}
    assert decoder.detection_threshold() is None and decoder.detect(images.vectors) == [[], []]
    said = [_said(decoder, p) for p in decoder.text_prompts(images, images.vectors)]
    assert said == ["there are something in image."] * 2
    summary = decoder.text_summary()
    assert summary["detection_threshold"] is None and summary["detection"].startswith("no entity is named")
    with pytest.raises(BadInputError, match="entity_merge: changes nothing: .* names no entity"):
        decoder.check_options({"entity_merge": 0.0})  # merging cannot change a prompt that names nothing
    decoder.config.entity_min_precision = 0.0  # trusted as it is
    assert decoder.detection_threshold() == 0.2 and decoder.detect(images.vectors) == [["star"], ["circle", "square"]]
    decoder.config.entity_min_precision = 1.5
    with pytest.raises(BadInputError, match="entity_min_precision"):
        decoder.check_on_val((images, {"a": ["a red circle"], "b": ["a blue circle"]}))
    decoder.config.entity_min_precision = 0.5
    decoder.config.entity_val_precision, decoder.config.entity_threshold = {"0": 1.0}, 0.0  # a threshold of 0 is one
    assert decoder.detection_threshold() == 0.0 and decoder.text_summary()["detection_threshold"] == 0.0
    assert "detection" not in decoder.text_summary()
    decoder.config.entity_threshold = 0.7  # raised by hand after the check: the higher one is used
    assert decoder.detection_threshold() == 0.7
    decoder.config.entity_threshold = 0.2
    decoder.check_on_val(None)  # no val split: no check, the threshold as given
    assert decoder.config.entity_val_precision == {} and decoder.detection_threshold() == 0.2


def test_settings_out_of_range_are_refused_when_the_config_is_made():
    from unembed.decoders.viecap import ViECapConfig

    for name, value in (("entity_merge", 1.5), ("entity_merge", -0.1), ("entity_min_precision", 2.0)):
        with pytest.raises(BadInputError, match=name):
            ViECapConfig(**{name: value})


def _viecap(embedder, **options):
    from tests.test_prefix import tiny

    decoder = tiny("viecap", embedder, mapper="mlp", entity_min_count=3, **options)
    decoder.fit_text(embedder, CORPUS)
    return decoder


def _said(decoder, ids) -> str:
    return decoder.tokenizer.decode(ids).replace(" ,", ",").replace(" .", ".")  # CLIP's BPE spaces punctuation


def test_training_prompts_name_each_entity_with_probability_one_minus_mask(embedder):
    decoder = _viecap(embedder, entity_mask=0.0)
    caption = "a red star next to two green circles"
    generator = torch.Generator().manual_seed(0)
    prompts = {_said(decoder, decoder.training_prompts([caption], generator)[0]) for _ in range(20)}
    assert prompts == {"there are star, circle in image.", "there are circle, star in image."}  # random order
    decoder.config.entity_mask = 1.0
    assert _said(decoder, decoder.training_prompts([caption], generator)[0]) == "there are something in image."
    decoder.config.entity_mask = 0.4
    named = [_said(decoder, p).count(",") + 1 - ("something" in _said(decoder, p))
             for p in decoder.training_prompts([caption] * 2000, torch.Generator().manual_seed(1))]
    assert 0.55 < sum(named) / (2 * len(named)) < 0.65  # each of the 2 entities kept with p = 0.6
    decoder.config.hard_prompt = False
    assert decoder.training_prompts([caption], generator) is None


def test_inference_prompts_name_what_the_embedder_detects(embedder):
    decoder = _viecap(embedder, entity_threshold=0.0, entity_top_k=2)
    from unembed.embedders import Embedded

    embedded = Embedded(embedder.embed_texts(["a photo of a star.", "a photo of a circle."]), ["0", "1"],
                        embedder.id, embedder.spec, "image")
    found = decoder.detect(embedded.vectors)
    assert [len(f) for f in found] == [2, 2] and all(set(f) <= set(decoder.config.entities) for f in found)
    prompts = decoder.text_prompts(embedded, embedded.vectors)
    assert [_said(decoder, p) for p in prompts] == [f"there are {', '.join(f)} in image." for f in found]


def test_vocabulary_and_its_vectors_round_trip(embedder, tmp_path):
    decoder = _viecap(embedder, entity_vocabulary="phrases")
    decoder.save(tmp_path / "v")
    again = load_decoder(tmp_path / "v")
    assert again.config.entities == decoder.config.entities and "purple star" in again.config.entities
    torch.testing.assert_close(again.entity_vectors, decoder.entity_vectors)
    assert again.vocabulary.caption_entities("a purple star") == ["purple star"]


def test_command_line_trains_from_an_entities_file_and_captions_embeddings(tmp_path, scenes_dir, embedder_dir):
    entities = tmp_path / "entities.txt"
    entities.write_text("Circle\nsquare\n\nstar\ncircle\n")
    out = tmp_path / "viecap"
    common = ["train", "viecap", "--embedder", str(embedder_dir), "--data", str(scenes_dir), "--out", str(out),
              "--lm", "scratch", "--tokenizer", "corpus:64", "--lm-config", '{"n_layer": 1, "n_embd": 32}',
              "--mapper", "mlp", "--prefix-length", "2", "--max-steps", "2", "--batch-size", "8", "--device", "cpu"]
    # (the test embedder's detector is trusted as it is: it would fail the val check)
    assert main([*common, "--entities", str(entities), "--entity-min-precision", "0"]) == EXIT_OK
    assert json.loads((out / "config.json").read_text())["config"]["entities"] == ["circle", "square", "star"]
    # what the embedder merges is reported at training and kept in metrics.json
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["entities"] == 3 and metrics["entity_merge"] == 0.98
    # and how far the val split trusts its detector, measured before training and kept in the config
    precision = json.loads((out / "config.json").read_text())["config"]["entity_val_precision"]
    assert precision and metrics["entity_val_precision"] == precision and "detection_threshold" in metrics
    saved = load_decoder(out)
    groups = synonym_groups(saved.entity_vectors, saved.config.entity_counts, 0.98)
    entries = saved.config.entities
    assert metrics["merged_entities"] == {entries[g]: [e for e, h in zip(entries, groups) if h == g and e != entries[g]]
                                          for g in set(groups) if groups.count(g) > 1}
    vectors = tmp_path / "vectors.safetensors"
    images = sorted(str(p) for p in (scenes_dir / "test" / "images").glob("*.png"))[:3]
    assert main(["embed", *images, "--embedder", str(embedder_dir), "--out", str(vectors), "--device", "cpu"]) == EXIT_OK
    captions = tmp_path / "captions.jsonl"
    assert main(["caption", "--embeddings", str(vectors), "--decoder", str(out), "--out", str(captions),
                 "--max-length", "4", "--device", "cpu"]) == EXIT_OK
    assert [json.loads(line)["decoder"] for line in captions.read_text().splitlines()] == ["viecap"] * 3
    assert main(["caption", "--embeddings", str(vectors), "--decoder", str(out), "--out", str(tmp_path / "unmerged.jsonl"),
                 "--max-length", "4", "--entity-merge", "0", "--device", "cpu"]) == EXIT_OK


def test_entity_merge_is_a_viecap_decoding_option_within_0_and_1():
    from unembed.decoders import decoder_class

    viecap, capdec = decoder_class("viecap"), decoder_class("capdec")
    assert viecap.check_generation({"entity_merge": 0.5}) == {"entity_merge": 0.5}
    for cls, value in ((capdec, 0.5), (viecap, 1.5), (viecap, -0.1)):
        with pytest.raises(BadInputError, match="entity_merge"):
            cls.check_generation({"entity_merge": value})


def test_a_decoder_saved_without_counts_gets_them_when_trained_further(tmp_path, scenes_dir, embedder_dir):
    """`--init` keeps the saved vocabulary; a decoder saved before entity counts were kept counts its
    entries in the captions it is trained further on, and merges from then on."""
    from unembed.data.splits import split_captions

    first, further = tmp_path / "first", tmp_path / "further"
    common = ["train", "viecap", "--embedder", str(embedder_dir), "--data", str(scenes_dir), "--max-steps", "1",
              "--batch-size", "8", "--device", "cpu"]
    assert main([*common, "--out", str(first), "--lm", "scratch", "--tokenizer", "corpus:64", "--lm-config",
                 '{"n_layer": 1, "n_embd": 32}', "--mapper", "mlp", "--entity-min-count", "1"]) == EXIT_OK
    saved = json.loads((first / "config.json").read_text())
    counted = saved["config"].pop("entity_counts")
    (first / "config.json").write_text(json.dumps(saved))  # as saved before counts were kept
    assert load_decoder(first).synonym_groups() is None
    assert main([*common, "--out", str(further), "--init", str(first)]) == EXIT_OK
    config = json.loads((further / "config.json").read_text())["config"]
    assert config["entities"] == saved["config"]["entities"] and config["entity_counts"] == counted
    vocabulary = EntityVocabulary(config["entities"])
    assert counted == entity_counts(vocabulary, split_captions(scenes_dir / "train"))[0]
    assert load_decoder(further).synonym_groups() is not None


def test_an_empty_entities_file_is_refused_in_one_line(tmp_path, scenes_dir, embedder_dir, capsys):
    empty = tmp_path / "none.txt"
    empty.write_text("\n\n")
    code = main(["train", "viecap", "--embedder", str(embedder_dir), "--data", str(scenes_dir), "--out",
                 str(tmp_path / "x"), "--lm", "scratch", "--entities", str(empty), "--max-steps", "1", "--device", "cpu"])
    assert code == EXIT_FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.txt" in err[0] and "holds no entities" in err[0]


def test_named_pairs_reads_colour_shape_pairs_in_any_caption():
    assert named_pairs("two violet stars, an orange heart and a plus sign") == {("purple", "star"), ("orange", "heart")}
    assert named_pairs("a black plus sign") == {("black", "cross")} and named_pairs("purple") == set()


def test_the_readme_small_world_merge_numbers_are_the_benchmark_json():
    """README's sentence on merging in the small world (benchmarks/entity_merge_small.py) is its JSON."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = json.loads((root / "benchmarks" / "results" / "entity_merge_small.json").read_text())
    cider = {name: {split: f"{100 * r['CIDEr']:.1f}" for split, r in row.items()} for name, row in result["rows"].items()}
    before, after = cider["viecap, unmerged"], cider["viecap, synonyms merged"]
    readme = " ".join((root / "README.md").read_text().split())
    assert (f"(test {before['test']} to {after['test']}, compositional {before['compositional']} to "
            f"{after['compositional']};") in readme
    assert result["merged_groups"]["star"] == "triangle" and '("star" under "triangle")' in readme


def test_the_readme_detector_check_numbers_are_the_benchmark_json():
    """README's sentence on the val check of viecap's detector in the small world is its JSON: no
    threshold reached the bar, and the checked decoder's CIDEr against the merged one's and CapDec's."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = json.loads((root / "benchmarks" / "results" / "entity_merge_small.json").read_text())
    check = result["detection_check"]
    assert check["threshold"] is None and max(check["val_precision"].values()) < check["min_precision"]
    precision = sorted(check["val_precision"].values())
    cider = {name: {split: f"{100 * r['CIDEr']:.1f}" for split, r in row.items()} for name, row in result["rows"].items()}
    merged, checked, capdec = (cider[n] for n in ("viecap, synonyms merged", "viecap, detector checked on val", "capdec"))
    readme = " ".join((root / "README.md").read_text().split())
    main_world = json.loads((root / "benchmarks" / "results" / "detector_check.json").read_text())
    assert main_world["threshold"] == 0.2 and main_world["val_images"] == 1000
    assert f"passes at 0.2 with precision {main_world['val_precision']['0.2']:g} on the main world's val split" in readme
    assert (f"is {precision[0]:.2f} to {precision[-1]:.2f} at every threshold, so viecap names none: test CIDEr "
            f"{merged['test']} -> {checked['test']}, compositional {merged['compositional']} -> "
            f"{checked['compositional']}, against CapDec's {capdec['test']} and {capdec['compositional']}") in readme


def test_the_readme_small_world_seed_numbers_are_the_benchmark_json():
    """README's three-seed sentence on the main world's recipe in the small world is `seeds` in
    entity_merge_small.json, its means and its verdict included."""
    from pathlib import Path
    from statistics import mean

    root = Path(__file__).resolve().parents[1]
    seeds = json.loads((root / "benchmarks" / "results" / "entity_merge_small.json").read_text())["seeds"]
    readme = " ".join((root / "README.md").read_text().split())

    def cider(name):  # "test / compositional" at each seed
        return [(100 * rows[name]["test"]["CIDEr"], 100 * rows[name]["compositional"]["CIDEr"]) for rows in seeds.values()]

    def said(pairs):
        return ", ".join(f"{t:.1f} / {c:.1f}" for t, c in pairs)

    capdec, alone, recipe = cider("capdec"), cider("viecap, detector checked on val"), cider("same, --rerank 32 --edits 1")
    means = [tuple(mean(split) for split in zip(*rows)) for rows in (recipe, capdec, alone)]
    assert (f"capdec {said(capdec)}; the checked viecap with `--rerank 32 --edits 1` {said(recipe)}. Means: "
            f"{said(means[:1])} against CapDec's {said(means[1:2])} (the checked viecap alone: {said(means[2:])})") in readme
    assert all(r >= c for r, c in zip(means[0], means[1]))  # "level ... on both splits' means"
    assert [(r[0] >= c[0], r[1] >= c[1]) for r, c in zip(recipe, capdec)] == [(False, True), (True, False), (False, False)]
    assert (f"{capdec[0][0] - recipe[0][0]:.1f} below on test at seed 0, {capdec[1][1] - recipe[1][1]:.1f} below on "
            "compositional at seed 1, below on both at seed 2") in readme
    span = max(t for t, _ in capdec) - min(t for t, _ in capdec)
    assert f"(capdec's seeds span {span:.1f} test CIDEr)" in readme
    assert all(row["compositional"]["names_heldout_pair"] == 0 for rows in seeds.values() for row in rows.values())
