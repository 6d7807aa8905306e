"""The iterative decoder (MAGIC) and its LM trainer on tiny models: each chosen token is the argmax of
the documented score recomputed by hand; batching, the KV cache and saving change no caption; the
trained LM loads in transformers."""
import json

import pytest
import torch
import torch.nn.functional as F

from unembed.decoders import load_decoder
from unembed.decoders.iterative import IterativeDecoder
from unembed.embedders import Embedded
from unembed.errors import BadInputError, MismatchError, ModelLoadError
from unembed.training.loop import TrainConfig
from unembed.training.lm import train_lm

TINY_LM = {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 32}
TEXTS = ["a red circle", "two blue squares", "a green heart at the top", "three yellow stars"]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, scenes_dir):
    from unembed.data.splits import split_captions

    out = tmp_path_factory.mktemp("lm")
    config = TrainConfig(max_steps=40, batch_size=32, lr=3e-3, warmup_steps=2, device="cpu", checkpoint_every=100)
    report = train_lm(split_captions(scenes_dir / "train"), out, config, tokenizer="corpus:300", lm_config=TINY_LM,
                      progress=False)
    return out, report


@pytest.fixture(scope="module")
def decoder(lm_dir, embedder):
    return IterativeDecoder.build(embedder, lm=str(lm_dir[0]), k=5, max_length=8)


