"""CoCa: training with both losses, and captioning from embedded image tokens with a KV cache that
agrees with open_clip's own CoCa (its greedy `generate`, its full forward) token for token."""
import json
import shutil

import pytest
import torch

from tests.conftest import TINY_ARCH
from unembed.compat import import_open_clip
from unembed.decoders import load_decoder
from unembed.decoders.coca import CoCaDecoder, CoCaStep
from unembed.embedders import Embedder
from unembed.errors import BadInputError, MismatchError
from unembed.training.coca import init_decoder_projection, scenes_coca_config, train_coca
from unembed.training.loop import TrainConfig

TINY_COCA = scenes_coca_config(image_size=32, embed_dim=32, patch_size=8, vision_width=32, vision_layers=1,
                               text_layers=2, decoder_layers=2, image_tokens=8, context_length=16, name="tiny-coca")
START, END = 49406, 49407


@pytest.fixture(scope="module")
def coca_dir(tmp_path_factory, scenes_dir):
    out = tmp_path_factory.mktemp("coca")
    train_coca(scenes_dir, out, TrainConfig(max_steps=10, batch_size=8, lr=2e-3, warmup_steps=2, device="cpu"),
               arch=TINY_COCA, progress=False)
    return out


@pytest.fixture(scope="module")
def random_coca(images):
    """An untrained tiny CoCa, its end-token logit scaled until greedy captions end at different
    lengths: a CoCa trained for seconds repeats "a" to the limit, which would leave endings untested."""
    torch.manual_seed(0)
    embedder = Embedder.from_config(TINY_COCA, device="cpu")
    init_decoder_projection(embedder.model)
    decoder = CoCaDecoder.for_embedder(embedder)
    embedded = embedder.embed(*images, with_tokens=True)
    end_column = embedder.model.text_decoder.text_projection[:, END].clone()
    for scale in (1.5, 2, 3, 4, 6, 8):
        with torch.no_grad():
            embedder.model.text_decoder.text_projection[:, END] = scale * end_column
        if all(len({len(ids) for ids in decoder.generate(embedded, num_beams=1, max_length=12, min_length=m)}) > 1
               for m in (0, 4)):
            return decoder
    pytest.fail("no end-token scale makes this random CoCa's captions end at different lengths")


@pytest.fixture(scope="module")
def images(scenes_dir):
    from PIL import Image

    paths = sorted((scenes_dir / "test" / "images").glob("*.png"))[:6]
    return [Image.open(p).convert("RGB") for p in paths], [p.stem for p in paths]


@pytest.fixture(scope="module")
def embedded(random_coca, images):
    return random_coca.embedder.embed(*images, with_tokens=True)


def _log(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]


def test_training_lowers_both_losses_and_saves_embedder_and_decoder(coca_dir):
    log = _log(coca_dir)
    for name in ("contrastive_loss", "caption_loss"):
        first, last = [r[name] for r in log[:3]], [r[name] for r in log[-3:]]
        assert sum(last) / 3 < sum(first) / 3 - 0.2, (name, first, last)
    config = json.loads((coca_dir / "config.json").read_text())
    saved_embedder = json.loads((coca_dir / "embedder" / "config.json").read_text())
    assert config["kind"] == "coca" and config["config"]["embedder_spec"] == "embedder"
    assert config["config"]["embedder_id"] == saved_embedder["id"] and saved_embedder["model_type"] == "coca"
    assert (coca_dir / "model.safetensors").stat().st_size < 100  # the weights live in embedder/ only
    metrics = json.loads((coca_dir / "metrics.json").read_text())
    assert {"i2t_R@1", "t2i_R@5"} <= set(metrics["test"]) and metrics["train_seconds"] > 0
    assert (metrics["contrastive_weight"], metrics["caption_weight"]) == (1.0, 2.0)


@pytest.mark.parametrize("min_seq_len", [1, 5])  # open_clip counts the start token: min_length = min_seq_len - 1
def test_greedy_captions_equal_open_clips_generate(random_coca, images, embedded, min_seq_len):
    open_clip = import_open_clip()
    model, length = random_coca.embedder.model, 12
    pixels = torch.stack([random_coca.embedder.preprocess(im) for im in images[0]])
    # top_k=1 makes open_clip's sampler greedy; seq_len counts the start and the (forced) end token.
    theirs = model.generate(pixels, generation_type="top_k", top_k=1, seq_len=length + 2, min_seq_len=min_seq_len)
    their_ids = [row[1:].tolist() for row in theirs]
    their_ids = [ids[:ids.index(END)] if END in ids else ids for ids in their_ids]
    ours = random_coca.generate(embedded, num_beams=1, max_length=length, min_length=min_seq_len - 1)
    assert ours == their_ids and min(len(ids) for ids in ours) < length  # some captions ended early
    texts = [open_clip.decode(row).split("<end_of_text>")[0].replace("<start_of_text>", "").strip() for row in theirs]
    assert random_coca.decode(embedded, num_beams=1, max_length=length, min_length=min_seq_len - 1) == texts


