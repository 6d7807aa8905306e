"""unembed.decoders.prefix checked value by value (written against the mutants `make mutation` found
surviving the rest of the suite): config options, the three mappers, the decoder's construction, caption
encoding, the LM inputs (prefix, left-padded prompts), the loss against a naive per-row computation,
where a generated caption ends, saving and loading. Fast: a one-layer 16-wide scratch LM on a 60-token
corpus BPE, 8-d fake embeddings, no shared fixture."""
import dataclasses
import functools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unembed.decoders import load_decoder
from unembed.decoders.clipcap import ClipCapDecoder
from unembed.decoders.decap import DeCapDecoder
from unembed.decoders.prefix import (MLPMapper, PrefixConfig, PrefixDecoder, TransformerMapper, make_mapper,
                                     option)
from unembed.embedders import Embedded
from unembed.errors import MismatchError, ModelLoadError
from unembed.tokenizers import ClipBpeTokenizer, CorpusTokenizer

D = 8
TINY_LM = {"n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 24}
CAPTIONS = ["a red circle left of a blue square", "two green hearts on a noisy background",
            "a small yellow star above a big red circle", "three blue squares in a row"] * 5


@functools.lru_cache(maxsize=1)
def corpus():
    return CorpusTokenizer.train(CAPTIONS, 60)


def tiny(cls=ClipCapDecoder, tokenizer=None, **options):
    torch.manual_seed(0)
    base = dict(embedder_spec="fake-spec", embedder_id="fake-id", embed_dim=D, lm="scratch", tokenizer="corpus:60",
                lm_config=dict(TINY_LM), prefix_length=2, max_length=6, mapper="mlp")
    config = cls.config_class(**dict(base, **options))
    return cls(config, corpus() if tokenizer is None else tokenizer).eval()


def unit(n, seed=0):
    return F.normalize(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


def embedded(vectors):
    return Embedded(vectors, [str(i) for i in range(len(vectors))], "fake-id", "fake-spec")


# --- options and mappers --------------------------------------------------------------------------

def test_option_keeps_help_and_choices_in_the_fields_metadata():
    plain = option(3, "the help")
    assert plain.default == 3 and dict(plain.metadata) == {"help": "the help"}
    chosen = option("a", "pick", ("a", "b"), metadata={"extra": 1}, compare=False)
    assert chosen.default == "a" and not chosen.compare
    assert dict(chosen.metadata) == {"help": "pick", "choices": ("a", "b"), "extra": 1}
    for default in ({"k": [1]}, [1, 2]):
        made = option(default, "h")
        assert made.default is dataclasses.MISSING and dict(made.metadata) == {"help": "h"}
        first, second = made.default_factory(), made.default_factory()
        assert first == default and type(first) is type(default) and first is not second and first is not default
    assert not option([1], "h", compare=False).compare  # field options reach mutable defaults too


def test_prefix_config_fields_carry_their_options():
    fields = {f.name: f for f in dataclasses.fields(PrefixConfig)}
    assert fields["mapper"].metadata["choices"] == ("linear", "mlp", "transformer")
    assert fields["lm_mode"].metadata["choices"] == ("frozen", "lora", "full")
    assert "choices" not in fields["prefix_length"].metadata and fields["prefix_length"].metadata["help"]
    one, two = PrefixConfig(), PrefixConfig()
    assert one.lm_config == {} and one.lm_config is not two.lm_config


def test_mlp_mapper_layers_and_output():
    mapper = MLPMapper(D, 6, 3)
    assert [type(m) for m in mapper.net] == [nn.Linear, nn.Tanh, nn.Linear]
    assert (mapper.net[0].in_features, mapper.net[0].out_features, mapper.net[2].in_features,
            mapper.net[2].out_features) == (D, 9, 9, 18)
    v = torch.randn(2, D)
    assert torch.equal(mapper(v), mapper.net(v).view(2, 3, 6))
    linear = MLPMapper(D, 6, 3, hidden=False)
    assert isinstance(linear.net, nn.Linear) and (linear.net.in_features, linear.net.out_features) == (D, 18)
    assert torch.equal(linear(v), linear.net(v).view(2, 3, 6))


def test_transformer_mapper_layers_and_output():
    mapper = TransformerMapper(D, 12, prefix_length=3, mapper_length=2, layers=2).eval()
    assert mapper.mapper_length == 2 and mapper.constants.shape == (3, 12)
    assert (mapper.linear.in_features, mapper.linear.out_features) == (D, 24)
    assert len(mapper.transformer.layers) == 2
    layer = mapper.transformer.layers[0]
    assert (layer.self_attn.embed_dim, layer.self_attn.num_heads, layer.linear1.out_features) == (12, 4, 24)
    assert layer.self_attn.batch_first and layer.norm_first and layer.dropout.p == 0.0
    v = torch.randn(2, D)
    x = torch.cat([mapper.linear(v).view(2, 2, 12), mapper.constants.expand(2, -1, -1)], dim=1)
    out = mapper(v)
    assert out.shape == (2, 3, 12) and torch.allclose(out, mapper.transformer(x)[:, 2:])


def test_building_a_transformer_mapper_warns_of_nothing():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TransformerMapper(D, 12, 3, 2, 2)  # nested tensors asked for with norm_first would make torch warn
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("width,heads", [(16, 8), (12, 4), (6, 2), (5, 1)])
def test_transformer_mapper_takes_the_most_heads_that_divide_the_width(width, heads):
    assert TransformerMapper(D, width, 1, 1, 1).transformer.layers[0].self_attn.num_heads == heads


def test_make_mapper_builds_what_the_config_names():
    config = SimpleNamespace(embed_dim=D, prefix_length=3, mapper_length=2, mapper_layers=2, mapper="transformer")
    made = make_mapper(config, 12)
    assert isinstance(made, TransformerMapper) and made.constants.shape == (3, 12) and made.mapper_length == 2
    assert len(made.transformer.layers) == 2 and made.linear.in_features == D
    mlp = make_mapper(dataclasses.replace(PrefixConfig(embed_dim=D, prefix_length=3), mapper="mlp"), 6)
    assert isinstance(mlp.net, nn.Sequential) and mlp.net[0].in_features == D and mlp.net[2].out_features == 18
    linear = make_mapper(PrefixConfig(embed_dim=D, prefix_length=3, mapper="linear"), 6)
    assert isinstance(linear.net, nn.Linear) and linear.net.out_features == 18 and linear.prefix_length == 3
    with pytest.raises(ModelLoadError, match=r"unknown mapper 'conv' \(linear \| mlp \| transformer\)"):
        make_mapper(PrefixConfig(embed_dim=D, mapper="conv"), 6)


# --- the decoder ----------------------------------------------------------------------------------

def test_decoder_wires_its_lm_mapper_and_bridge_from_the_config():
    decoder = tiny(mapper="transformer", mapper_length=3, mapper_layers=1, mean_shift=True, projection_size=5,
                   projection_tau=0.5, noise_variance=0.02, noise_kind="uniform", noise_reference_dim=512)
    assert decoder.positions == 24 and decoder.tokenizer is corpus()
    assert decoder.mapper.constants.shape == (2, 16) and decoder.mapper.mapper_length == 3
    bridge = decoder.bridge
    assert (bridge.mean_shift, bridge.projection_tau, bridge.noise_variance, bridge.noise_kind,
            bridge.noise_reference_dim) == (True, 0.5, 0.02, "uniform", 512)
    assert bridge.memory.vectors.shape == (5, D) and bridge.text_mean.shape == (D,)
    assert decoder.lm.get_output_embeddings().out_features == 60
    assert decoder.mapper_device() == torch.device("cpu")


def test_decoder_without_a_tokenizer_makes_the_one_its_config_names():
    config = ClipCapDecoder.config_class(embedder_spec="s", embedder_id="i", embed_dim=D, lm="scratch",
                                         tokenizer="clip-bpe", lm_config=dict(TINY_LM), prefix_length=2)
    assert isinstance(ClipCapDecoder(config).tokenizer, ClipBpeTokenizer)


def test_frozen_lm_trains_only_the_mapper():
    decoder = tiny(lm_mode="frozen")
    assert not any(p.requires_grad for p in decoder.lm.parameters())
    assert all(p.requires_grad for p in decoder.mapper.parameters())


def test_a_prefix_must_leave_room_for_two_caption_positions():
    assert tiny(prefix_length=22).positions == 24  # 22 + 2 fits 24
    with pytest.raises(MismatchError, match="a 23-token prefix leaves no room for a caption: the LM 'scratch' "
                                            "reads 24 positions"):
        tiny(prefix_length=23)


def test_encode_captions_fits_the_positions_after_the_prefix_and_prompt():
    long = " ".join(CAPTIONS[:3])
    decoder = tiny()
    tokens, lengths = decoder.encode_captions([long, "a red circle"])
    assert lengths.tolist()[0] == 22 and tokens.shape == (2, 22)  # 24 positions - 2 prefix
    assert tokens[0, 21] == corpus().eos_id and tokens[0, :21].tolist() == corpus().encode(long)[:21]
    assert lengths.tolist()[1] == len(corpus().encode("a red circle")) + 1
    assert tiny(max_caption_tokens=5).encode_captions([long])[1].tolist() == [5]
    started, _ = tiny(start_token=True, max_caption_tokens=5).encode_captions([long])
    assert started[0].tolist() == [corpus().bos_id] + corpus().encode(long)[:3] + [corpus().eos_id]

    class Prompted(ClipCapDecoder):
        def prompt_room(self):
            return 4

    assert tiny(Prompted).encode_captions([long])[1].tolist() == [18]
    assert tiny().prompt_room() == 0


def test_prefix_normalises_unless_told_not_to():
    v = unit(3) * 5
    decoder = tiny()
    assert torch.allclose(decoder.prefix(v), decoder.mapper(F.normalize(v, dim=-1)))
    raw = tiny(normalize=False)
    assert torch.allclose(raw.prefix(v), raw.mapper(v)) and not torch.allclose(raw.prefix(v), raw.prefix(v / 5))


def test_lm_inputs_without_prompts_are_the_prefix_alone():
    decoder = tiny()
    prefix = torch.randn(2, 2, 16)
    for prompts in (None, [[], []]):
        inputs, mask = decoder.lm_inputs(prefix, prompts)
        assert inputs is prefix and mask.dtype == torch.long and mask.tolist() == [[1, 1], [1, 1]]


def test_lm_inputs_left_pad_shorter_prompts():
    decoder = tiny()
    prefix = torch.randn(3, 2, 16)
    embed = decoder.lm.get_input_embeddings()
    inputs, mask = decoder.lm_inputs(prefix, [[3], [4, 5, 6], []])
    assert inputs.shape == (3, 5, 16) and mask.dtype == torch.long
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert torch.equal(inputs[0, :2], torch.zeros(2, 16)) and torch.equal(inputs[0, 2:4], prefix[0])
    assert torch.equal(inputs[0, 4:], embed(torch.tensor([3])))
    assert torch.equal(inputs[1, :2], prefix[1]) and torch.equal(inputs[1, 2:], embed(torch.tensor([4, 5, 6])))
    assert torch.equal(inputs[2, :3], torch.zeros(3, 16)) and torch.equal(inputs[2, 3:], prefix[2])


def naive_loss_terms(decoder, vector, prompt, caption, smoothing=0.0):
    """Summed cross-entropy of one caption's tokens, from one unpadded sequence (positions 0..L-1)."""
    with torch.no_grad():
        prefix = decoder.prefix(vector[None])[0]
        embed = decoder.lm.get_input_embeddings()
        parts = [prefix, embed(torch.tensor(prompt, dtype=torch.long)), embed(torch.tensor(caption))]
        logits = decoder.lm(inputs_embeds=torch.cat(parts)[None]).logits[0]
        start = prefix.shape[0] + len(prompt) - 1
        return F.cross_entropy(logits[start:start + len(caption)], torch.tensor(caption), reduction="sum",
                               label_smoothing=smoothing)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("prompts", [None, [[7, 8, 9], [5]]])
def test_caption_loss_is_the_mean_over_caption_tokens_of_each_unpadded_row(prompts, smoothing):
    decoder = tiny(label_smoothing=smoothing)
    vectors = unit(2, seed=3)
    tokens, lengths = decoder.encode_captions(["a red circle left of a blue square", "two hearts"])
    assert lengths[1] < tokens.shape[1]  # row 1 is padded
    loss = decoder.caption_loss(vectors, tokens, lengths, prompts)
    rows = [tokens[r, :lengths[r]].tolist() for r in range(2)]
    total = sum(naive_loss_terms(decoder, vectors[r], (prompts or [[], []])[r], rows[r], smoothing) for r in range(2))
    assert loss.shape == () and torch.allclose(loss, total / lengths.sum(), atol=1e-5)


def test_caption_ids_end_before_the_end_token_and_through_the_stop_token():
    decoder, eos = tiny(), 2
    assert decoder.caption_ids([5, 6, eos, 7], eos, None) == [5, 6]
    assert decoder.caption_ids([5, 9, 6, eos], eos, 9) == [5, 9]  # the stop token stays
    assert decoder.caption_ids([5, 6, 9, eos], eos, eos) == [5, 6, 9]  # a stop that is the end token goes
    assert decoder.caption_ids([5, 6, 7], eos, 9) == [5, 6, 7]  # never ended: all of it
    assert decoder.caption_ids([1, 5, eos], eos, None) == [1, 5]  # no start token configured: 1 is a token
    assert decoder.caption_ids([], eos, None) == []


def test_caption_ids_drop_a_leading_start_token_only():
    decoder, eos = tiny(start_token=True), 2
    assert decoder.caption_ids([1, 5, 1, eos], eos, None) == [5, 1]
    assert decoder.caption_ids([5, 1, eos], eos, None) == [5, 1]
    assert decoder.caption_ids([], eos, None) == []


def test_stop_id_is_one_token_of_the_tokenizer():
    decoder = tiny()
    decoder.tokenizer = SimpleNamespace(encode_piece=lambda text: [ord(c) for c in text])
    assert decoder.stop_id() is None
    decoder.config.stop = "."
    assert decoder.stop_id() == 46
    decoder.config.stop = ".."
    with pytest.raises(ModelLoadError, match=r"the stop string '\.\.' is not one token of this decoder's tokenizer"):
        decoder.stop_id()


def test_upgrade_config_normalises_before_format_3_and_blocks_no_repeats_before_format_4():
    old = {"lm": "gpt2", "normalize": False}
    assert PrefixDecoder.upgrade_config(old, 2) == {"lm": "gpt2", "normalize": True, "no_repeat_ngram_size": 0}
    assert PrefixDecoder.upgrade_config(old, 3) == {**old, "no_repeat_ngram_size": 0} and old["normalize"] is False
    assert PrefixDecoder.upgrade_config({**old, "no_repeat_ngram_size": 2}, 3)["no_repeat_ngram_size"] == 2
    assert PrefixDecoder.upgrade_config(old, 4) == old and "no_repeat_ngram_size" not in old


# --- building, saving, loading --------------------------------------------------------------------

class FakeEmbedder:
    spec, id, dim = "fake-spec", "fake-id", D

    def embed_texts(self, texts):
        return torch.stack([F.normalize(torch.randn(D, generator=torch.Generator().manual_seed(sum(map(ord, t)))),
                                        dim=0) for t in texts])


def test_example_builds_a_one_layer_lm_and_fits_the_bridge(tmp_path):
    captions = CAPTIONS[:4] + CAPTIONS[:2]  # duplicates: the memory holds each caption once
    decoder = DeCapDecoder.example(FakeEmbedder(), captions, tmp_path)
    config = decoder.config
    assert (config.embedder_spec, config.embedder_id, config.embed_dim) == ("fake-spec", "fake-id", D)
    assert (config.lm, config.tokenizer, config.mapper_layers, config.max_length) == ("scratch", "corpus:200", 1, 8)
    assert {k: config.lm_config[k] for k in ("n_layer", "n_head", "n_embd")} == {"n_layer": 1, "n_head": 2, "n_embd": 32}
    assert config.projection_size == 4 and isinstance(decoder.tokenizer, CorpusTokenizer)
    assert decoder.tokenizer.encode("two green hearts") == CorpusTokenizer.train(captions, 200).encode("two green hearts")
    vectors = FakeEmbedder().embed_texts(CAPTIONS[:4])
    assert decoder.bridge.memory.texts == CAPTIONS[:4]
    assert torch.allclose(decoder.bridge.memory.vectors, vectors, atol=1e-6)
    assert torch.allclose(decoder.bridge.text_mean, vectors.mean(0), atol=1e-6)
    clipcap = ClipCapDecoder.example(FakeEmbedder(), captions, tmp_path)
    assert clipcap.config.projection_size == 0 and clipcap.bridge.memory is None


def test_save_and_load_keep_the_tokenizer_memory_and_captions(tmp_path):
    decoder = tiny(DeCapDecoder, projection_size=4, prefix_length=1, mapper="linear")
    decoder.bridge.fit(unit(6), None, CAPTIONS[:4], unit(4, seed=1))
    decoder.save(tmp_path / "d")
    assert json.loads((tmp_path / "d" / "memory_captions.json").read_text(encoding="utf-8")) == CAPTIONS[:4]
    assert (tmp_path / "d" / "tokenizer.json").is_file()
    again = load_decoder(tmp_path / "d")
    assert isinstance(again, DeCapDecoder) and again.bridge.memory.texts == CAPTIONS[:4]
    assert again.tokenizer.encode("a red circle") == corpus().encode("a red circle")
    assert torch.equal(again.bridge.memory.vectors, decoder.bridge.memory.vectors)
    queries = embedded(unit(3, seed=2))
    assert again.decode(queries, num_beams=1) == decoder.decode(queries, num_beams=1)
    (tmp_path / "d" / "memory_captions.json").unlink()
    with pytest.raises(ModelLoadError, match="memory_captions.json is missing"):
        load_decoder(tmp_path / "d")


def test_a_decoder_without_memory_writes_no_memory_file(tmp_path):
    decoder = tiny()
    decoder.save(tmp_path / "c")
    assert not (tmp_path / "c" / "memory_captions.json").exists()
    queries = embedded(unit(2, seed=4))
    assert load_decoder(tmp_path / "c").decode(queries, num_beams=2) == decoder.decode(queries, num_beams=2)


def test_a_lora_decoder_reloads_its_adapter(tmp_path):
    decoder = tiny(lm_mode="lora", lora_r=2)
    with torch.no_grad():
        for name, p in decoder.lm.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)  # a trained adapter: not the identity that a fresh one is
    decoder.save(tmp_path / "l")
    queries = embedded(unit(2, seed=5))
    again = load_decoder(tmp_path / "l")
    assert any("lora_" in n for n, _ in again.lm.named_parameters())
    state, reloaded = decoder.lm.state_dict(), again.lm.state_dict()
    assert all(torch.equal(state[k], reloaded[k]) for k in state if "lora_B" in k)
    assert again.decode(queries, num_beams=1) == decoder.decode(queries, num_beams=1)


# --- positions, devices and a hub LM's adapter ---------------------------------------------------------

def test_positions_come_from_the_lm_config_whatever_it_calls_them():
    assert tiny().positions == 24  # GPT-2: n_positions
    neo = {"model_type": "gpt_neo", "vocab_size": 60, "hidden_size": 16, "num_layers": 1, "num_heads": 2,
           "attention_types": [[["global"], 1]], "max_position_embeddings": 20, "bos_token_id": 1, "eos_token_id": 2}
    assert tiny(lm_config=neo).positions == 20  # no n_positions: max_position_embeddings
    mamba = {"model_type": "mamba", "vocab_size": 60, "hidden_size": 16, "num_hidden_layers": 1, "state_size": 4,
             "bos_token_id": 1, "eos_token_id": 2}
    assert tiny(lm_config=mamba).positions == 1 << 30  # an LM without positions: no limit
    assert tiny(lm_config=dict(mamba, n_positions=30)).positions == 30  # n_positions read first


class RecordingLM(nn.Module):
    """An LM where only shapes and devices matter: GPT-2's forward cannot run on the meta device."""

    def __init__(self, vocab, width):
        super().__init__()
        self.embed, self.head, self.calls = nn.Embedding(vocab, width), nn.Linear(width, vocab), []

    def get_input_embeddings(self):
        return self.embed

    def forward(self, inputs_embeds, attention_mask, position_ids=None):
        self.calls.append((attention_mask, position_ids))
        return SimpleNamespace(logits=self.head(inputs_embeds))


def test_the_loss_and_the_lm_inputs_stay_on_the_decoders_device():
    # A decoder on an accelerator ("meta" stands in for one on a CPU-only machine): every tensor the loss
    # and the LM inputs make must be made there, and embeddings given on the CPU must be moved there.
    decoder = tiny()
    tokens, lengths = decoder.encode_captions(["a red circle", "two hearts"])
    decoder.lm = RecordingLM(60, 16)
    decoder = decoder.to("meta")
    for prompts in (None, [[3], [4, 5]]):
        loss = decoder.caption_loss(unit(2).to("meta"), tokens.to("meta"), lengths.to("meta"), prompts)
        assert loss.device.type == "meta" and loss.shape == ()
        mask, positions = decoder.lm.calls[-1]
        assert mask.device.type == "meta" and (positions is None or positions.device.type == "meta")
    assert decoder.prefix(unit(2)).device.type == "meta"
    for prompts in (None, [[3], [4, 5]]):
        inputs, mask = decoder.lm_inputs(torch.zeros(2, 2, 16, device="meta"), prompts)
        assert inputs.device.type == "meta" and mask.device.type == "meta"


def test_lm_inputs_of_no_rows():
    prefix = torch.zeros(0, 2, 16)
    inputs, mask = tiny().lm_inputs(prefix, [])
    assert inputs is prefix and mask.shape == (0, 2)


def test_a_hub_lm_trained_with_lora_reloads_its_saved_adapter(tmp_path, monkeypatch):
    """A LoRA-trained hub LM is saved as a reference plus peft's adapter: loading must apply that adapter
    (a fresh one would be the untrained identity). The "hub" is a cache folder in the hub's layout."""
    import os

    from tests.hub_cache import add_repo
    from unembed.compat import import_transformers

    transformers = import_transformers()
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=60, n_positions=24, n_embd=16, n_layer=1,
                                                                 n_head=2, bos_token_id=1, eos_token_id=2))
    base.save_pretrained(tmp_path / "files")
    add_repo(Path(os.environ["HF_HOME"]) / "hub", "tiny-org/tiny-gpt2", tmp_path / "files")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    decoder = tiny(lm="tiny-org/tiny-gpt2", lm_config={}, lm_mode="lora", lora_r=2)
    with torch.no_grad():
        for name, p in decoder.lm.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)  # trained: no longer the identity a fresh adapter is
    decoder.save(tmp_path / "d")
    assert decoder.config.lm_weights == "referenced" and (tmp_path / "d" / "adapter" / "adapter_config.json").is_file()
    again = load_decoder(tmp_path / "d")
    state, reloaded = decoder.lm.state_dict(), again.lm.state_dict()
    assert all(torch.equal(state[k], reloaded[k]) for k in state if "lora_" in k)
    queries = embedded(unit(2, seed=5))
    assert again.decode(queries, num_beams=1) == decoder.decode(queries, num_beams=1)
