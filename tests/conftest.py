"""Shared tiny fixtures: a small scenes dataset, a tiny embedder trained on it for a few steps,
and a retrieval decoder built from its captions. Session-scoped: built once, seconds in all."""
import os

import pytest

from unembed.embedders import scenes_config

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several workers share the cores: one thread each (and in the processes tests start), not one per core
    # each, which only makes them take turns.
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

TINY_ARCH = scenes_config(image_size=32, embed_dim=32, vision_width=8, text_width=32, text_layers=1,
                          context_length=24, name="tiny-clip")


@pytest.fixture(scope="session")
def scenes_dir(tmp_path_factory):
    from unembed.data.scenes import write_scenes

    out = tmp_path_factory.mktemp("scenes")
    write_scenes(out, n=96, n_eval=12, image_size=32, seed=0)
    return out


@pytest.fixture(scope="session")
def embedder_dir(tmp_path_factory, scenes_dir):
    from unembed.training.clip import train_clip
    from unembed.training.loop import TrainConfig

    out = tmp_path_factory.mktemp("embedder")
    train_clip(scenes_dir, out, TrainConfig(max_steps=4, batch_size=32, warmup_steps=1, device="cpu"),
               arch=TINY_ARCH, progress=False)
    return out


@pytest.fixture(scope="session")
def embedder(embedder_dir):
    from unembed.embedders import Embedder

    return Embedder.load(embedder_dir, device="cpu")


@pytest.fixture(scope="session")
def retrieval_dir(tmp_path_factory, scenes_dir, embedder):
    from unembed.data.captions import load_captions
    from unembed.decoders.retrieval import RetrievalDecoder

    out = tmp_path_factory.mktemp("retrieval")
    RetrievalDecoder.build(embedder, load_captions(scenes_dir / "train" / "captions.json")).save(out)
    return out


@pytest.fixture(scope="session")
def compare_dir(tmp_path_factory, scenes_dir, embedder_dir):
    """`unembed compare` of two cheap decoders on the tiny scenes set (one trained here, decap for 2 steps)."""
    from unembed.cli import main

    out = tmp_path_factory.mktemp("compare")
    config = '{"decap": {"lm_config": {"n_layer": 1, "n_embd": 32}, "projection_size": 50}}'
    code = main(["compare", "--data", str(scenes_dir), "--decoders", "retrieval,decap", "--embedder",
                 str(embedder_dir), "--out", str(out), "--max-steps", "2", "--config", config, "--no-spice",
                 "--device", "cpu"])
    return out, code


def pytest_collection_modifyitems(items):
    """The minutes-long tests first: with several workers (pytest -n 2) they start at once and the
    short ones fill in around them, instead of one long test running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
