"""Word edits for every decoder (`--edits N`, unembed/decoders/edits.py): one-word rewrites of the caption,
kept when the embedder prefers them by the margin.

The pick is checked against a hand computation: every rewrite embedded on its own, its cosine with the
input, kept only if logit scale x the gain beats the margin. The CLI path trains a decoder from caption
files and captions an image file with it."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from tests.test_loop import images
from unembed.cli import EXIT_FAILED, EXIT_OK, main
from unembed.data.splits import split_captions
from unembed.decoders import decoder_class, list_decoders, load_decoder
from unembed.decoders.edits import substituted, substitutes
from unembed.decoders.rerank import logit_scale
from unembed.errors import BadInputError


def edited_by_hand(embedder, embedded, captions, table, margin):
    """One round of edits, each rewrite embedded alone."""
    targets = F.normalize(embedded.vectors.float(), dim=-1)
    scale = logit_scale(embedder)

    def cosine(caption, i):
        return float(F.normalize(embedder.embed_texts([caption]).float(), dim=-1)[0] @ targets[i])

    out = []
    for i, before in enumerate(captions):
        options = substituted(before, table)
        best = max(options, key=lambda c: cosine(c, i)) if options else before
        gain = scale * (cosine(best, i) - cosine(before, i))
        out.append(best if gain > margin + 1e-6 else before)
    return out


def test_substitutes_rank_by_shared_places_then_by_word_and_need_three():
    """The table is a function of the captions alone: equal counts go by the word (not by the hash order
    of the sets they are counted in, which differs between processes), at most SUBSTITUTES a word, and
    a word sharing fewer than SHARED_CONTEXTS places with another does not stand in for it."""
    from unembed.decoders.edits import SHARED_CONTEXTS, SUBSTITUTES

    colours = [f"c{i:02d}" for i in range(SUBSTITUTES + 4)][::-1]  # more than fit, given in reverse order
    places = ["a {} ring", "the {} ring", "one {} disc"]
    captions = [place.format(c) for c in colours for place in places] + ["a rare ring", "the rare ring"]
    table = substitutes(captions)
    assert len(places) >= SHARED_CONTEXTS == 3
    assert table["c00"] == sorted(c for c in colours if c != "c00")[:SUBSTITUTES]
    assert table["c15"] == sorted(c for c in colours if c != "c15")[:SUBSTITUTES]
    assert "rare" not in table["c00"] and "rare" not in table  # two shared places: not a substitute


@pytest.mark.parametrize("kind", [k for k in list_decoders() if k != "corrector"])
def test_every_kind_edits_its_caption_as_the_embedder_prefers(kind, embedder, scenes_dir, tmp_path):
    cls = decoder_class(kind)
    torch.manual_seed(0)
    captions = split_captions(scenes_dir / "train")
    decoder = cls.example(embedder, captions, tmp_path)
    own = decoder.embedder if cls.needs_embedder else embedder
    decoder.attach_embedder(own)
    decoder.substitutes = substitutes(captions)
    embedded = images(scenes_dir, own, cls.needs_tokens, n=4)
    for rerank in (1, 3):
        plain = decoder.decode(embedded, rerank=rerank)
        for margin in (0.0, 0.5):
            got = decoder.decode(embedded, rerank=rerank, edits=1, margin=margin)
            assert got == edited_by_hand(own, embedded, plain, decoder.substitutes, margin), (kind, rerank, margin)


def test_more_rounds_never_move_a_caption_away_from_the_input(embedder, scenes_dir, tmp_path):
    captions = split_captions(scenes_dir / "train")
    decoder = decoder_class("retrieval").example(embedder, captions, tmp_path)  # real captions to edit
    decoder.attach_embedder(embedder)
    decoder.substitutes = substitutes(captions)
    embedded = images(scenes_dir, embedder, n=4)
    targets = F.normalize(embedded.vectors.float(), dim=-1)

    def cosines(texts):
        return (F.normalize(embedder.embed_texts(texts).float(), dim=-1) * targets).sum(-1)

    previous, changed = cosines(decoder.decode(embedded)), False
    for rounds in (1, 2, 3):
        got = decoder.decode(embedded, edits=rounds, margin=0.0)
        now = cosines(got)
        assert (now >= previous - 1e-6).all()
        changed |= bool((now > previous + 1e-6).any())
        previous = now
    assert changed  # the fixture's captions leave edits something to do


def test_edits_need_substitutes_and_a_margin_needs_edits(embedder, scenes_dir, tmp_path):
    decoder = decoder_class("capdec").example(embedder, split_captions(scenes_dir / "train"), tmp_path)
    decoder.attach_embedder(embedder)
    embedded = images(scenes_dir, embedder)
    with pytest.raises(BadInputError) as caught:
        decoder.decode(embedded, edits=1)
    assert str(caught.value) == ("option edits: this capdec decoder has no word substitutes (substitutes.json, "
                                 "which unembed writes when it trains capdec, clipcap, decap, viecap on captions)")
    decoder.substitutes = {"red": ["blue"]}
    with pytest.raises(BadInputError) as caught:
        decoder.decode(embedded, margin=0.5)
    assert str(caught.value) == "option margin: the capdec decoder uses it only with edits above 0 (--edits N; edits=N)"


def test_a_trained_decoder_keeps_its_substitutes_and_edits_from_an_image_file(scenes_dir, embedder_dir, embedder,
                                                                              tmp_path, capsys):
    from tests.test_zoo import unembed as run

    out = tmp_path / "capdec"
    recombine = ["--recombine", "colours"]  # the substitutes come from the captions, not from their copies
    assert main(["train", "capdec", "--embedder", str(embedder_dir), "--data", str(scenes_dir), "--device", "cpu",
                 "--max-steps", "2", "--batch-size", "8", "--lm", "scratch", "--tokenizer", "corpus:200",
                 "--lm-config", '{"n_layer": 1, "n_embd": 32, "n_head": 2}', "--out", str(out), *recombine]) == EXIT_OK
    capsys.readouterr()
    table = json.loads((out / "substitutes.json").read_text())
    assert table == substitutes(split_captions(scenes_dir / "train")) and table
    image = sorted((scenes_dir / "test" / "images").glob("*.png"))[0]
    got = run("caption", image, "--decoder", out, "--device", "cpu", "--edits", "2", "--margin", "0")
    assert got.code == EXIT_OK, got.stderr
    decoder = load_decoder(out, device="cpu", embedder=embedder)
    assert decoder.substitutes == table
    from PIL import Image

    embedded = embedder.embed([Image.open(image).convert("RGB")], [image.stem])
    assert json.loads(got.stdout.splitlines()[0])["caption"] == decoder.decode(embedded, edits=2, margin=0.0)[0]
    earlier = tmp_path / "earlier.jsonl"
    earlier.write_text("kept\n")
    (out / "substitutes.json").unlink()  # refused before any image is read or --out is touched
    missing = run("caption", image, "--decoder", out, "--device", "cpu", "--edits", "1", "--out", earlier)
    assert missing.code == EXIT_FAILED and missing.stderr.strip().splitlines()[-1] == (
        "unembed: option edits: this capdec decoder has no word substitutes (substitutes.json, which unembed "
        "writes when it trains capdec, clipcap, decap, viecap on captions)")
    assert earlier.read_text() == "kept\n"
    (out / "substitutes.json").write_text('{"red": "blue"}')
    damaged = run("caption", image, "--decoder", out, "--device", "cpu", "--edits", "1")
    assert damaged.code == EXIT_FAILED and damaged.stderr.strip().splitlines()[-1] == (
        f"unembed: {out}/substitutes.json: not an object of word -> list of substitute words")


def test_one_round_at_every_margin_from_one_pass_is_one_round_at_each(embedder, scenes_dir, tmp_path):
    """one_round_by_margin (how a decoder chooses its margin on val) keeps at each margin what one
    round of edits at that margin keeps, and embeds each distinct text once for all margins."""
    from unembed.decoders.edits import MARGIN_GRID, one_round_by_margin

    captions = split_captions(scenes_dir / "train")
    decoder = decoder_class("retrieval").example(embedder, captions, tmp_path)
    decoder.attach_embedder(embedder)
    decoder.substitutes = substitutes(captions)
    embedded = images(scenes_dir, embedder, n=4)
    plain = decoder.decode(embedded)
    before = embedder.texts_embedded
    by_margin = one_round_by_margin(embedder, embedded.unit(), plain, decoder.substitutes, (0.0, *MARGIN_GRID))
    distinct = {c for c in plain} | {s for c in plain for s in substituted(c, decoder.substitutes)}
    assert embedder.texts_embedded - before <= len(distinct)
    for margin, got in by_margin.items():
        assert got == edited_by_hand(embedder, embedded, plain, decoder.substitutes, margin), margin
    assert by_margin[0.0] != plain  # something to keep at margin 0, so the comparison means something


def test_the_margin_with_the_best_val_score_is_chosen_and_a_tie_goes_to_the_larger():
    from unembed.decoders.edits import OFF, chosen_margin, margin_record

    assert chosen_margin({0.5: 1.0, 1.0: 1.2, 2.0: 1.1, OFF: 1.15}) == 1.0
    assert chosen_margin({0.5: 1.2, 1.0: 1.2, OFF: 1.0}) == 1.0
    assert chosen_margin({1.0: 1.1, 2.0: 1.1, OFF: 1.1}) == OFF
    assert margin_record(OFF, {1.0: 1.0, OFF: 1.1}) == {"margin": "off", "chosen_by": "val CIDEr after one round of "
                                                        "edits", "val_CIDEr": {"1.0": 1.0, "off": 1.1}}


def test_a_decoder_trained_with_val_images_edits_at_the_margin_it_chose_there(scenes_dir, embedder_dir, embedder,
                                                                            tmp_path, capsys, monkeypatch):
    """Training on --data with a val split of images chooses the margin on val (edits.json, metrics.json),
    and `--edits 1` without --margin uses it: from an image file, the same caption as with --margin set
    to it; a damaged edits.json is refused in one line. Too few val images choose none, and a decoder
    trained again into the same folder keeps no margin chosen for its old weights."""
    from tests.test_zoo import unembed as run
    from unembed.decoders.edits import MARGIN_GRID, OFF, chosen_margin, margin_record
    from unembed.training import prefix

    out = tmp_path / "capdec"
    train = ["train", "capdec", "--embedder", str(embedder_dir), "--data", str(scenes_dir), "--device", "cpu",
             "--max-steps", "2", "--batch-size", "8"]
    monkeypatch.setattr(prefix, "MIN_MARGIN_IMAGES", 1)  # the 12 val images stand in for a real val split
    assert main([*train, "--lm", "scratch", "--tokenizer", "corpus:200",
                 "--lm-config", '{"n_layer": 1, "n_embd": 32, "n_head": 2}', "--out", str(out)]) == EXIT_OK
    capsys.readouterr()
    record = json.loads((out / "edits.json").read_text())
    scores = {OFF if m == "off" else float(m): v for m, v in record["val_CIDEr"].items()}
    assert set(scores) == {*MARGIN_GRID, OFF}
    chosen = chosen_margin(scores)
    assert record["margin"] == ("off" if chosen == OFF else chosen)
    assert json.loads((out / "metrics.json").read_text())["edit_margin"] == record["margin"]
    decoder = load_decoder(out, device="cpu", embedder=embedder)
    assert decoder.edit_margin == chosen
    decoder.save(tmp_path / "again")  # a saved decoder keeps its choice
    assert json.loads((tmp_path / "again" / "edits.json").read_text()) == record
    image = sorted((scenes_dir / "test" / "images").glob("*.png"))[0]
    from PIL import Image

    embedded = embedder.embed([Image.open(image).convert("RGB")], [image.stem])
    own = run("caption", image, "--decoder", out, "--device", "cpu", "--edits", "1")
    assert own.code == EXIT_OK, own.stderr
    expected = decoder.decode(embedded) if chosen == OFF else decoder.decode(embedded, edits=1, margin=chosen)
    assert json.loads(own.stdout)["caption"] == expected[0]
    # a chosen margin of 0 (this tiny decoder's val may choose "off", which keeps every caption)
    decoder.edit_margin_record = margin_record(0.0, scores)
    decoder.save(tmp_path / "zero")
    zero = run("caption", *images_of(scenes_dir), "--decoder", tmp_path / "zero", "--device", "cpu", "--edits", "1")
    given = run("caption", *images_of(scenes_dir), "--decoder", tmp_path / "zero", "--device", "cpu", "--edits", "1",
                "--margin", "0")
    plain = run("caption", *images_of(scenes_dir), "--decoder", tmp_path / "zero", "--device", "cpu")
    one = run("caption", *images_of(scenes_dir), "--decoder", tmp_path / "zero", "--device", "cpu", "--edits", "1",
              "--margin", "1")
    assert zero.code == given.code == plain.code == one.code == EXIT_OK
    captions = [[json.loads(line)["caption"] for line in got.stdout.splitlines()] for got in (zero, given, plain, one)]
    assert captions[0] == captions[1] != captions[2] and captions[0] != captions[3]  # not the default margin 1
    monkeypatch.undo()  # 12 val images are too few: trained again, the folder has no margin
    again = tmp_path / "again-trained"
    shutil.copytree(out, again)
    assert main([*train, "--init", str(out), "--out", str(again), "--overwrite"]) == EXIT_OK
    capsys.readouterr()
    assert not (again / "edits.json").exists() and load_decoder(again, device="cpu", embedder=embedder).edit_margin is None
    assert json.loads((again / "metrics.json").read_text())["calibration"] == (
        "not run: 12 val images; the edit margin is chosen on at least 100 (it stays the default)")
    (out / "edits.json").write_text('{"margin": "wide"}')
    damaged = run("caption", image, "--decoder", out, "--device", "cpu", "--edits", "1")
    assert damaged.code == EXIT_FAILED and damaged.stderr.strip().splitlines()[-1] == (
        f'unembed: {out}/edits.json: its margin must be a number from 0 to 100 or "off"')


def images_of(scenes_dir, n: int = 8) -> list:
    return sorted((scenes_dir / "test" / "images").glob("*.png"))[:n]


def test_a_decoder_trained_further_keeps_its_earlier_substitutes_after_the_new_ones(scenes_dir, embedder_dir,
                                                                                   tmp_path, capsys):
    """`--init` on other captions: the table is the new captions' (`substitutes`), each word's earlier
    substitutes after its new ones, at most SUBSTITUTES; words only the earlier captions had stay."""
    from unembed.decoders.edits import SUBSTITUTES, with_earlier

    assert with_earlier({"red": ["blue", "green"]}, {"red": ["green", "pink"], "ring": ["disc"]}) == \
        {"red": ["blue", "green", "pink"], "ring": ["disc"]}
    assert len(with_earlier({"a": [f"n{i}" for i in range(SUBSTITUTES)]}, {"a": ["old"]})["a"]) == SUBSTITUTES
    first, further = tmp_path / "first", tmp_path / "further"
    other = tmp_path / "other.txt"
    other.write_text("".join(f"{a} {c} {s}\n" for a in ("one", "a", "the", "some") for c in ("teal", "mauve", "red")
                             for s in ("kite", "boat")))
    common = ["--embedder", str(embedder_dir), "--device", "cpu", "--max-steps", "1", "--batch-size", "8"]
    assert main(["train", "capdec", *common, "--captions", str(scenes_dir / "train" / "captions.json"),
                 "--out", str(first), "--lm", "scratch", "--tokenizer", "corpus:200",
                 "--lm-config", '{"n_layer": 1, "n_embd": 32, "n_head": 2}']) == EXIT_OK
    assert main(["train", "capdec", *common, "--captions", str(other), "--out", str(further), "--init", str(first)]) == EXIT_OK
    capsys.readouterr()
    earlier = json.loads((first / "substitutes.json").read_text())
    now = substitutes(other.read_text().splitlines())
    assert "teal" in now["red"] and "teal" not in earlier.get("red", [])
    assert json.loads((further / "substitutes.json").read_text()) == with_earlier(now, earlier)
