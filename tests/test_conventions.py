"""Hugging Face conventions beside unembed's own: from_pretrained / save_pretrained for decoders and
embedders, by every name load_decoder takes; one device default (auto) everywhere."""
import inspect

import pytest

from unembed.errors import MismatchError


def test_decoders_and_embedders_load_and_save_by_hf_names(tmp_path):
    from unembed.decoders import Decoder, load_decoder
    from unembed.decoders.clipcap import ClipCapDecoder
    from unembed.decoders.retrieval import RetrievalDecoder
    from unembed.embedders import Embedder

    retrieval = Decoder.from_pretrained("retrieval")  # a bundle name
    assert retrieval.kind == "retrieval" and isinstance(retrieval, RetrievalDecoder)
    assert ClipCapDecoder.from_pretrained("clipcap").kind == "clipcap"
    with pytest.raises(MismatchError, match="is a retrieval decoder, not a clipcap one"):
        ClipCapDecoder.from_pretrained("retrieval")
    retrieval.save_pretrained(tmp_path / "r")
    assert load_decoder(tmp_path / "r").memory.texts == retrieval.memory.texts
    embedder = Embedder.from_pretrained("bundle")
    embedder.save_pretrained(tmp_path / "e")
    assert Embedder.from_pretrained(str(tmp_path / "e")).id == embedder.id


def test_one_device_default():
    from unembed.decoders import load_decoder
    from unembed.embedders import Embedder, load_embedder
    from unembed.pipeline import caption

    for fn in (load_decoder, load_embedder, caption, Embedder.from_spec, Embedder.from_pretrained):
        assert inspect.signature(fn).parameters["device"].default == "auto", fn.__name__
