"""unembed.tokenizers checked value by value (written against the mutants `make mutation` found surviving
the rest of the suite): caption encoding and padding, the corpus BPE (specials, normalisation, vocabulary
bound, canonical ids, saving), open_clip's CLIP BPE, a Hugging Face tokenizer built here offline, and which
tokenizer a config names. Fast: each test learns its own 60-token BPE (tens of milliseconds), so that
mutmut, which runs only the tests that call a function, runs every test that checks the learning; the tiny
HF tokenizer is written once per module (building it calls nothing of unembed's)."""
import json
from types import SimpleNamespace

import pytest
import torch

from unembed.errors import ModelLoadError
from unembed.tokenizers import (ClipBpeTokenizer, CorpusTokenizer, HFTokenizer, encode_captions, make_tokenizer,
                                pad_right)

CAPTIONS = ["a red circle left of a blue square", "two green hearts on a noisy background",
            "a small yellow star above a big red circle", "three blue squares in a row"] * 5


class Chars:
    """A tokenizer whose ids are the characters' code points: every expected id is written out."""
    bos_id, eos_id = 1, 2

    def encode(self, text):
        return [ord(c) for c in text]


# --- padding and caption encoding ----------------------------------------------------------------

def test_pad_right_pads_with_the_value_and_counts_lengths():
    tokens, lengths = pad_right([[5, 6, 7], [8], []], 9)
    assert tokens.dtype == torch.long and lengths.dtype == torch.long
    assert tokens.tolist() == [[5, 6, 7], [8, 9, 9], [9, 9, 9]] and lengths.tolist() == [3, 1, 0]


def test_pad_right_of_nothing_is_empty():
    tokens, lengths = pad_right([], 0)
    assert tokens.shape == (0, 0) and lengths.shape == (0,)
    assert tokens.dtype == torch.long and lengths.dtype == torch.long  # torch.tensor([]) alone would be float


def test_encode_captions_cuts_to_the_limit_and_ends_every_caption():
    tokens, lengths = encode_captions(Chars(), ["abcdef", "x"], limit=4)
    assert tokens.tolist() == [[97, 98, 99, 2], [120, 2, 2, 2]] and lengths.tolist() == [4, 2]


def test_encode_captions_with_the_start_token_keeps_within_the_limit():
    tokens, lengths = encode_captions(Chars(), ["abcdef", "x"], limit=4, start=True)
    assert tokens.tolist() == [[1, 97, 98, 2], [1, 120, 2, 2]] and lengths.tolist() == [4, 3]


# --- the corpus BPE -------------------------------------------------------------------------------

def learn(size=60):
    return CorpusTokenizer.train(CAPTIONS, size)


def test_corpus_tokenizer_specials_come_first():
    corpus = learn()
    assert (corpus.name, corpus.bos_id, corpus.eos_id) == ("corpus", 1, 2)
    assert corpus._tok.token_to_id("[UNK]") == 0
    assert corpus.vocab_size == corpus._tok.get_vocab_size() == 60  # the bound, reached on this corpus


def test_corpus_tokenizer_lowercases_normalises_and_round_trips():
    corpus = learn()
    ids = corpus.encode("a red circle")
    assert corpus.encode("A RED Circle") == ids and corpus.encode_piece("a red circle") == ids
    assert corpus.encode("ﬁ") == corpus.encode("fi")  # NFKC: the ligature is two letters
    assert corpus.decode(ids) == "a red circle"  # words rejoined at their end-of-word suffix
    assert 0 in corpus.encode("a red @")  # an unseen character is [UNK]


def test_corpus_tokenizer_ids_are_specials_then_sorted_alphabet_then_merges():
    spec = {"model": {"type": "BPE", "vocab": {"b": 9, "[UNK]": 7, "ab": 3, "a": 5, "[EOS]": 0, "c": 1, "abc": 2,
                                               "[BOS]": 4, "x": 6},
                      "merges": [["a", "b"], "ab c", ["a", "b"]]},
            "added_tokens": [{"content": "[EOS]", "id": 0}, {"content": "[UNK]", "id": 7}]}
    out = json.loads(CorpusTokenizer._canonical_ids(json.dumps(spec), ["[UNK]", "[BOS]", "[EOS]"]))
    assert out["model"]["vocab"] == {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2, "a": 3, "b": 4, "c": 5, "x": 6, "ab": 7,
                                     "abc": 8}
    assert out["added_tokens"] == [{"content": "[EOS]", "id": 2}, {"content": "[UNK]", "id": 0}]
    assert out["model"]["merges"] == [["a", "b"], "ab c", ["a", "b"]] and out["model"]["type"] == "BPE"
    del spec["added_tokens"]  # a serialisation without added tokens needs no renumbering of them
    bare = json.loads(CorpusTokenizer._canonical_ids(json.dumps(spec), ["[UNK]", "[BOS]", "[EOS]"]))
    assert "added_tokens" not in bare and bare["model"]["vocab"] == out["model"]["vocab"]


def test_corpus_tokenizer_saves_and_loads(tmp_path):
    corpus = learn()
    corpus.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]
    again = CorpusTokenizer.load(tmp_path)
    assert again.encode("two green hearts") == corpus.encode("two green hearts")
    assert (again.vocab_size, again.bos_id, again.eos_id) == (60, 1, 2)


def test_corpus_tokenizer_missing_file_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json is missing: this decoder's tokenizer"):
        CorpusTokenizer.load(tmp_path)


# --- open_clip's CLIP BPE -------------------------------------------------------------------------

