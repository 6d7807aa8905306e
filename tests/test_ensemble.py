"""Ensembles (`unembed build ensemble`, unembed/decoders/ensemble.py): several decoders of one embedder
write candidates and the embedder picks among them.

Two capdecs are trained here from the scenes files (seeds 0 and 1, so their candidates differ), made into
an ensemble by the CLI, and captioned from image FILES by the CLI and by `serve`; the captions are
checked against the pick written out by hand: every member's candidates for the same files, each text
embedded on its own, scored by its member's score + RERANK_WEIGHT x logit scale x cosine."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from tests.test_zoo import unembed as run
from unembed.cli import EXIT_FAILED, EXIT_OK
from unembed.decoders import load_decoder
from unembed.decoders.ensemble import EnsembleDecoder, merged_substitutes
from unembed.decoders.rerank import logit_scale
from unembed.errors import BadInputError
from unembed.generation import RERANK_WEIGHT

TINY = ["--max-steps", "3", "--batch-size", "8", "--lm", "scratch", "--tokenizer", "corpus:200", "--device", "cpu",
        "--lm-config", '{"n_layer": 1, "n_embd": 32, "n_head": 2}']


@pytest.fixture(scope="module")
def members(scenes_dir, embedder_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    for seed in (0, 1):
        got = run("train", "capdec", "--embedder", embedder_dir, "--data", scenes_dir, "--seed", seed, *TINY,
                  "--out", root / f"capdec-{seed}")
        assert got.code == EXIT_OK, got.stderr
    return [root / "capdec-0", root / "capdec-1"]


@pytest.fixture(scope="module")
def ensemble(members, tmp_path_factory):
    out = tmp_path_factory.mktemp("ensemble") / "capdecs"
    got = run("build", "ensemble", "--member", members[0], "--member", members[1], "--out", out, "--device", "cpu")
    assert got.code == EXIT_OK, got.stderr
    assert got.stderr.strip().splitlines()[-1] == f"ensemble of 2 decoders (capdec, capdec) saved to {out}"
    return out


@pytest.fixture(scope="module")
def files(scenes_dir):
    return sorted((scenes_dir / "test" / "images").glob("*.png"))[:6]


def picked_by_hand(members, embedder, files, n):
    """Each file's caption: the members' first n candidates pooled (each text once, its best score), the
    highest member score + RERANK_WEIGHT x logit scale x cosine, the first on a tie."""
    from PIL import Image

    embedded = embedder.embed([Image.open(f).convert("RGB") for f in files], [f.stem for f in files])
    loaded = [load_decoder(m, device="cpu", embedder=embedder) for m in members]
    rows = [[] for _ in files]
    for member in loaded:
        for row, theirs in zip(rows, member.candidates(embedded, n)):
            row.extend(theirs[:n])
    if n == 1:  # each member's one candidate is its own caption
        for i, member in enumerate(loaded):
            assert [row[i][0] for row in rows] == member.decode(embedded)
    picks = []
    for i, row in enumerate(rows):
        best: dict[str, float] = {}
        for text, score in row:
            best[text] = max(score, best.get(text, float("-inf")))
        target = F.normalize(embedded.vectors[i].float(), dim=-1)
        total = {text: score + RERANK_WEIGHT * logit_scale(embedder) *
                 float(F.normalize(embedder.embed_texts([text]).float(), dim=-1)[0] @ target)
                 for text, score in best.items()}
        picks.append(max(total, key=total.get))  # max keeps the first of equal totals
    return picks


def cli_captions(decoder, files, *options):
    got = run("caption", *files, "--decoder", decoder, "--device", "cpu", *options)
    assert got.code == EXIT_OK, got.stderr
    return [json.loads(line)["caption"] for line in got.stdout.splitlines()]


@pytest.mark.parametrize("rerank", [1, 4])
def test_the_ensemble_captions_image_files_as_its_members_candidates_picked_by_hand(ensemble, members, embedder,
                                                                                   files, rerank):
    options = ["--rerank", str(rerank)] if rerank > 1 else []
    captions = cli_captions(ensemble, files, *options)
    assert captions == picked_by_hand(members, embedder, files, rerank)
    own = [cli_captions(m, files, *options) for m in members]
    assert own[0] != own[1]  # the members differ, so the pool is more than either
    assert all(c in own[0] or c in own[1] for c in captions) or rerank > 1


def test_the_ensemble_is_saved_whole_and_captions_the_same_when_moved(ensemble, members, files, tmp_path):
    from unembed.io import load_tensors

    for i, member in enumerate(members):
        copy = ensemble / "members" / str(i)
        assert json.loads((copy / "config.json").read_text())["config"] == \
            json.loads((member / "config.json").read_text())["config"]
        theirs, ours = load_tensors(member / "model.safetensors")[0], load_tensors(copy / "model.safetensors")[0]
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    moved = tmp_path / "moved"
    shutil.copytree(ensemble, moved)
    assert cli_captions(moved, files, "--rerank", "3", "--edits", "1") == \
        cli_captions(ensemble, files, "--rerank", "3", "--edits", "1")


def test_edits_use_every_members_substitutes_at_the_largest_margin(members, embedder):
    loaded = [load_decoder(m, device="cpu", embedder=embedder) for m in members]
    loaded[0].substitutes, loaded[1].substitutes = {"red": ["blue", "green"]}, {"red": ["green", "white"], "big": ["small"]}
    loaded[0].edit_margin_record = {"margin": 1.0}
    loaded[1].edit_margin_record = {"margin": 2.5}
    built = EnsembleDecoder.build(loaded)
    assert built.substitutes == {"red": ["blue", "green", "white"], "big": ["small"]}
    assert built.edit_margin == 2.5
    loaded[1].edit_margin_record = {"margin": "off"}  # a member whose val said edits hurt: off for all
    assert EnsembleDecoder.build(loaded).edit_margin == float("inf")
    assert merged_substitutes([{}, {}]) == {}


def test_serve_answers_with_the_ensembles_caption(ensemble, files):
    import httpx

    from tests.test_serve import Server, post_image

    expected = cli_captions(ensemble, files[:3])
    server = Server(decoders=[str(ensemble)])
    try:
        got = [post_image(server.url, f) for f in files[:3]]
        assert [r.status_code for r in got] == [200, 200, 200], got[0].text
        assert [r.json()[0]["caption"] for r in got] == expected
        assert [d["kind"] for d in httpx.get(f"{server.url}/decoders").json()] == ["ensemble"]
    finally:
        server.stop()


def test_bad_members_and_options_are_refused_in_one_line(ensemble, members, embedder_dir, files, tmp_path):
    out = tmp_path / "out"
    one = run("build", "ensemble", "--member", members[0], "--out", out, "--device", "cpu")
    assert one.code == EXIT_FAILED and one.stderr.strip().splitlines() == [
        "unembed: --member: an ensemble needs at least two decoders (got 1)"]
    assert not out.exists()
    twice = run("build", "ensemble", "--member", members[0], "--member", f"{members[0]}/", "--out", out)
    assert twice.code == EXIT_FAILED and twice.stderr.strip().splitlines() == [
        f"unembed: {members[0]}/: is given twice: an ensemble of a decoder with itself pools the same candidates"]
    assert not out.exists()
    missing = run("build", "ensemble", "--member", members[0], "--member", tmp_path / "nowhere", "--out", out)
    assert missing.code == EXIT_FAILED and len(missing.stderr.strip().splitlines()) == 1
    assert str(tmp_path / "nowhere") in missing.stderr and not out.exists()
    other = tmp_path / "other-embedder"
    shutil.copytree(members[1], other)
    config = json.loads((other / "config.json").read_text())
    config["config"]["embedder_id"] = "another-clip-000000000000"
    (other / "config.json").write_text(json.dumps(config))
    mixed = run("build", "ensemble", "--member", members[0], "--member", other, "--out", out, "--device", "cpu")
    assert mixed.code == EXIT_FAILED and len(mixed.stderr.strip().splitlines()) == 1
    assert str(other) in mixed.stderr and "another-clip-000000000000" in mixed.stderr and not out.exists()

    wrong = run("caption", files[0], "--decoder", ensemble, "--device", "cpu", "--entity-merge", "0.5")
    assert wrong.code == EXIT_FAILED and wrong.stderr.strip().splitlines() == [
        "unembed: option entity_merge: no member of this ensemble takes it (members: capdec, capdec)"]
    damaged = tmp_path / "damaged"
    shutil.copytree(ensemble, damaged)
    shutil.rmtree(damaged / "members" / "1")
    broken = run("caption", files[0], "--decoder", damaged, "--device", "cpu")
    assert broken.code == EXIT_FAILED and broken.stderr.strip().splitlines() == [
        f"unembed: {damaged}/members/1 is missing: one of the ensemble's members"]


def test_a_corrector_or_candidates_on_another_scale_make_no_member(embedder, scenes_dir, retrieval_dir, tmp_path):
    from unembed.data.splits import split_captions
    from unembed.decoders import decoder_class

    captions = split_captions(scenes_dir / "train")
    capdec = decoder_class("capdec").example(embedder, captions, tmp_path)
    corrector = decoder_class("corrector").example(embedder, captions, tmp_path)
    with pytest.raises(BadInputError) as caught:
        EnsembleDecoder.build([capdec, corrector])
    assert str(caught.value) == ("corrector: an ensemble pools decoders of embedding vectors that write candidates, "
                                 "and a corrector decoder is not one")
    # retrieval scores a cosine near 1, an LM a log-probability below 0: pooled as they are, one would
    # decide every pick
    retrieval = load_decoder(retrieval_dir, device="cpu", embedder=embedder)
    with pytest.raises(BadInputError) as caught:
        EnsembleDecoder.build([capdec, retrieval])
    assert str(caught.value) == (f"{retrieval_dir}: a retrieval decoder scores its candidates by cosine with the "
                                 "input, the first member (capdec) by mean token log-probability: an ensemble's "
                                 "members score on one scale")


def test_a_damaged_ensemble_is_refused_in_one_line_naming_what(ensemble, files, tmp_path):
    def damaged(name, change):
        copy = tmp_path / name
        shutil.copytree(ensemble, copy)
        change(copy)
        got = run("caption", files[0], "--decoder", copy, "--device", "cpu")
        assert got.code == EXIT_FAILED, got.stderr
        return got.stderr.strip().splitlines(), copy

    def config(copy, path, **values):
        saved = json.loads((copy / path).read_text())
        saved["config"].update(values) if "member_kinds" in values else saved.update(values)
        (copy / path).write_text(json.dumps(saved))

    for name, kinds in (("none", None), ("number", 5), ("one", ["capdec"]), ("numbers", [1, 2])):
        lines, copy = damaged(name, lambda c: config(c, "config.json", member_kinds=kinds))
        assert lines == [f"unembed: {copy}/config.json: an ensemble's member_kinds is a list of at least two "
                         f"decoder kinds (got {kinds!r})"]
    lines, copy = damaged("listed", lambda c: config(c, "config.json", member_kinds=["capdec", "viecap"]))
    assert lines == [f"unembed: {copy}/members/1 is a capdec decoder, but the ensemble's config.json lists a viecap "
                     "there"]
    lines, copy = damaged("unknown", lambda c: config(c, "members/1/config.json", kind="nonesuch"))
    assert len(lines) == 1 and lines[0].startswith(f"unembed: {copy}/members/1: unknown decoder kind 'nonesuch'")


def test_an_ensemble_of_the_bundled_text_only_decoders_names_no_folder_of_this_machine(files, tmp_path):
    """The README's command: the bundled capdec and viecap (which name their embedder "../embedder",
    beside themselves) as one ensemble that names the bundle's embedder by name."""
    out = tmp_path / "text-only"
    got = run("build", "ensemble", "--member", "capdec", "--member", "viecap", "--out", out, "--device", "cpu")
    assert got.code == EXIT_OK, got.stderr
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["embedder_spec"] == "bundle" and config["member_kinds"] == ["capdec", "viecap"]
    assert "base_model" not in (out / "README.md").read_text()  # "bundle" is no hub repo
    moved = tmp_path / "elsewhere" / "text-only"
    shutil.move(out, moved)
    captions = cli_captions(moved, files[:2], "--rerank", "4")
    assert len(captions) == 2 and all(captions)


