"""The default bundle: pruned fp16 models that caption like the ones they came from, the shipped
bundle loading and captioning with no flags, and `unembed demo`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unembed.bundle import BUNDLE_DIR, BUNDLE_ENV, MAX_BYTES, manifest
from unembed.cli import EXIT_OK, main
from unembed.data.splits import split_captions
from unembed.embedders import Embedder, prune_vocabulary
from unembed.pipeline import caption

REPO = Path(__file__).resolve().parents[1]


def pack_bundle():
    """The packer of `make bundle` (a build script, not part of the installed package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pack_bundle", REPO / "scripts" / "pack_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pack(*args, **kwargs):
    return pack_bundle().pack(*args, **kwargs)


def test_pruned_vocabulary_gives_the_same_vectors_from_a_fraction_of_the_rows(embedder, scenes_dir, tmp_path):
    captions = split_captions(scenes_dir / "train")
    pruned = prune_vocabulary(embedder, captions)
    assert pruned.model.token_embedding.num_embeddings < 500 < embedder.model.token_embedding.num_embeddings
    texts = split_captions(scenes_dir / "test")[:20]
    torch.testing.assert_close(pruned.embed_texts(texts), embedder.embed_texts(texts))
    pruned.save(tmp_path / "pruned")
    loaded = Embedder.load(tmp_path / "pruned", device="cpu")
    torch.testing.assert_close(loaded.embed_texts(texts), embedder.embed_texts(texts))
    assert loaded.tokenizer.decode(loaded.tokenizer([texts[0]])[0, 1:6].tolist()).split() == texts[0].split()[:5]


def test_pruned_vocabulary_names_the_words_it_does_not_know_once(embedder, scenes_dir, capsys):
    pruned = prune_vocabulary(embedder, split_captions(scenes_dir / "train"))
    capsys.readouterr()
    pruned.embed_texts(["a red circle"])
    assert capsys.readouterr().err == ""
    pruned.embed_texts(["a dog on a sofa", "a red circle"])
    note = capsys.readouterr().err
    assert "'dog'" in note and "'sofa'" in note and "'red'" not in note and len(note.splitlines()) == 1
    pruned.embed_texts(["a dog"])
    assert capsys.readouterr().err == ""  # named once


@pytest.fixture(scope="module")
def tiny_bundle(compare_dir, scenes_dir, tmp_path_factory):
    """The compare run packed, its decap first given the margin training chooses on a real val split
    (the 12 val images stand in for one; compare trains in other processes, so its decap chose none)."""
    decap = compare_dir[0] / "models" / "decap"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("unembed.training.prefix.MIN_MARGIN_IMAGES", 1)
        record = pack_bundle()._margin_chosen_on_val(decap, scenes_dir)
    (decap / "edits.json").write_text(json.dumps(record))
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    out.mkdir()
    (out / "__init__.py").write_text("# the loader, as in unembed/bundle/\n")  # packing must keep it
    info = pack(compare_dir[0], scenes_dir, out)
    return out, info


@pytest.mark.slow(seconds=28)
def test_pack_keeps_captions_in_fp16_with_a_pruned_embedder(tiny_bundle, compare_dir, scenes_dir):
    out, info = tiny_bundle
    assert info["decoders"] == ["retrieval", "decap"] and info["default"] in info["decoders"]
    assert (out / "__init__.py").read_text() == "# the loader, as in unembed/bundle/\n"
    assert json.loads((out / "bundle.json").read_text())["scores"]["retrieval"]["CIDEr"] is not None
    images = sorted(str(p) for p in (scenes_dir / "test" / "images").glob("*.png"))
    original = caption(images, str(compare_dir[0] / "models" / "retrieval"), device="cpu")
    assert caption(images, str(out / "retrieval"), device="cpu") == original
    from safetensors import safe_open

    with safe_open(out / "decap" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} <= {torch.float16, torch.int64}
    check = json.loads((out / "bundle.json").read_text())["fp16_check"]
    n = len(images)
    assert check["decoders"].keys() == {"retrieval", "decap"}
    for name, row in check["decoders"].items():
        assert row["images"] == n and row["agreement"] >= check["bounds"]["min_agreement"], row
        assert abs(row["CIDEr_change"]) <= check["bounds"]["max_CIDEr_change"], row
    packed = caption(images, str(out / "decap"), device="cpu")
    fp32 = caption(images, str(compare_dir[0] / "models" / "decap"), device="cpu")
    assert check["decoders"]["decap"]["agreement"] == round(sum(a == b for a, b in zip(packed, fp32)) / n, 4)
    # what --edits rewrites with travels with the decoder trained on captions (retrieval has none)
    trained = compare_dir[0] / "models" / "decap" / "substitutes.json"
    assert (out / "decap" / "substitutes.json").read_bytes() == trained.read_bytes()
    assert not (out / "retrieval" / "substitutes.json").exists()
    # and so does the margin chosen on val
    assert (out / "decap" / "edits.json").read_bytes() == trained.with_name("edits.json").read_bytes()


def test_upgrade_gives_an_older_bundles_caption_trained_decoders_their_substitutes(tiny_bundle, scenes_dir, tmp_path,
                                                                                  capsys, monkeypatch):
    """A bundle packed before training wrote substitutes.json and edits.json gets, from the data it was
    trained on, the table training writes today and a margin chosen on its val split; the configs stay
    loadable and --edits then works from image files."""
    import shutil

    from unembed.decoders.edits import substitutes

    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle[0], out)
    trained_margin = json.loads((out / "decap" / "edits.json").read_text())
    (out / "decap" / "substitutes.json").unlink()
    (out / "decap" / "edits.json").unlink()
    module = pack_bundle()
    assert module.main(["upgrade", "--out", str(out)]) == 0
    assert not (out / "decap" / "substitutes.json").exists()  # without --data it cannot know the captions
    capsys.readouterr()
    assert module.main(["upgrade", "--out", str(out), "--data", str(scenes_dir)]) == 0
    assert "decap (added substitutes.json; no edits.json: 12 val images; the edit margin is chosen on at least 100" \
        in capsys.readouterr().out  # too few to choose on; the substitutes are added all the same
    (out / "decap" / "substitutes.json").unlink()
    monkeypatch.setattr("unembed.training.prefix.MIN_MARGIN_IMAGES", 1)  # the 12 stand in for a real val split
    assert module.main(["upgrade", "--out", str(out), "--data", str(scenes_dir)]) == 0
    assert json.loads((out / "decap" / "substitutes.json").read_text()) == substitutes(split_captions(scenes_dir / "train"))
    margin = json.loads((out / "decap" / "edits.json").read_text())["margin"]
    said = capsys.readouterr().out.strip()
    assert f"decap (added substitutes.json; edits.json, margin {margin})" in said and "retrieval (added" not in said
    # the margin training chose on val, chosen again the same way (the packed weights are fp16: the
    # captions, and so the scores, may differ slightly from the fp32 decoder's)
    margin = json.loads((out / "decap" / "edits.json").read_text())
    assert margin.keys() == trained_margin.keys() and margin["val_CIDEr"].keys() == trained_margin["val_CIDEr"].keys()
    assert not (out / "retrieval" / "substitutes.json").exists() and not (out / "retrieval" / "edits.json").exists()
    image = sorted(str(p) for p in (scenes_dir / "test" / "images").glob("*.png"))[:2]
    assert main(["caption", *image, "--decoder", str(out / "decap"), "--edits", "1", "--device", "cpu"]) == EXIT_OK