def test_clip_bpe_ids_lowercasing_and_decoding(tmp_path):
    clip = ClipBpeTokenizer()
    assert (clip.name, clip.vocab_size, clip.bos_id, clip.eos_id) == ("clip-bpe", 49408, 49406, 49407)
    ids = clip.encode("a red circle")
    assert clip.encode("A Red CIRCLE") == ids and clip.encode_piece("a red circle") == ids
    assert clip.decode(ids) == "a red circle"  # open_clip leaves a trailing space: stripped
    assert len(clip.encode_piece(".")) == 1
    clip.save(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing to write: the BPE ships inside open_clip


# --- a Hugging Face tokenizer, built here (no hub) ------------------------------------------------

def write_hf_tokenizer(directory, bos=True):
    """A byte-level BPE (a leading space changes the ids, as in GPT-2) whose post-processor adds
    <s> ... </s>, saved as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from unembed.compat import import_transformers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CAPTIONS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
    fast = import_transformers().PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if bos else None,
                                                          eos_token="</s>")
    fast.save_pretrained(directory)
    return fast


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf-tokenizer")
    return directory, write_hf_tokenizer(directory)


def test_hf_tokenizer_ids(hf):
    directory, fast = hf
    tok = HFTokenizer(str(directory))
    assert tok.name == str(directory) and tok.vocab_size == len(fast)
    assert (tok.bos_id, tok.eos_id) == (fast.convert_tokens_to_ids("<s>"), fast.convert_tokens_to_ids("</s>"))
    assert tok.bos_id != tok.eos_id


def test_hf_tokenizer_without_a_start_token_starts_with_the_end_token(tmp_path):
    write_hf_tokenizer(tmp_path, bos=False)
    tok = HFTokenizer(str(tmp_path))
    assert tok.bos_id == tok.eos_id is not None


def test_hf_tokenizer_encodes_a_caption_after_one_space_without_specials(hf):
    directory, fast = hf
    tok = HFTokenizer(str(directory))
    expected = fast.encode(" a red circle", add_special_tokens=False)
    assert expected != fast.encode("a red circle", add_special_tokens=False)  # the space matters here
    assert tok.encode("  a red circle ") == expected
    assert tok.encode_piece("a red circle") == fast.encode("a red circle", add_special_tokens=False)
    assert tok.decode(fast.encode(" a red circle")) == "a red circle"  # specials skipped, space stripped


def test_hf_tokenizer_saves_into_a_tokenizer_folder(hf, tmp_path):
    directory, _ = hf
    HFTokenizer(str(directory)).save(tmp_path)
    again = HFTokenizer(str(tmp_path / "tokenizer"))
    assert again.encode("two green hearts") == HFTokenizer(str(directory)).encode("two green hearts")


def test_a_hub_tokenizer_that_is_not_cached_offline_is_named(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # conftest points the hub cache into an empty folder
    with pytest.raises(ModelLoadError, match=r"^cannot load tokenizer 'no-such-org/no-such-tokenizer': it is not "
                                            r"in the local Hugging Face cache"):
        HFTokenizer("no-such-org/no-such-tokenizer")


def test_hf_tokenizer_that_cannot_load_is_one_line_naming_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nonsense"}), encoding="utf-8")
    with pytest.raises(ModelLoadError) as caught:
        HFTokenizer(str(tmp_path))
    # transformers' message runs over several lines; the error keeps its first
    message = str(caught.value)
    assert message.startswith(f"cannot load tokenizer {str(tmp_path)!r}: The checkpoint you are trying to load has "
                              "model type `nonsense`") and "\n" not in message


# --- which tokenizer a config names ---------------------------------------------------------------

def config(tokenizer="", lm="scratch"):
    return SimpleNamespace(tokenizer=tokenizer, lm=lm)


def test_a_scratch_lm_defaults_to_the_clip_bpe():
    assert isinstance(make_tokenizer(config()), ClipBpeTokenizer)
    assert isinstance(make_tokenizer(config("clip-bpe", lm="gpt2")), ClipBpeTokenizer)


def test_corpus_spec_learns_at_most_n_tokens_from_the_captions():
    tok = make_tokenizer(config("corpus:40"), captions=CAPTIONS)
    assert isinstance(tok, CorpusTokenizer) and tok.vocab_size == 40


def test_a_bare_corpus_spec_learns_4000_tokens(monkeypatch):
    asked = []
    monkeypatch.setattr(CorpusTokenizer, "train", classmethod(lambda cls, captions, size: asked.append(size)))
    make_tokenizer(config("corpus"), captions=CAPTIONS)
    assert asked == [4000]


@pytest.mark.parametrize("captions", [None, []])
def test_a_corpus_spec_without_captions_is_refused(captions):
    with pytest.raises(ModelLoadError, match=r"tokenizer 'corpus:40' is learned from training captions; none were given"):
        make_tokenizer(config("corpus:40"), captions=captions)


def test_a_corpus_spec_with_a_directory_loads_it_instead_of_learning(tmp_path):
    CorpusTokenizer.train(CAPTIONS, 50).save(tmp_path)
    tok = make_tokenizer(config("corpus:40"), directory=tmp_path, captions=CAPTIONS)
    assert isinstance(tok, CorpusTokenizer) and tok.vocab_size == 50


def test_a_hub_lm_uses_its_own_tokenizer_or_the_saved_copy(hf, tmp_path):
    directory, _ = hf
    own = make_tokenizer(config(lm=str(directory)))
    assert isinstance(own, HFTokenizer) and own.name == str(directory)
    named = make_tokenizer(config(str(directory), lm="gpt2"), directory=tmp_path)  # no saved copy: the named one
    assert isinstance(named, HFTokenizer) and named.name == str(directory)
    own.save(tmp_path)
    saved = make_tokenizer(config(lm="no/such-hub-repo"), directory=tmp_path)
    assert isinstance(saved, HFTokenizer) and saved.name == str(tmp_path / "tokenizer")