@pytest.fixture(scope="module")
def targets(embedder):
    """Caption embeddings and random vectors: raw targets, no image (the tiny embedder barely tells
    its images apart, so these give the decoder different things to say)."""
    noise = F.normalize(torch.randn(3, embedder.dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    return Embedded(torch.cat([embedder.embed_texts(TEXTS), noise]), TEXTS + ["x", "y", "z"], embedder.id,
                    embedder.spec, "unknown")


@torch.no_grad()
def hand_scores(decoder, embedder, target, caption, k, prompt="", alpha=0.1, beta=2.0):
    """MAGIC's score of the LM's top-k tokens after `caption`, from scratch: a full LM forward for the
    context and for each candidate (no cache), and the embedder's public embed_texts per candidate."""
    tok, lm = decoder.tokenizer, decoder.lm
    context = [tok.bos_id] + (tok.encode(prompt) if prompt else []) + caption
    out = lm(input_ids=torch.tensor([context]), output_hidden_states=True)
    probs = out.logits[0, -1].softmax(-1)
    top = probs.topk(k).indices.tolist()
    penalty, texts = [], []
    for v in top:
        h_v = lm(input_ids=torch.tensor([context + [v]]), output_hidden_states=True).hidden_states[-1][0, -1]
        penalty.append(F.cosine_similarity(h_v[None], out.hidden_states[-1][0]).max())
        texts.append(tok.decode(caption + [v] if v != tok.eos_id else caption))
    clip = (embedder.model.logit_scale.exp() * (embedder.embed_texts(texts) @ target)).softmax(-1)
    return top, (1 - alpha) * probs[top] - alpha * torch.stack(penalty) + beta * clip


def naive_caption(decoder, embedder, target, k, max_length, prompt=""):
    caption = []
    for _ in range(max_length):
        top, score = hand_scores(decoder, embedder, target, caption, k, prompt)
        v = top[int(score.argmax())]
        if v == decoder.tokenizer.eos_id:
            break
        caption.append(v)
        if "." in decoder.tokenizer.decode([v]):
            break
    return caption


def test_each_token_is_the_argmax_of_magics_score(decoder, embedder, targets):
    reranked = 0
    for target in targets.vectors:
        caption = decoder.search(target[None], decoder.settings({"max_length": 6}))[0]
        assert caption
        for i, token in enumerate(caption):
            top, score = hand_scores(decoder, embedder, target, caption[:i], k=5)
            assert token == top[int(score.argmax())]
            reranked += token != top[0]
    assert reranked  # the embedder's term overruled the LM's first choice somewhere


def test_kv_cached_batched_search_equals_the_naive_loop(decoder, embedder, targets):
    for prompt in ("", "a"):
        cached = decoder.search(targets.vectors, decoder.settings({"max_length": 6, "prompt": prompt}))
        naive = [naive_caption(decoder, embedder, t, 5, 6, prompt) for t in targets.vectors]
        assert cached == naive
    assert len(set(map(tuple, cached))) > 2  # the targets got different captions


def test_batched_decoding_equals_decoding_each_alone(decoder, targets):
    for beams in (1, 3):
        together = decoder.decode(targets, num_beams=beams)
        assert together == [decoder.decode(targets.select([i]), num_beams=beams)[0] for i in range(len(targets))]
    assert decoder.decode(targets, num_beams=3) != decoder.decode(targets)  # beams do search more


def test_without_the_reranking_terms_it_is_the_lms_greedy_decoding(decoder, targets):
    tok = decoder.tokenizer
    ids = decoder.search(targets.vectors[:1], decoder.settings({"alpha": 0.0, "beta": 0.0, "stop": ""}))[0]
    greedy = decoder.lm.generate(torch.tensor([[tok.bos_id]]), max_new_tokens=8, do_sample=False,
                                 eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)[0, 1:].tolist()
    assert ids == (greedy[:greedy.index(tok.eos_id)] if tok.eos_id in greedy else greedy)


def test_a_caption_ends_with_the_token_holding_the_stop_text(decoder, targets):
    tok = decoder.tokenizer
    plain = decoder.search(targets.vectors, decoder.settings({"stop": ""}))
    word = tok.decode([plain[0][1]])  # a word the decoder says mid-caption
    stopped = decoder.search(targets.vectors, decoder.settings({"stop": word}))
    for ids, full in zip(stopped, plain):
        ends = [i for i, t in enumerate(full) if word in tok.decode([t])]
        assert ids == (full[:ends[0] + 1] if ends else full)
    assert decoder.caption_text(tok.encode("a red circle"), "red") == "a red"


def test_save_load_round_trip_and_embedder_checks(decoder, embedder, targets, tmp_path):
    from safetensors import safe_open

    from tests.conftest import TINY_ARCH
    from unembed.embedders import Embedder

    first = decoder.decode(targets)
    decoder.save(tmp_path / "it")
    with safe_open(str(tmp_path / "it" / "model.safetensors"), "pt") as f:
        assert all(key.startswith("lm.") for key in f.keys())  # the embedder's weights are not saved here
    again = load_decoder(tmp_path / "it")  # attaches the embedder its config names
    assert again.embedder.id == embedder.id and again.decode(targets) == first
    assert load_decoder(tmp_path / "it", embedder=embedder).decode(targets, num_beams=2) == decoder.decode(
        targets, num_beams=2)
    untrained = Embedder.from_config(TINY_ARCH)
    with pytest.raises(MismatchError, match="tiny-clip"):
        load_decoder(tmp_path / "it", embedder=untrained)
    with pytest.raises(BadInputError, match="option do_sample: the iterative decoder does not take it"):
        decoder.decode(targets, do_sample=True)
    with pytest.raises(MismatchError, match="num_beams"):
        decoder.decode(targets, num_beams=6)


def test_a_hub_lm_offline_fails_fast_in_one_line(embedder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hub is unreachable"):
        IterativeDecoder.build(embedder, lm="gpt2")


def test_train_lm_lowers_the_loss_and_writes_a_transformers_model(lm_dir, decoder):
    from transformers import AutoModelForCausalLM

    out, report = lm_dir
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    # Better than guessing uniformly among the vocabulary, on captions held out of training.
    assert report["val_perplexity"] < decoder.tokenizer.vocab_size / 4, report
    lm = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[decoder.tokenizer.bos_id] + decoder.tokenizer.encode("a red circle")])
    with torch.no_grad():
        assert torch.allclose(lm(ids).logits, decoder.lm(ids).logits)


def test_command_line_trains_an_lm_packages_the_decoder_and_captions(tmp_path, scenes_dir, embedder_dir):
    from unembed.cli import EXIT_OK, main

    lm, decoder = tmp_path / "lm", tmp_path / "iterative"
    assert main(["train", "lm", "--data", str(scenes_dir), "--out", str(lm), "--tokenizer", "corpus:100",
                 "--lm-config", json.dumps(TINY_LM), "--max-steps", "3", "--batch-size", "16", "--device", "cpu"]) == EXIT_OK
    assert "val_perplexity" in json.loads((lm / "metrics.json").read_text())
    assert main(["train", "iterative", "--embedder", str(embedder_dir), "--lm", str(lm), "--out", str(decoder),
                 "--k", "3", "--max-length", "5", "--prompt", "Image of a", "--device", "cpu"]) == EXIT_OK
    assert json.loads((decoder / "config.json").read_text())["config"]["prompt"] == "Image of a"
    out = tmp_path / "captions.jsonl"
    images = sorted((scenes_dir / "test" / "images").glob("*.png"))[:3]
    assert main(["caption", *map(str, images), "--decoder", str(decoder), "--out", str(out), "--device", "cpu"]) == EXIT_OK
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["decoder"] for r in records] == ["iterative"] * 3
    assert all(isinstance(r["caption"], str) and not r["caption"].startswith("Image of a") for r in records)
