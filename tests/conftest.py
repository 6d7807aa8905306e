"""Shared tiny fixtures: a small scenes dataset, a tiny embedder trained on it for a few steps,
and a retrieval decoder built from its captions. Session-scoped: built once, seconds in all.

Nothing outside the session's temporary folders can make a test pass: HOME and every cache a library
looks in (HF_HOME, XDG_CACHE_HOME; TORCH_HOME and the other cache variables are unset, so they fall
inside) are set here, before anything imports huggingface_hub or open_clip (both read them once, at
import), for this process and the processes tests start; and every test runs in an empty folder of
its own, not the repository (tests that run a README command from a clone pass cwd=REPO)."""
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# One folder per process (each pytest-xdist worker imports this file itself), removed at the end.
_ISOLATED = Path(tempfile.mkdtemp(prefix="unembed-tests-"))
_CACHE_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_DATASETS_CACHE",
                    "HF_EVALUATE_CACHE", "HF_MODULES_CACHE", "HF_XET_CACHE", "TRANSFORMERS_CACHE",
                    "PYTORCH_TRANSFORMERS_CACHE", "PYTORCH_PRETRAINED_BERT_CACHE", "TORCH_HOME",
                    "HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH", "XDG_DATA_HOME", "XDG_CONFIG_HOME")


def _isolate_environment(base: Path) -> None:
    already = [m for m in ("huggingface_hub", "open_clip", "transformers", "datasets", "evaluate") if m in sys.modules]
    assert not already, f"{already} imported before tests/conftest.py could point their caches into {base}"
    home = base / "home"
    for folder in (home / ".cache", base / "cwd"):
        folder.mkdir(parents=True)
    for name in _CACHE_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update({"HOME": str(home), "USERPROFILE": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
                       "HF_HOME": str(home / ".cache" / "huggingface")})


_isolate_environment(_ISOLATED)

import pytest  # noqa: E402

from unembed.embedders import scenes_config  # noqa: E402

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
    with pytest.MonkeyPatch.context() as mp:  # the 12 val images stand in for a real val split
        mp.setattr("unembed.training.prefix.MIN_MARGIN_IMAGES", 1)
        code = main(["compare", "--data", str(scenes_dir), "--decoders", "retrieval,decap", "--embedder",
                     str(embedder_dir), "--out", str(out), "--max-steps", "2", "--config", config, "--no-spice",
                     "--device", "cpu"])
    return out, code


@pytest.fixture(scope="session", autouse=True)
def _session_cwd():
    """Session fixtures are built in an empty folder, not wherever pytest was started."""
    before = os.getcwd()
    os.chdir(_ISOLATED / "cwd")
    yield
    os.chdir(before)


@pytest.fixture(autouse=True)
def _test_cwd(tmp_path_factory, monkeypatch):
    """Each test runs in an empty folder of its own (not its tmp_path, which the test may list)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def pytest_unconfigure(config):
    shutil.rmtree(_ISOLATED, ignore_errors=True)


def pytest_collection_modifyitems(items):
    """The longest tests first, by the seconds their `slow` marker says (measured alone on 2 cores): with
    `pytest -n 2 --dist worksteal` (the Makefile's) one worker starts on them while the other runs the
    short ones and then takes over the rest of the queue, so no minutes-long test starts last and runs alone."""
    def expected_seconds(item):
        marker = item.get_closest_marker("slow")
        return 0 if marker is None else marker.kwargs.get("seconds", 60)

    items.sort(key=expected_seconds, reverse=True)
