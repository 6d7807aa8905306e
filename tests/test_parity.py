"""Parity with each published method's own inference, from image FILES, as a user runs it.

For ClipCap (MLP mapper with its fine-tuned GPT-2; transformer mapper over a frozen GPT-2), CapDec and
DeCap (with its projection onto a caption memory), a checkpoint in the project's own key layout is
imported with `unembed import`, then `unembed caption IMAGE_FILES --decoder DIR` and `unembed serve`
caption the same image files. The reference is the official inference written out here from the
projects' code over the same files: open_clip loads the hub-cache CLIP from its folder
(`local-dir:`), its preprocessing reads the images, `encode_image` gives CLIP's RAW output, and
- ClipCap (rmokady/CLIP_prefix_caption, predict.py): the raw vector -> clip_project -> greedy loop;
- CapDec (DavidHuji/CapDec): the vector normalised, then as ClipCap;
- DeCap (dhg-wei/DeCap): normalised, projected (softmax(100 v T^T) T, normalised again) onto the
  normalised text embeddings of the memory captions -> clip_project -> greedy loop to CLIP's end token.
Each test also runs the reference with the normalisation flipped and requires different captions,
so a pipeline that normalised (or not) where the method does not would fail it.
"""
import json
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F

from tests.hub_cache import CLIP
from tests.test_published import (EOT, SOT, _gpt2_state, _mlp_project, _transformer_project,  # noqa: F401
                                  base_gpt2, hub, official_greedy, official_mlp, official_transformer)
from tests.test_readme import run_in_one_process
from tests.test_serve import serve_process

CLIP_DIM = 64  # the hub cache's CLIP
VARIANTS = ("clipcap-mlp", "clipcap-transformer", "capdec", "decap")
# ClipCap's generate2 writes up to entry_length=67 tokens; both sides are given 20 here (its parameter,
# unembed's --max-length), which keeps the naive reference loops to seconds. DeCap's loop keeps its 30.
CLIPCAP_LENGTH = 20


@pytest.fixture(scope="module")
def official_clip(hub):
    """open_clip's own loading of the hub-cache CLIP, from its snapshot folder, with its preprocessing."""
    from unembed.compat import import_open_clip

    open_clip = import_open_clip()
    snapshot = next((hub / "hub" / ("models--" + CLIP.replace("/", "--")) / "snapshots").iterdir())
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{snapshot}", device="cpu")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{snapshot}")


@pytest.fixture(scope="module")
def image_files(scenes_dir):
    return sorted((scenes_dir / "test" / "images").glob("*.png"))[:8]


@pytest.fixture(scope="module")
def raw_features(official_clip, image_files):
    """CLIP's raw encode_image output for each file, as the official scripts compute it."""
    from PIL import Image

    model, preprocess, _ = official_clip
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in image_files])
        features = model.encode_image(pixels).float()
    norms = features.norm(dim=-1)
    assert ((norms - 1).abs() > 0.2).all(), norms  # raw and normalised inputs really differ
    return features


@pytest.fixture(scope="module")
def memory_captions(scenes_dir, official_clip, raw_features):
    """DeCap's memory: the 40 training captions nearest the test images. With random weights a memory
    of arbitrary captions puts every image on one caption (the softmax at 100 saturates); near ones
    keep the projection, and so the captions, sensitive to the image and to its normalisation."""
    from unembed.data.splits import split_captions

    model, _, tokenizer = official_clip
    captions = list(dict.fromkeys(split_captions(scenes_dir / "train")))
    with torch.no_grad():
        texts = F.normalize(model.encode_text(tokenizer(captions)).float(), dim=-1)
    nearest = (F.normalize(raw_features, dim=-1) @ texts.T).mean(0).topk(40).indices
    return [captions[i] for i in nearest.tolist()]