@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_batch_decodes_as_its_images_one_at_a_time(random_coca, embedded, num_beams):
    together = random_coca.generate(embedded, num_beams=num_beams, max_length=10)
    alone = [random_coca.generate(embedded.select([i]), num_beams=num_beams, max_length=10)[0]
             for i in range(len(embedded))]
    assert together == alone


def _full_logits(model, embedded, tokens):
    out = model(None, tokens, image_latent=embedded.vectors, image_embs=embedded.image_tokens, output_labels=False)
    return out["logits"][:, -1]


@torch.no_grad()
def test_cached_step_logits_equal_a_full_recompute(random_coca, embedded):
    model = random_coca.embedder.model
    tokens = torch.randint(1, START, (len(embedded), 10), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = START
    tokens[0, 3] = tokens[2, 6] = 0  # the pad id ("!"), whose keys open_clip's text tower masks
    step = CoCaStep(model, embedded.image_tokens, beams=1, max_positions=10)
    for t in range(tokens.shape[1]):
        assert torch.allclose(step(tokens[:, t]), _full_logits(model, embedded, tokens[:, :t + 1]), atol=1e-4), t


@torch.no_grad()
def test_reordered_beams_continue_from_their_new_history(random_coca, embedded):
    model, two = random_coca.embedder.model, embedded.select([0, 1])
    beams = 3
    tokens = torch.randint(1, START, (2 * beams, 5), generator=torch.Generator().manual_seed(2))
    tokens[:, 0] = START
    step = CoCaStep(model, two.image_tokens, beams=beams, max_positions=8)
    for t in range(4):
        step(tokens[:, t])
    order = torch.tensor([2, 2, 0, 4, 3, 3])  # rows stay within their image (rows 0-2: image 0, 3-5: image 1)
    tokens = tokens[order]
    image_of_row = two.select([0, 0, 0, 1, 1, 1])
    step.reorder(order)
    assert torch.allclose(step(tokens[:, 4]), _full_logits(model, image_of_row, tokens), atol=1e-4)


def test_save_load_round_trip_and_what_the_decoder_refuses(coca_dir, images, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(coca_dir, moved)  # the embedder is found beside the decoder, wherever it goes
    decoder = load_decoder(moved)
    embedder = Embedder.load(coca_dir / "embedder", device="cpu")
    embedded = embedder.embed(*images, with_tokens=True)
    assert decoder.decode(embedded) == CoCaDecoder.for_embedder(embedder).decode(embedded)
    with pytest.raises(MismatchError, match="needs image token embeddings"):
        decoder.decode(embedder.embed(*images))
    stranger = Embedder.from_config(TINY_COCA, device="cpu").embed(*images, with_tokens=True)
    with pytest.raises(MismatchError, match="built for embedder"):
        decoder.decode(stranger)
    with pytest.raises(MismatchError, match="not a CoCa model"):
        CoCaDecoder.for_embedder(Embedder.from_config(TINY_ARCH, device="cpu"))
    with pytest.raises(BadInputError, match="context of 16 tokens"):
        decoder.decode(embedded, max_length=30)


def test_beam_search_and_sampling_give_well_formed_captions(random_coca, embedded):
    beams = random_coca.generate(embedded, num_beams=3, max_length=10, min_length=4)
    assert all(4 <= len(ids) <= 10 and END not in ids for ids in beams)
    sampled = random_coca.decode(embedded, do_sample=True, top_p=0.9, seed=7, max_length=10)
    assert sampled == random_coca.decode(embedded, do_sample=True, top_p=0.9, seed=7, max_length=10)
    assert sampled != random_coca.decode(embedded, do_sample=True, top_p=0.9, seed=8, max_length=10)
    for caption in random_coca.decode(embedded, num_beams=3, max_length=10) + sampled:
        assert isinstance(caption, str) and caption == caption.strip() and "_of_text>" not in caption


def test_fine_tuning_trains_the_captioner_only(coca_dir, scenes_dir, tmp_path):
    before = Embedder.load(coca_dir / "embedder", device="cpu").model.state_dict()
    report = train_coca(scenes_dir, tmp_path, TrainConfig(max_steps=2, batch_size=8, lr=1e-3, warmup_steps=1,
                                                          device="cpu"), init=str(coca_dir / "embedder"),
                        progress=False)
    assert (report["contrastive_weight"], report["caption_weight"]) == (0.0, 1.0)
    assert all(r["contrastive_loss"] == 0 for r in _log(tmp_path))
    after = load_decoder(tmp_path).embedder.model.state_dict()
    # No contrastive loss: its projections get no gradient (so no update, not even weight decay).
    for name in ("logit_scale", "text.text_projection", "visual.proj"):
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["text_decoder.text_projection"], after["text_decoder.text_projection"])
    with pytest.raises(BadInputError, match="training from scratch"):
        train_coca(scenes_dir, tmp_path / "x", TrainConfig(max_steps=1), arch=TINY_COCA,
                   init=str(coca_dir / "embedder"))


def test_command_line_trains_coca_and_captions_with_it(tmp_path, scenes_dir):
    import json

    from unembed.cli import EXIT_FAILED, EXIT_OK, main

    out = tmp_path / "coca"
    arch = json.dumps({"image_size": 32, "embed_dim": 32, "patch_size": 8, "vision_width": 32, "vision_layers": 1,
                       "text_layers": 1, "decoder_layers": 1, "image_tokens": 4, "context_length": 16})
    assert main(["train", "coca", "--data", str(scenes_dir), "--out", str(out), "--arch", arch, "--max-steps", "2",
                 "--batch-size", "16", "--device", "cpu"]) == EXIT_OK
    captions = tmp_path / "captions.jsonl"
    images = sorted((scenes_dir / "test" / "images").glob("*.png"))[:2]
    assert main(["caption", *map(str, images), "--decoder", str(out), "--max-length", "4", "--out", str(captions),
                 "--device", "cpu"]) == EXIT_OK
    assert [json.loads(line)["decoder"] for line in captions.read_text().splitlines()] == ["coca", "coca"]
    assert main(["train", "coca", "--data", str(scenes_dir), "--out", str(out), "--arch", arch,
                 "--init", str(out / "embedder")]) == EXIT_FAILED


def _reference_beam_search(model, embedded, beams: int, max_length: int, length_penalty: float) -> list[list[int]]:
    """transformers' BeamSearchScorer (the bookkeeping of open_clip's own beam search) driven by open_clip's
    full forward pass, no cache: each step recomputes every prefix from scratch."""
    from unembed.compat import import_transformers

    scorer_class = import_transformers().BeamSearchScorer
    n = len(embedded)
    rows = embedded.select([i for i in range(n) for _ in range(beams)])
    scorer = scorer_class(batch_size=n, num_beams=beams, device="cpu", length_penalty=length_penalty,
                          do_early_stopping=False)
    ids = torch.full((n * beams, 1), START)
    scores = torch.zeros(n, beams)
    scores[:, 1:] = -1e9  # all beams start identical: only one of them may grow at first
    scores = scores.view(-1)
    for _ in range(max_length):
        log_probs = _full_logits(model, rows, ids).float().log_softmax(-1)
        vocab = log_probs.shape[-1]
        top, flat = (log_probs + scores[:, None]).view(n, beams * vocab).topk(2 * beams, dim=1)
        out = scorer.process(ids, top, flat % vocab, flat // vocab, pad_token_id=END, eos_token_id=END,
                             decoder_prompt_len=1)
        scores = out["next_beam_scores"]
        ids = torch.cat([ids[out["next_beam_indices"]], out["next_beam_tokens"][:, None]], 1)
        if scorer.is_done:
            break
    best = scorer.finalize(ids, scores, None, None, max_length=max_length + 1, pad_token_id=END, eos_token_id=END,
                           decoder_prompt_len=1)["sequences"]
    return [[i for i in row[1:].tolist() if i != END][:max_length] for row in best]


@torch.no_grad()
@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_beam_search_equals_transformers_beam_scorer_over_open_clips_forward(random_coca, embedded, length_penalty):
    model = random_coca.embedder.model
    ours = random_coca.generate(embedded, num_beams=3, max_length=10, length_penalty=length_penalty)
    assert ours == _reference_beam_search(model, embedded, 3, 10, length_penalty)
    greedy = random_coca.generate(embedded, num_beams=1, max_length=10)
    assert ours != greedy and len({len(ids) for ids in ours}) > 1  # beams chose otherwise; lengths differ