def test_the_shipped_bundle_keeps_substitutes_for_each_decoder_trained_on_captions():
    """`--edits` works on the shipped text decoders: each has the table its training captions give
    (colours stand in for colours) and the margin chosen on the val split (the best of its recorded
    val scores, as training chooses), and no other decoder has either."""
    import math

    from unembed.decoders import prefix_kinds
    from unembed.decoders.base import read_decoder_config
    from unembed.decoders.edits import MARGIN_GRID, chosen_margin

    for name in manifest(BUNDLE_DIR)["decoders"]:
        kind = read_decoder_config(BUNDLE_DIR / name)["kind"]
        table, margin = BUNDLE_DIR / name / "substitutes.json", BUNDLE_DIR / name / "edits.json"
        assert table.is_file() == margin.is_file() == (kind in prefix_kinds()), name
        if table.is_file():
            assert {"blue", "green", "purple"} <= set(json.loads(table.read_text())["red"]), name
            record = json.loads(margin.read_text())
            scores = {(math.inf if m == "off" else float(m)): v for m, v in record["val_CIDEr"].items()}
            assert set(scores) == {*MARGIN_GRID, math.inf}, name
            chosen = chosen_margin(scores)
            assert record["margin"] == ("off" if chosen == math.inf else chosen), name


def test_the_shipped_bundle_passed_its_fp16_check_for_every_decoder():
    check = manifest(BUNDLE_DIR)["fp16_check"]
    assert set(check["decoders"]) == set(manifest(BUNDLE_DIR)["decoders"])
    for name, row in check["decoders"].items():
        assert row["images"] == 200 and row["agreement"] >= check["bounds"]["min_agreement"], name