def test_compare_reads_an_ensemble_beside_its_members(ensemble, members, scenes_dir, embedder_dir, tmp_path):
    out = tmp_path / "compare"
    got = run("compare", "--data", scenes_dir, "--decoders", f"both={ensemble},first={members[0]}", "--embedder",
              embedder_dir, "--out", out, "--no-spice", "--no-meteor", "--no-gap", "--max-images", "4",
              "--device", "cpu")
    assert got.code == EXIT_OK, got.stderr
    rows = {d["name"]: d for d in json.loads((out / "compare.json").read_text())["decoders"]}
    assert rows["both"]["kind"] == "ensemble" and rows["both"]["error"] is None and rows["first"]["error"] is None


def test_the_embedder_given_or_a_relative_directory_is_saved_as_a_path_that_works_anywhere(members, embedder_dir,
                                                                                          files, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(embedder_dir, tmp_path / "clip")
    for name, options in (("given", ["--embedder", "clip"]), ("first", [])):
        got = run("build", "ensemble", "--member", members[0], "--member", members[1], "--out", name, *options)
        assert got.code == EXIT_OK, got.stderr
    given = json.loads((tmp_path / "given" / "config.json").read_text())["config"]["embedder_spec"]
    assert given == str((tmp_path / "clip").resolve())  # the directory named, absolute: captions from any cwd
    first = json.loads((members[0] / "config.json").read_text())["config"]["embedder_spec"]
    assert json.loads((tmp_path / "first" / "config.json").read_text())["config"]["embedder_spec"] == first
    monkeypatch.chdir(files[0].parent)
    assert cli_captions(tmp_path / "given", files[:2]) == cli_captions(tmp_path / "first", files[:2])


def test_overwrite_leaves_nothing_of_the_decoder_it_replaces(members, tmp_path):
    out = tmp_path / "was-capdec"
    shutil.copytree(members[0], out)
    got = run("build", "ensemble", "--member", members[0], "--member", members[1], "--out", out, "--overwrite")
    assert got.code == EXIT_OK, got.stderr
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "members", "substitutes.json"]


def test_each_member_checks_the_options_its_own_files_decide(files, tmp_path):
    """viecap refuses entity_merge where it changes nothing (no hard prompt); inside an ensemble too."""
    from unembed.bundle import bundled_decoder

    viecap = tmp_path / "viecap-no-prompt"
    shutil.copytree(bundled_decoder("viecap"), viecap)
    config = json.loads((viecap / "config.json").read_text())
    config["config"]["hard_prompt"] = False
    (viecap / "config.json").write_text(json.dumps(config))
    out = tmp_path / "both"
    got = run("build", "ensemble", "--member", "capdec", "--member", viecap, "--embedder", "bundle", "--out", out)
    assert got.code == EXIT_OK, got.stderr
    refused = run("caption", files[0], "--decoder", out, "--device", "cpu", "--entity-merge", "0.5")
    assert refused.code == EXIT_FAILED and refused.stderr.strip().splitlines() == [
        "unembed: option entity_merge: changes nothing: this viecap decoder has no hard prompt (trained with "
        "--no-hard-prompt)"]
    assert len(cli_captions(out, files[:1], "--num-beams", "2")) == 1