@pytest.fixture(scope="module")
def imported(hub, base_gpt2, tmp_path_factory, memory_captions):
    """Each variant's checkpoint in the official layout, imported with `unembed import` (a fresh process:
    open_clip loads the hub CLIP); returns {variant: (state, lm, reference caption function)}."""
    from unembed.compat import import_transformers
    from unembed.tokenizers import ClipBpeTokenizer, HFTokenizer

    gpt, snapshot = base_gpt2
    work = tmp_path_factory.mktemp("parity")
    generator, width = torch.Generator().manual_seed(11), gpt.config.n_embd
    tokenizer = HFTokenizer(str(snapshot))
    stops = {tokenizer.encode_piece(".")[0], tokenizer.eos_id}
    made = {}
    # "Fine-tuned" GPT-2s: other weights than the hub's, large enough for the prefix to steer the words
    # (at GPT-2's own init scale a random LM writes one caption whatever it is given).
    torch.manual_seed(13)
    steerable = type(gpt.config)(**{**gpt.config.to_dict(), "initializer_range": 0.5})
    tuned = type(gpt)(steerable).eval()
    made["clipcap-mlp"] = ({**_mlp_project(width, generator, CLIP_DIM), **_gpt2_state(tuned, "gpt.")}, tuned,
                           "clipcap", official_mlp)
    # The frozen hub GPT-2 under a transformer mapper whose input layer and constants are scaled down,
    # which keeps its (random) captions apart across these similar images.
    transformer = {k: v * 0.2 if k.startswith(("clip_project.linear.", "clip_project.prefix_const")) else v
                   for k, v in _transformer_project(width, generator, CLIP_DIM).items()}
    made["clipcap-transformer"] = (transformer, gpt, "clipcap", official_transformer)
    tuned_capdec = type(gpt)(steerable).eval()
    made["capdec"] = ({**_mlp_project(width, generator, CLIP_DIM), **_gpt2_state(tuned_capdec, "gpt.")},
                      tuned_capdec, "capdec", official_mlp)
    transformers = import_transformers()
    torch.manual_seed(12)
    decap_lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=49408, n_positions=40, n_embd=32, n_layer=1, n_head=4, bos_token_id=SOT, eos_token_id=EOT,
        initializer_range=0.5)).eval()  # weights large enough for the prefix to steer the words
    made["decap"] = ({**_gpt2_state(decap_lm, "decoder."), "clip_project.model.0.weight": torch.randn(32, CLIP_DIM) * 10,
                      "clip_project.model.0.bias": torch.randn(32) * 0.1}, decap_lm, "decap", None)
    (work / "memory.txt").write_text("\n".join(memory_captions) + "\n")
    commands = []
    for variant, (state, _, kind, _) in made.items():
        torch.save(state, work / f"{variant}.pt")
        extra = ["--memory", "memory.txt"] if kind == "decap" else []
        commands.append(["import", kind, f"{variant}.pt", "--out", variant, "--embedder", f"hf-hub:{CLIP}", *extra])
    run_in_hub(commands, hub, work)
    return work, made, (tokenizer, stops), ClipBpeTokenizer()


def run_in_hub(commands: list[list[str]], hub, cwd):
    """`unembed` commands in one fresh process (open_clip reads the hub cache's place at import), with
    the hub cache as HF_HOME, offline: the start-up is paid once. Each must exit 0."""
    return run_in_one_process([["unembed", *argv] for argv in commands], cwd, lambda argv: [],
                              env={"HF_HOME": str(hub), "HF_HUB_OFFLINE": "1"})


def reference_captions(variant, imported, official_clip, raw_features, memory_captions, normalise: bool) -> list[str]:
    """The official inference of `variant` over the raw CLIP features, normalised first or not."""
    _, made, (tokenizer, stops), clip_bpe = imported
    state, lm, kind, project = made[variant]
    vectors = F.normalize(raw_features, dim=-1) if normalise else raw_features
    captions = []
    if kind == "decap":
        model, _, clip_tokenizer = official_clip
        with torch.no_grad():
            texts = F.normalize(model.encode_text(clip_tokenizer(memory_captions)).float(), dim=-1)
        for v in vectors:
            sim = ((v[None] @ texts.T) * 100).softmax(dim=-1)
            prefix = F.normalize(sim @ texts, dim=-1)
            embeds = F.linear(prefix, state["clip_project.model.0.weight"], state["clip_project.model.0.bias"])
            ids = official_greedy(lm, embeds.view(1, 1, -1), {EOT}, 30)
            captions.append(clip_bpe.decode([t for t in ids if t not in (SOT, EOT)]))
        return captions
    for v in vectors:
        ids = official_greedy(lm, project(state, v[None]), stops, CLIPCAP_LENGTH)
        captions.append(tokenizer.decode([t for t in ids if t != tokenizer.eos_id]))
    return captions


