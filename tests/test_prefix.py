"""The prefix decoders (clipcap, capdec, decap) on tiny configs: training lowers the loss, saving
round-trips exactly, padding is masked by length, LM modes freeze what they say, decoding options."""
import json

import pytest
import torch

from unembed.decoders import create_decoder, load_decoder, prefix_kinds
from unembed.embedders import Embedded
from unembed.training.loop import TrainConfig
from unembed.training.prefix import train_prefix

TINY_LM = {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 48}
PREFIX_KINDS = tuple(prefix_kinds())  # the registry's, less the corrector (trained over a base: test_loop.py)


def tiny(kind, embedder, **options):
    base = dict(embedder_spec=embedder.spec, embedder_id=embedder.id, embed_dim=embedder.dim, lm="scratch",
                tokenizer="clip-bpe", lm_config=dict(TINY_LM), prefix_length=2, max_length=8)
    if kind == "decap":
        base.update(prefix_length=1, projection_size=0)
    return create_decoder(kind, **dict(base, **options))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, scenes_dir, embedder):
    """Each prefix decoder trained for 30 steps on the tiny scenes world."""
    out = {}
    for kind in PREFIX_KINDS:
        directory = tmp_path_factory.mktemp(kind)
        # A corpus BPE: CLIP's 49,408-token head would be most of the cost (tiny() keeps clip-bpe).
        options = dict(lm="scratch", tokenizer="corpus:300", lm_config=dict(TINY_LM), prefix_length=2, max_length=8)
        if kind == "decap":
            options.update(prefix_length=1, projection_size=64)
        config = TrainConfig(max_steps=30, batch_size=32, lr=3e-3, warmup_steps=2, device="cpu", checkpoint_every=100)
        report = train_prefix(kind, embedder, directory, config, data_dir=scenes_dir, progress=False, **options)
        out[kind] = (directory, report)
    return out


