"""Writes that cannot destroy: --out is new, empty or a decoder (replaced only with --overwrite), and a
decoder is saved beside its target and renamed into place, so a crash leaves the old one whole."""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import unembed
from unembed.cli import EXIT_FAILED, EXIT_OK, main
from unembed.decoders import load_decoder


def _lines(err):
    return [line for line in err.splitlines() if line.strip()]


def _decap_checkpoint(path, seed: int) -> None:
    """A published DeCap checkpoint in its key layout (a one-layer GPT-2 over CLIP's BPE, tiny)."""
    from unembed.compat import import_transformers

    transformers = import_transformers()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=49408, n_positions=40, n_embd=32, n_layer=1, n_head=4)
    state = {f"decoder.{k}": v for k, v in transformers.GPT2LMHeadModel(config).state_dict().items()}
    state |= {"clip_project.model.0.weight": torch.randn(32, 32), "clip_project.model.0.bias": torch.randn(32)}
    torch.save(state, path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("published")
    for seed in (0, 1):
        _decap_checkpoint(folder / f"decap{seed}.pt", seed)
    return folder


def test_import_refuses_a_folder_of_other_things_and_deletes_nothing(checkpoints, tmp_path, capsys):
    models = tmp_path / "models"
    (models / "mine").mkdir(parents=True)
    (models / "mine" / "config.json").write_text("{}")
    (models / "notes.txt").write_text("keep me")
    code = main(["import", "decap", str(checkpoints / "decap0.pt"), "--out", str(models)])
    assert code == EXIT_FAILED
    [line] = _lines(capsys.readouterr().err)
    assert str(models) in line and "neither empty nor an unembed decoder directory" in line
    assert sorted(p.name for p in models.rglob("*")) == ["config.json", "mine", "notes.txt"]
    assert (models / "notes.txt").read_text() == "keep me"


def test_import_over_a_decoder_needs_overwrite(checkpoints, tmp_path, capsys):
    out = tmp_path / "imported"
    assert main(["import", "decap", str(checkpoints / "decap0.pt"), "--out", str(out)]) == EXIT_OK
    first = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["import", "decap", str(checkpoints / "decap1.pt"), "--out", str(out)]) == EXIT_FAILED
    [line] = _lines(capsys.readouterr().err)
    assert line == f"unembed: {out}: already holds an unembed decoder; give --overwrite to replace it"
    assert (out / "model.safetensors").read_bytes() == first
    (out / "stale.txt").write_text("from before")
    assert main(["import", "decap", str(checkpoints / "decap1.pt"), "--out", str(out), "--overwrite"]) == EXIT_OK
    assert (out / "model.safetensors").read_bytes() != first and not (out / "stale.txt").exists()
    load_decoder(out)
    assert [p.name for p in tmp_path.iterdir()] == ["imported"]  # no staging or old folder left beside it


def test_import_into_an_empty_folder(checkpoints, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["import", "decap", str(checkpoints / "decap0.pt"), "--out", str(tmp_path / "empty")]) == EXIT_OK
    load_decoder(tmp_path / "empty")


def test_build_and_train_refuse_an_out_that_is_not_theirs(embedder_dir, scenes_dir, retrieval_dir, tmp_path, capsys):
    captions = str(scenes_dir / "train" / "captions.json")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    for argv in (["build", "retrieval", "--captions", captions], ["train", "clipcap", "--data", str(scenes_dir)]):
        assert main([*argv, "--embedder", str(embedder_dir), "--out", str(folder), "--device", "cpu"]) == EXIT_FAILED
        [line] = _lines(capsys.readouterr().err)
        assert "neither empty nor an unembed decoder directory" in line
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    decoder = tmp_path / "decoder"
    shutil.copytree(retrieval_dir, decoder)
    argv = ["build", "retrieval", "--captions", captions, "--embedder", str(embedder_dir), "--out", str(decoder)]
    assert main(argv) == EXIT_FAILED
    assert "give --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == EXIT_OK
    # an embedder directory is not a decoder's to replace, nor the other way round
    assert main(["train", "clip", "--data", str(scenes_dir), "--out", str(decoder), "--overwrite"]) == EXIT_FAILED
    assert "neither empty nor an unembed embedder directory" in capsys.readouterr().err


def test_a_save_keeps_what_else_the_folder_holds_unless_replacing(retrieval_dir, tmp_path):
    """The training loop saves into OUT, beside its checkpoints and log: they stay."""
    decoder, target = load_decoder(retrieval_dir), tmp_path / "decoder"
    (target / "checkpoints").mkdir(parents=True)
    (target / "train_log.jsonl").write_text("{}\n")
    decoder.save(target)
    assert (target / "checkpoints").is_dir() and (target / "train_log.jsonl").is_file()
    decoder.save(target, replace=True)
    assert not (target / "checkpoints").exists() and load_decoder(target).memory.texts == decoder.memory.texts
    assert [p.name for p in tmp_path.iterdir()] == ["decoder"]


KILLED_SAVE = """
import os, signal, sys

import unembed.decoders.base as base
from unembed.decoders.retrieval import RetrievalDecoder
from unembed.embedders import Embedder

target, embedder_dir = sys.argv[1:]
new = RetrievalDecoder.build(Embedder.load(embedder_dir, device="cpu"), ["a red circle", "a blue square", "a cat"])
real = base.save_module


def save_module_then_die(path, module):  # the weights are written, their config.json is not
    real(path, module)
    os.kill(os.getpid(), signal.SIGKILL)


base.save_module = save_module_then_die
new.save(target)
"""


def test_a_save_killed_midway_leaves_the_old_decoder(retrieval_dir, embedder_dir, tmp_path):
    target = tmp_path / "decoder"
    shutil.copytree(retrieval_dir, target)
    old = load_decoder(target)
    here = str(Path(unembed.__file__).parents[1])  # the child runs the code under test, wherever it lies
    done = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(target), str(embedder_dir)], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=here))
    assert done.returncode == -signal.SIGKILL, done.stderr
    again = load_decoder(target)
    assert again.memory.texts == old.memory.texts
    assert all(torch.equal(again.state_dict()[k], v) for k, v in old.state_dict().items())
