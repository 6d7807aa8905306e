"""The decoder interface, tested over every registered decoder kind where it applies."""
import json

import pytest
import torch

from unembed.decoders import create_decoder, list_decoders, load_decoder
from unembed.embedders import Embedded
from unembed.errors import MismatchError, ModelLoadError, UnsafeFileError


def _image_embedded(embedder, scenes_dir, n=6):
    from PIL import Image

    paths = sorted((scenes_dir / "test" / "images").glob("*.png"))[:n]
    return embedder.embed([Image.open(p).convert("RGB") for p in paths], [p.stem for p in paths])


def test_registry_lists_and_creates():
    assert "retrieval" in list_decoders()
    d = create_decoder("retrieval", embed_dim=8, memory_size=3)
    assert d.kind == "retrieval" and d.memory.vectors.shape == (3, 8)
    with pytest.raises(ModelLoadError, match="unknown decoder kind 'nope'"):
        create_decoder("nope")


def test_retrieval_returns_the_nearest_caption(embedder):
    from unembed.decoders.retrieval import RetrievalDecoder

    captions = ["a red circle", "two blue squares", "a yellow star above a green heart"]
    decoder = RetrievalDecoder.build(embedder, captions + ["a red circle"])
    assert decoder.config.memory_size == 3  # duplicates dropped
    # Each caption's own text embedding must retrieve itself.
    queries = Embedded(embedder.embed_texts(captions), ["0", "1", "2"], embedder.id, embedder.spec, "text")
    assert decoder.decode(queries) == captions


def test_save_load_round_trip_gives_identical_captions(retrieval_dir, embedder, scenes_dir, tmp_path):
    decoder = load_decoder(retrieval_dir, embedder=embedder)
    embedded = _image_embedded(embedder, scenes_dir)
    first = decoder.decode(embedded)
    decoder.save(tmp_path / "again")
    assert load_decoder(tmp_path / "again").decode(embedded) == first
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["kind"] == "retrieval" and saved["config"]["embedder_id"] == embedder.id
    assert saved["config"]["embed_dim"] == embedder.dim


def test_mismatched_embedder_and_dimension_are_refused(retrieval_dir, embedder):
    decoder = load_decoder(retrieval_dir)
    other = Embedded(torch.nn.functional.normalize(torch.randn(2, embedder.dim), dim=-1), ["a", "b"],
                     "someone-else", "ViT-B-32:openai")
    with pytest.raises(MismatchError, match="ViT-B-32:openai"):
        decoder.decode(other)
    wrong_dim = Embedded(torch.randn(2, embedder.dim + 1), ["a", "b"], "", "")
    with pytest.raises(MismatchError, match=f"expects {embedder.dim}-d"):
        decoder.decode(wrong_dim)
    from unembed.embedders import Embedder

    rn50 = Embedder.from_spec("RN50", device="cpu")
    with pytest.raises(MismatchError, match="RN50"):
        load_decoder(retrieval_dir, embedder=rn50)


def test_bad_configs_are_refused_before_weights_load(retrieval_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(retrieval_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(config, kind="no-such-kind")))
    (bad / "model.safetensors").write_bytes(b"\x80\x04 would be a pickle")  # must never be opened
    with pytest.raises(ModelLoadError, match="unknown decoder kind 'no-such-kind'"):
        load_decoder(bad)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsafeFileError):
        load_decoder(bad)
    with pytest.raises(ModelLoadError, match="not a decoder directory"):
        load_decoder(tmp_path / "missing")


# What each method needs, by its paper: (decodes from image tokens, made from captions alone, decodes
# with the embedder's own towers). The CLI, compare and the trainers act on these declarations.
NEEDS = {"retrieval": (False, True, False), "clipcap": (False, False, False), "capdec": (False, True, False),
         "decap": (False, True, False), "viecap": (False, True, False), "iterative": (False, True, True),
         "coca": (True, False, True), "corrector": (False, True, True), "ensemble": (False, False, True)}


@pytest.mark.parametrize("kind", list_decoders())
def test_every_decoder_declares_its_needs(kind):
    from unembed.decoders import decoder_class

    cls = decoder_class(kind)
    assert kind in NEEDS, f"add the new decoder {kind!r} to NEEDS with what its method needs"
    assert cls.kind == kind and (cls.needs_tokens, cls.text_only, cls.needs_embedder) == NEEDS[kind]


def test_decap_projection_in_chunks_equals_the_whole_matrix():
    from unembed.memory import TextMemory

    torch.manual_seed(0)
    memory = TextMemory(500, 16)
    memory.fill([str(i) for i in range(500)], torch.randn(500, 16))
    queries = torch.randn(37, 16)
    q = torch.nn.functional.normalize(queries, dim=-1)
    whole = torch.nn.functional.normalize(torch.softmax(q @ memory.vectors.T / 0.01, dim=-1) @ memory.vectors, dim=-1)
    for budget in (500, 500 * 5, 10 ** 9):  # one query at a time, chunks of 5 (the last one short), all at once
        # equal up to fp32 rounding (a one-row product takes another kernel than a many-row one)
        torch.testing.assert_close(memory.project(queries, 0.01, budget=budget), whole, atol=2e-5, rtol=1e-4)
