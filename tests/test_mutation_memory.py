"""unembed.memory.TextMemory, checked value by value (written against the mutants `make mutation`
found surviving the rest of the suite): an empty memory, filling (rows normalised, texts copied, the
module's device kept), and the texts file's round trip and errors. Fast: no shared fixture."""
import json

import pytest
import torch

from unembed.errors import ModelLoadError
from unembed.memory import TextMemory


def test_a_new_memory_holds_zero_vectors_and_no_texts():
    memory = TextMemory(3, 4)
    assert memory.texts == [] and isinstance(memory.texts, list)
    assert torch.equal(memory.vectors, torch.zeros(3, 4))
    assert list(memory.state_dict()) == ["vectors"]  # a buffer: saved with the decoder


def test_fill_normalises_each_row_and_copies_the_texts():
    memory = TextMemory(0, 2)
    texts = ("a cat", "a dog")
    memory.fill(texts, torch.tensor([[3.0, 4.0], [0.0, -2.0]], dtype=torch.float64))
    assert memory.texts == ["a cat", "a dog"] and isinstance(memory.texts, list)
    assert memory.vectors.dtype == torch.float32
    assert torch.allclose(memory.vectors, torch.tensor([[0.6, 0.8], [0.0, -1.0]]))


def test_fill_keeps_the_vectors_on_the_memorys_device():
    # A decoder moved to an accelerator fills its memory from CPU vectors: they must follow the
    # module (the "meta" device stands in for an accelerator on a CPU-only machine).
    memory = TextMemory(2, 3).to("meta")
    memory.fill(["a", "b"], torch.ones(2, 3))
    assert memory.vectors.device.type == "meta" and memory.vectors.shape == (2, 3)


def test_texts_round_trip_through_their_file(tmp_path):
    memory = TextMemory(0, 2)
    memory.fill(["un café", "a dog"], torch.eye(2))
    memory.save_texts(tmp_path / "captions.json")
    assert json.loads((tmp_path / "captions.json").read_text(encoding="utf-8")) == ["un café", "a dog"]
    again = TextMemory(2, 2)
    again.load_texts(tmp_path / "captions.json")
    assert again.texts == ["un café", "a dog"]


def test_a_missing_texts_file_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=r"memory_captions\.json is missing: the caption memory's texts"):
        TextMemory(2, 2).load_texts(tmp_path / "memory_captions.json")


def test_texts_that_do_not_match_the_vectors_are_refused_with_both_counts(tmp_path):
    (tmp_path / "captions.json").write_text(json.dumps(["only one"]), encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"captions\.json holds 1 captions but the memory has 3 vectors"):
        TextMemory(3, 2).load_texts(tmp_path / "captions.json")