def test_caption_without_a_decoder_uses_the_bundle_and_demo_shows_every_decoder(tiny_bundle, scenes_dir, tmp_path,
                                                                                  monkeypatch, capsys):
    out, info = tiny_bundle
    monkeypatch.setenv(BUNDLE_ENV, str(out))
    image = sorted((scenes_dir / "test" / "images").glob("*.png"))[0]
    assert main(["caption", str(image), "--device", "cpu"]) == EXIT_OK
    captured = capsys.readouterr()
    assert json.loads(captured.out)["decoder"] == info["default"]
    assert "knows only the scenes world" in captured.err
    assert main(["caption", str(image), "--decoder", "decap", "--device", "cpu"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["decoder"] == "decap"
    assert main(["caption", str(image), "--decoder", "nope", "--device", "cpu"]) == 2
    assert "has no decoder 'nope'" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "demo"), "--n", "3", "--device", "cpu"]) == EXIT_OK
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| image | a true caption | retrieval | decap |" and len(table) == 2 + 3
    assert len(list((tmp_path / "demo").glob("scene-*.png"))) == 3


def test_the_shipped_bundle_is_small_and_captions_the_example_images_with_no_flags():
    info = manifest(BUNDLE_DIR)
    assert set(info["decoders"]) == {"retrieval", "clipcap", "capdec", "decap", "viecap", "iterative", "coca"}
    size = sum(f.stat().st_size for f in BUNDLE_DIR.rglob("*") if f.is_file())
    assert size <= MAX_BYTES
    examples = sorted(str(p) for p in (REPO / "examples").glob("*.png"))
    assert examples
    run = subprocess.run([sys.executable, "-m", "unembed.cli", "caption", *examples], capture_output=True, text=True,
                         timeout=300, env={k: v for k, v in os.environ.items() if k != BUNDLE_ENV})
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(records) == len(examples) and all(r["caption"] for r in records)
    assert {r["decoder"] for r in records} == {info["default"]}


def test_the_default_bundled_decoder_describes_new_scenes_truly(tmp_path):
    """Scenes captions can be checked against the scene itself: the shipped default must say true
    things about images it never saw (measured at bundle time: 18 of these 32; chance is near 0)."""
    from unembed.bundle import bundled_decoder
    from unembed.data.scenes import caption_is_true, generate_split, render

    scenes, paths = [], []
    for i, (scene, _, seed) in enumerate(generate_split("test", 32, 99)):
        paths.append(str(tmp_path / f"{i}.png"))
        render(scene, seed=seed).save(paths[-1])
        scenes.append(scene)
    captions = caption(paths, str(bundled_decoder()), device="cpu")
    assert sum(caption_is_true(c, s) for c, s in zip(captions, scenes)) >= 12