@pytest.mark.parametrize("kind", PREFIX_KINDS)
def test_loss_falls_and_validation_runs(trained, kind):
    directory, report = trained[kind]
    losses = [json.loads(line)["loss"] for line in (directory / "train_log.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    assert "val_CIDEr" in report and report["train_steps"] == 30


@pytest.mark.parametrize("kind", PREFIX_KINDS)
def test_save_load_round_trip_gives_identical_captions(trained, kind, embedder, scenes_dir, tmp_path):
    from unembed.pipeline import embed_split

    directory, _ = trained[kind]
    embedded = embed_split(embedder, scenes_dir / "test")
    decoder = load_decoder(directory, embedder=embedder)
    first = decoder.decode(embedded, num_beams=1)
    assert len(first) == len(embedded) and all(isinstance(c, str) for c in first)
    decoder.save(tmp_path / "again")
    again = load_decoder(tmp_path / "again")
    assert again.decode(embedded, num_beams=1) == first
    assert again.decode(embedded, num_beams=3) == decoder.decode(embedded, num_beams=3)


@pytest.mark.parametrize("kind", PREFIX_KINDS)
def test_greedy_generation_equals_a_naive_loop(trained, kind, embedder, scenes_dir):
    """The LM library's cached generation must match re-running the whole sequence for each token
    (DeCap's one-vector prefix once tripped transformers into re-feeding the prefix every step)."""
    from unembed.pipeline import embed_split

    decoder = load_decoder(trained[kind][0]).eval()
    embedded = embed_split(embedder, scenes_dir / "test").select(range(3))
    captions = decoder.decode(embedded, num_beams=1, max_length=6, no_repeat_ngram_size=0)  # the loop blocks none
    eos = decoder.tokenizer.eos_id
    with torch.no_grad():
        vectors = decoder.bridge.for_inference(embedded.vectors)
        # The soft prefix, then each item's text prompt (ViECap's entities), left-padded to one width.
        sequence, mask = decoder.lm_inputs(decoder.prefix(vectors), decoder.text_prompts(embedded, vectors))
        steps = []
        for _ in range(6):
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            logits = decoder.lm(inputs_embeds=sequence, attention_mask=mask, position_ids=positions).logits
            steps.append(logits[:, -1].argmax(-1))
            sequence = torch.cat([sequence, decoder.lm.get_input_embeddings()(steps[-1])[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    naive = [decoder.tokenizer.decode(decoder.caption_ids(row, eos, None)) for row in torch.stack(steps, 1).tolist()]
    assert captions == naive


def test_decoding_options(trained, embedder, scenes_dir):
    from unembed.pipeline import embed_split

    decoder = load_decoder(trained["clipcap"][0])
    embedded = embed_split(embedder, scenes_dir / "test").select(range(4))
    greedy = decoder.decode(embedded, num_beams=1)
    assert decoder.decode(embedded, num_beams=1) == greedy  # deterministic
    sampled = [decoder.decode(embedded, do_sample=True, top_p=0.95, temperature=2.0, seed=s) for s in (1, 1, 2, 3)]
    assert sampled[0] == sampled[1] and len(sampled[2]) == 4  # the same seed, the same captions
    # Different seeds give different captions, and sampling is not greedy: a decoder that ignored
    # do_sample (or the seed) would give one list every time.
    assert sampled[2] != sampled[0] or sampled[3] != sampled[0]
    assert any(s != greedy for s in sampled)
    short = decoder.decode(embedded, num_beams=1, max_length=2)
    assert all(len(decoder.tokenizer.encode(c)) <= 2 for c in short)


def test_padding_is_masked_by_length_not_token_value(embedder):
    torch.manual_seed(0)
    decoder = tiny("clipcap", embedder).eval()  # no dropout: the losses must be comparable
    tokens, lengths = decoder.encode_captions(["a red circle!", "two big blue squares next to a tiny green heart"])
    assert lengths[0] < tokens.shape[1]  # row 0 is padded
    vectors = torch.randn(2, embedder.dim)
    loss = decoder.caption_loss(vectors, tokens, lengths)
    scrambled = tokens.clone()
    scrambled[0, lengths[0]:] = torch.randint(0, 1000, (tokens.shape[1] - lengths[0],))
    assert torch.allclose(decoder.caption_loss(vectors, scrambled, lengths), loss)
    # Token 0 ("!" in GPT-2's and CLIP's BPE) inside a caption is a label like any other: the loss is
    # the mean over exactly sum(lengths) positions (ClipCap's official code pads with 0 and drops it).
    tokens[0, 1] = 0
    loss = decoder.caption_loss(vectors, tokens, lengths)
    with torch.no_grad():
        prefix = decoder.prefix(vectors)
        embeds = torch.cat([prefix, decoder.lm.get_input_embeddings()(tokens)], dim=1)
        logits = decoder.lm(inputs_embeds=embeds).logits[:, prefix.shape[1] - 1:-1]
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
    valid = [per_token[row, :length] for row, length in enumerate(lengths.tolist())]
    assert torch.allclose(loss, torch.cat(valid).mean(), atol=1e-5)


@pytest.mark.parametrize("mode", ["frozen", "lora", "full"])
def test_lm_modes_train_what_they_say(embedder, mode, tmp_path):
    decoder = tiny("clipcap", embedder, lm_mode=mode, lora_r=2)
    lm_trainable = {n for n, p in decoder.lm.named_parameters() if p.requires_grad}
    assert all(p.requires_grad for p in decoder.mapper.parameters())
    if mode == "frozen":
        assert not lm_trainable
    elif mode == "lora":
        assert lm_trainable and all("lora_" in n for n in lm_trainable)
    else:
        assert len(lm_trainable) == len(list(decoder.lm.parameters()))
    decoder.save(tmp_path / mode)
    assert load_decoder(tmp_path / mode).config.lm_mode == mode
    embedded = Embedded(torch.nn.functional.normalize(torch.randn(2, embedder.dim), dim=-1), ["a", "b"],
                        embedder.id, embedder.spec)
    assert load_decoder(tmp_path / mode).decode(embedded, num_beams=1) == decoder.decode(embedded, num_beams=1)


def test_bridges_change_what_they_should(embedder):
    from unembed.decoders.bridges import ModalityBridge

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(1)  # the data below: fixed (and not the noise generator's stream), so no run meets ties within tau
    text = torch.nn.functional.normalize(torch.randn(50, 16), dim=-1)
    image = torch.nn.functional.normalize(torch.randn(50, 16) + 3 * torch.eye(16)[0], dim=-1)

    plain = ModalityBridge(16)
    plain.fit(text, image)
    assert torch.allclose(plain.for_training(text, g), text) and torch.allclose(plain.for_inference(image), image)

    noisy = ModalityBridge(16, noise_variance=0.016)
    noisy.fit(text, None)
    moved = noisy.for_training(text, g)
    assert torch.allclose(moved.norm(dim=-1), torch.ones(50), atol=1e-5)
    assert 0.2 < (moved - text).norm(dim=-1).mean() < 0.8  # ~sqrt(0.016 * 16) = 0.5 before re-normalising
    uniform = ModalityBridge(16, noise_variance=0.016, noise_kind="uniform").for_training(text, g)
    assert not torch.allclose(uniform, text)

    shifted = ModalityBridge(16, mean_shift=True)
    shifted.fit(text, image)
    assert torch.allclose(shifted.image_mean, image.mean(0))
    # After the shift the image embeddings' offset along axis 0 is gone: their mean is ~0.
    assert shifted.for_inference(image).mean(0).norm() < image.mean(0).norm() / 3

    projected = ModalityBridge(16, projection_size=50, projection_tau=1e-4)
    projected.fit(text, None, [f"t{i}" for i in range(50)], text)
    out = projected.for_inference(image)
    nearest = (image @ text.T).argmax(1)
    assert torch.allclose(out, text[nearest], atol=1e-4)  # tiny tau: projection = nearest memory entry


def test_text_only_decoders_refuse_mean_shift_without_images(embedder, tmp_path):
    from unembed.errors import MismatchError

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a red circle\na blue square\n")
    with pytest.raises(MismatchError, match="mean shift needs"):
        train_prefix("capdec", embedder, tmp_path / "out", TrainConfig(max_steps=1, device="cpu"),
                     caption_files=[corpus], progress=False, mean_shift=True, lm="scratch", lm_config=dict(TINY_LM))


def test_transformer_mapper_round_trips(embedder, tmp_path):
    decoder = tiny("clipcap", embedder, mapper="transformer", prefix_length=3, mapper_length=2, mapper_layers=1)
    vectors = torch.nn.functional.normalize(torch.randn(2, embedder.dim), dim=-1)
    assert decoder.prefix(vectors).shape == (2, 3, TINY_LM["n_embd"])
    decoder.save(tmp_path / "t")
    embedded = Embedded(vectors, ["a", "b"], embedder.id, embedder.spec)
    assert load_decoder(tmp_path / "t").decode(embedded, num_beams=2) == decoder.decode(embedded, num_beams=2)


def test_corpus_tokenizer_is_learned_saved_and_reloaded(embedder, tmp_path):
    from unembed.decoders.capdec import CapDecConfig, CapDecDecoder
    from unembed.tokenizers import CorpusTokenizer

    captions = ["a red circle left of a blue square", "two green hearts on a noisy background"] * 20
    tokenizer = CorpusTokenizer.train(captions, 200)
    assert tokenizer.vocab_size < 200 and tokenizer.decode(tokenizer.encode("two green hearts")) == "two green hearts"
    config = CapDecConfig(embedder_spec=embedder.spec, embedder_id=embedder.id, embed_dim=embedder.dim, lm="scratch",
                          tokenizer="corpus:200", lm_config=dict(TINY_LM), prefix_length=2)
    decoder = CapDecDecoder(config, tokenizer)
    assert decoder.lm.get_output_embeddings().out_features == tokenizer.vocab_size
    decoder.save(tmp_path / "c")
    assert (tmp_path / "c" / "tokenizer.json").is_file()
    again = load_decoder(tmp_path / "c")
    assert again.tokenizer.encode("a red circle") == tokenizer.encode("a red circle")


def test_corpus_tokenizer_numbers_tokens_the_same_every_time(scenes_dir):
    """The BPE trainer numbers its alphabet in hash order; the ids must not depend on the run
    (reproducibility, and every process of a distributed run trains its own copy)."""
    from unembed.data.splits import split_captions
    from unembed.tokenizers import CorpusTokenizer

    captions = split_captions(scenes_dir / "train")
    runs = [CorpusTokenizer.train(captions, 64) for _ in range(4)]
    assert len({tuple(t.encode("a red circle above two blue stars")) for t in runs}) == 1
    assert sorted(runs[0]._tok.get_vocab().values()) == list(range(runs[0].vocab_size))


def test_noise_reference_width_gives_the_papers_effective_noise_on_any_width():
    from unembed.decoders.bridges import add_noise

    g = torch.Generator().manual_seed(0)
    clean = torch.nn.functional.normalize(torch.randn(4000, 256, generator=g), dim=-1)

    def cosine(**kw):
        return (add_noise(clean, 0.016, "gaussian", g, **kw) * clean).sum(-1).mean().item()

    assert cosine() == pytest.approx(1 / (1 + 256 * 0.016) ** 0.5, abs=0.01)  # 0.44: weaker than the paper's
    assert cosine(reference_dim=512) == pytest.approx(1 / (1 + 512 * 0.016) ** 0.5, abs=0.01)  # 0.33, as at 512-d


def test_uniform_noise_is_capdecs_ball_of_radius_sqrt_variance():
    from unembed.decoders.bridges import add_noise

    g = torch.Generator().manual_seed(0)
    clean = torch.nn.functional.normalize(torch.randn(2000, 128, generator=g), dim=-1)
    # Undo the final normalisation to see the noise: scale back by the noised vector's norm.
    noisy = add_noise(clean, 0.016, "uniform", g)
    raw = noisy / (noisy * clean).sum(-1, keepdim=True)  # clean + noise, up to the norm both share
    lengths = (raw - clean).norm(dim=-1)
    assert lengths.max().item() <= 0.016 ** 0.5 * 1.05 and lengths.max().item() > 0.016 ** 0.5 * 0.9
