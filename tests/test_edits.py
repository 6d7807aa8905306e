"""Word edits for every decoder (`--edits N`, unembed/decoders/edits.py): one-word rewrites of the caption,
kept when the embedder prefers them by the margin.

The pick is checked against a hand computation: every rewrite embedded on its own, its cosine with the
input, kept only if logit scale x the gain beats the margin. The CLI path trains a decoder from caption
files and captions an image file with it."""
import json

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