def test_upgrade_gives_the_shipped_viecap_its_entity_counts_and_scores_it_again(scenes_dir, tmp_path, capsys):
    """A viecap packed before it kept its entity counts gets them from the captions it was trained on
    (so it merges synonyms), its edit margin is chosen again on what it now writes, and bundle.json's
    scores are measured again: they are the captions `unembed caption` now gives from the image files."""
    import shutil

    from unembed.entities import EntityVocabulary, entity_counts
    from unembed.eval.metrics import coco_caption_metrics
    from unembed.data.splits import load_split

    out = tmp_path / "bundle"
    for part in ("embedder", "viecap"):
        shutil.copytree(BUNDLE_DIR / part, out / part)
    saved = json.loads((out / "viecap" / "config.json").read_text())
    del saved["config"]["entity_counts"]  # as packed before the counts were kept
    (out / "viecap" / "config.json").write_text(json.dumps(saved))
    (out / "bundle.json").write_text(json.dumps({
        "format": "unembed-bundle", "default": "viecap", "decoders": ["viecap"], "embedder": "embedder",
        "split": "test", "n_images": 6, "scores": {"viecap": {"CIDEr": None, "train_minutes": 3.0}}}))
    assert pack_bundle().main(["upgrade", "--out", str(out), "--data", str(scenes_dir)]) == 0
    said = capsys.readouterr().out
    assert "viecap (added entity counts; no edits.json: 12 val images" in said  # the old margin is gone too
    assert not (out / "viecap" / "edits.json").exists()
    config = json.loads((out / "viecap" / "config.json").read_text())["config"]
    vocabulary = EntityVocabulary(config["entities"], config["entity_vocabulary"])
    assert config["entity_counts"] == entity_counts(vocabulary, split_captions(scenes_dir / "train"))[0]
    paths, references, ids = (part[:6] for part in load_split(scenes_dir / "test"))
    captions = caption([str(p) for p in paths], str(out / "viecap"), device="cpu")
    scores = json.loads((out / "bundle.json").read_text())["scores"]["viecap"]
    expected = coco_caption_metrics(dict(zip(ids, captions)), dict(zip(ids, references)), spice=False)["CIDEr"]
    assert scores["CIDEr"] == pytest.approx(expected) and scores["train_minutes"] == 3.0
    assert f"test CIDEr now {expected:.4f}" in said
    # an upgrade that stopped after writing the counts, before scoring, scores them the next time
    info = json.loads((out / "bundle.json").read_text())
    info["scores"]["viecap"]["CIDEr"] = None
    info["unscored"] = info.pop("rescored")  # what upgrade notes before it writes the config
    (out / "bundle.json").write_text(json.dumps(info))
    assert pack_bundle().main(["upgrade", "--out", str(out), "--data", str(scenes_dir)]) == 0
    assert json.loads((out / "bundle.json").read_text())["scores"]["viecap"]["CIDEr"] == pytest.approx(expected)
    assert "viecap (added no edits.json: 12 val images" in capsys.readouterr().out  # not counted again
    # a bundle upgraded before `unscored` was kept (format 3) that counted but did not score: scored now
    saved = json.loads((out / "viecap" / "config.json").read_text())
    (out / "viecap" / "config.json").write_text(json.dumps(dict(saved, format_version=3)))
    info = json.loads((out / "bundle.json").read_text())
    info["scores"]["viecap"]["CIDEr"] = None
    del info["rescored"]
    (out / "bundle.json").write_text(json.dumps(info))
    assert pack_bundle().main(["upgrade", "--out", str(out), "--data", str(scenes_dir)]) == 0
    info = json.loads((out / "bundle.json").read_text())
    assert info["scores"]["viecap"]["CIDEr"] == pytest.approx(expected)
    assert info["rescored"] == {"viecap": ["after `upgrade` gave it its entity counts (synonyms merged)"]}


def test_upgrade_gives_the_bundles_decoders_a_newer_decoding_default_and_scores_them_again(scenes_dir, tmp_path,
                                                                                         capsys):
    """`make bundle` sets no decoding option, so a bundle packed before no_repeat_ngram_size existed gets
    its decoders' default from `upgrade --data` (capdec: 3), its margin chosen again and its scores
    measured again from the image files; without the data to score it, it keeps writing what it wrote.
    An upgrade stopped after writing the config is scored by the next one."""
    import shutil

    from unembed.data.splits import load_split
    from unembed.decoders.capdec import CapDecConfig
    from unembed.eval.metrics import coco_caption_metrics

    out = tmp_path / "bundle"
    for part in ("embedder", "capdec"):
        shutil.copytree(BUNDLE_DIR / part, out / part)
    saved = json.loads((out / "capdec" / "config.json").read_text())
    saved["config"].pop("no_repeat_ngram_size", None)  # as packed before format 4
    (out / "capdec" / "config.json").write_text(json.dumps(dict(saved, format_version=3)))
    manifest_text = json.dumps({
        "format": "unembed-bundle", "default": "capdec", "decoders": ["capdec"], "embedder": "embedder",
        "split": "test", "n_images": 6, "scores": {"capdec": {"CIDEr": None, "train_minutes": 2.5}}})
    (out / "bundle.json").write_text(manifest_text)
    assert pack_bundle().main(["upgrade", "--out", str(out)]) == 0  # no data: it writes what it wrote ...
    unscored = json.loads((out / "capdec" / "config.json").read_text())
    assert unscored["config"]["no_repeat_ngram_size"] == 0 and unscored["format_version"] == 3  # ... still owed it
    assert json.loads((out / "bundle.json").read_text())["scores"]["capdec"]["CIDEr"] is None
    capsys.readouterr()
    assert pack_bundle().main(["upgrade", "--out", str(out), "--data", str(scenes_dir)]) == 0
    said = capsys.readouterr().out
    assert CapDecConfig.no_repeat_ngram_size == 3
    assert "capdec (added no_repeat_ngram_size 3; no edits.json: 12 val images" in said
    assert not (out / "capdec" / "edits.json").exists()  # its margin was chosen on what it wrote before
    assert json.loads((out / "capdec" / "config.json").read_text())["config"]["no_repeat_ngram_size"] == 3
    paths, references, ids = (part[:6] for part in load_split(scenes_dir / "test"))
    captions = caption([str(p) for p in paths], str(out / "capdec"), device="cpu")
    expected = coco_caption_metrics(dict(zip(ids, captions)), dict(zip(ids, references)), spice=False)["CIDEr"]
    info = json.loads((out / "bundle.json").read_text())
    assert info["scores"]["capdec"]["CIDEr"] == pytest.approx(expected) and info["scores"]["capdec"]["train_minutes"] == 2.5
    assert info["rescored"]["capdec"] == ["after `upgrade` gave it no_repeat_ngram_size 3, the default since format 4"]
    assert "unscored" not in info and f"test CIDEr now {expected:.4f}" in said
    # stopped after writing the config (format 4 now), before scoring: the next upgrade scores it
    (out / "bundle.json").write_text(json.dumps(dict(json.loads(manifest_text), unscored=info["rescored"])))
    assert pack_bundle().main(["upgrade", "--out", str(out), "--data", str(scenes_dir)]) == 0
    again = json.loads((out / "bundle.json").read_text())
    assert again["scores"]["capdec"]["CIDEr"] == pytest.approx(expected) and "unscored" not in again
    assert again["rescored"] == info["rescored"]
    assert "capdec (added no edits.json" in capsys.readouterr().out  # not given the option again
    assert pack_bundle().main(["upgrade", "--out", str(out), "--data", str(scenes_dir)]) == 0
    assert "CIDEr now" not in capsys.readouterr().out  # nothing changed: nothing scored again
    assert json.loads((out / "bundle.json").read_text()) == again