# What each method feeds its mapper: ClipCap CLIP's raw output, CapDec and DeCap normalised vectors.
NORMALISES = {"clipcap-mlp": False, "clipcap-transformer": False, "capdec": True, "decap": True}


@pytest.fixture(scope="module")
def references(imported, official_clip, raw_features, memory_captions):
    found = {}
    for variant in VARIANTS:
        right = reference_captions(variant, imported, official_clip, raw_features, memory_captions, NORMALISES[variant])
        flipped = reference_captions(variant, imported, official_clip, raw_features, memory_captions,
                                     not NORMALISES[variant])
        assert len(set(right)) > 1, (variant, right)  # the images give different captions: a mix-up shows
        assert right != flipped, variant              # the normalisation decides captions: a flip would fail
        found[variant] = right
    return found


def length_option(variant: str) -> list[str]:
    return [] if variant == "decap" else ["--max-length", str(CLIPCAP_LENGTH)]


@pytest.mark.slow(seconds=25)
def test_unembed_caption_from_image_files_equals_each_methods_official_inference(hub, imported, image_files,
                                                                                   references):
    work = imported[0]
    run_in_hub([["caption", *map(str, image_files), "--decoder", variant, "--device", "cpu", "--out", f"{variant}.jsonl",
                 *length_option(variant)] for variant in VARIANTS], hub, work)
    for variant in VARIANTS:
        got = [json.loads(line)["caption"] for line in (work / f"{variant}.jsonl").read_text().splitlines()]
        assert got == references[variant], variant


@pytest.mark.slow(seconds=12)
def test_serve_captions_the_same_files_as_the_official_inference(hub, imported, image_files, references):
    import os

    work = imported[0]
    env = dict(os.environ, HF_HOME=str(hub), HF_HUB_OFFLINE="1")
    options = ["--device", "cpu"] + [a for variant in VARIANTS for a in ("--decoder", variant)]
    with serve_process(options, work, env) as url:
        for variant in VARIANTS:
            files = [("file", (p.name, p.read_bytes(), "image/png")) for p in image_files[:4]]
            params = {"decoder": variant, **({} if variant == "decap" else {"max_length": CLIPCAP_LENGTH})}
            reply = httpx.post(f"{url}/caption", params=params, files=files, timeout=120)
            assert reply.status_code == 200, (variant, reply.text)
            assert [r["caption"] for r in reply.json()] == references[variant][:4], variant
            reply = httpx.post(f"{url}/caption", params=params, timeout=120,
                               files={"file": (image_files[5].name, image_files[5].read_bytes(), "image/png")})
            assert reply.json()[0]["caption"] == references[variant][5], variant


def test_an_embeddings_file_says_whether_its_vectors_are_raw(tmp_path, embedder, scenes_dir):
    """unembed's embeddings files keep the embedder's raw output and say so; a bare file is read off its rows."""
    from safetensors.torch import save_file

    from unembed.data.vectors import open_embeddings
    from unembed.embedders import Embedded
    from unembed.data.images import iter_pixel_batches

    paths = sorted((scenes_dir / "test" / "images").glob("*.png"))[:4]
    (files, pixels), = iter_pixel_batches(paths, 8, embedder.preprocess)
    embedded = embedder.embed_pixels(pixels, [p.stem for p in files])
    with torch.no_grad():
        raw = embedder.model.encode_image(pixels, normalize=False).float()
    torch.testing.assert_close(embedded.vectors, raw)
    assert not embedded.normalized
    torch.testing.assert_close(embedded.unit(), F.normalize(raw, dim=-1))
    embedded.save(tmp_path / "e.safetensors")
    loaded = Embedded.load(tmp_path / "e.safetensors")
    assert not loaded.normalized and torch.equal(loaded.vectors, embedded.vectors)
    (batch, _), = open_embeddings(tmp_path / "e.safetensors").batches(8)
    assert not batch.normalized and torch.equal(batch.vectors, embedded.vectors)
    save_file({"x": F.normalize(raw, dim=-1)}, str(tmp_path / "unit.safetensors"))
    save_file({"x": raw * 3}, str(tmp_path / "raw.safetensors"))
    assert Embedded.load(tmp_path / "unit.safetensors").normalized
    assert not Embedded.load(tmp_path / "raw.safetensors").normalized
    (batch, _), = open_embeddings(tmp_path / "raw.safetensors").batches(8)
    assert not batch.normalized and torch.equal(batch.vectors, raw * 3)