def test_the_shipped_viecap_merges_the_scene_synonyms_and_a_call_can_turn_that_off(capsys):
    """README: the bundle's embedder joins each pair of scene synonyms (and nothing else), and
    `unembed caption --decoder viecap --entity-merge 0` captions unmerged, from the image files: the
    demo's blue circle is then a "disc", the rarer word."""
    from unembed.decoders import load_decoder

    decoder = load_decoder(BUNDLE_DIR / "viecap", device="cpu")
    assert decoder.merged_entities() == {"square": ["box"], "circle": ["disc"], "ring": ["hoop"],
                                         "diamond": ["rhombus"]}
    image = str(REPO / "examples" / "scene-0.png")
    said = {}
    for bar in ("0", None):
        assert main(["caption", image, "--decoder", "viecap", "--device", "cpu",
                     *(["--entity-merge", bar] if bar else [])]) == EXIT_OK
        said[bar] = json.loads(capsys.readouterr().out)["caption"]
    assert "disc" in said["0"].split() and "circle" in said[None].split()


def test_the_guides_bundle_table_gives_bundle_json_s_scores():
    """docs/GUIDE.md's table of the bundle's scores is bundle.json's (x100, one decimal), so a bundle
    whose scores are measured again (`pack_bundle.py upgrade`) cannot leave the page behind."""
    import re

    lines = (REPO / "docs" / "GUIDE.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| decoder | BLEU-4 | METEOR | ROUGE-L | CIDEr"))
    rows = {}
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[re.sub(r" \(default\)$", "", cells[0])] = [float(c) for c in cells[1:6]]
    scores = manifest(BUNDLE_DIR)["scores"]
    assert set(rows) == set(scores)
    for name, row in rows.items():
        expected = [round(100 * scores[name][k], 1) for k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "CLIPScore")]
        assert row == expected, name
    # and the sentences on what `upgrade` changed end at the scores it measured
    now = {name: f"{100 * scores[name]['CIDEr']:.1f}" for name in ("capdec", "decap", "viecap")}
    assert all(any("no_repeat_ngram_size 3" in r for r in manifest(BUNDLE_DIR)["rescored"][name]) for name in now)
    readme = " ".join((REPO / "README.md").read_text().split())
    guide = " ".join((REPO / "docs" / "GUIDE.md").read_text().split())
    assert f"CIDEr 192.0 -> {now['capdec']}, 194.4 -> {now['decap']} and 179.1 -> {now['viecap']}" in readme
    assert (f"(capdec 192.0 -> {now['capdec']}, decap 194.4 -> {now['decap']}, viecap 179.1 -> {now['viecap']})"
            in guide)


def test_the_readme_names_the_shipped_decoders_edit_margins():
    """README's list of the shipped margins is what their edits.json files say."""
    margins = [json.loads((BUNDLE_DIR / name / "edits.json").read_text())["margin"]
               for name in ("clipcap", "capdec", "decap", "viecap")]
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"and their margins ({margins[0]:g}, {margins[1]:g}, {margins[2]:g} and {margins[3]:g}, chosen" in readme
