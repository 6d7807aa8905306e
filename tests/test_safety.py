"""Trust: no file is ever unpickled, and training survives SIGKILL (also mid-checkpoint) and resumes
to the same weights as an uninterrupted run."""
import json
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import TINY_ARCH
from unembed.cli import EXIT_FAILED, main
from unembed.io import load_tensors


class _Exploit:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path, marker):
    with open(path, "wb") as f:
        pickle.dump(_Exploit(marker), f)


def test_malicious_pickles_are_refused_everywhere(tmp_path, retrieval_dir, embedder_dir, scenes_dir):
    marker = tmp_path / "PWNED"
    # as embeddings to caption
    _plant(tmp_path / "evil.safetensors", marker)
    assert main(["caption", "--embeddings", str(tmp_path / "evil.safetensors"), "--decoder", str(retrieval_dir)]) == EXIT_FAILED
    # as a decoder's weights
    decoder = tmp_path / "decoder"
    shutil.copytree(retrieval_dir, decoder)
    _plant(decoder / "model.safetensors", marker)
    assert main(["caption", str(scenes_dir / "test" / "images"), "--decoder", str(decoder)]) == EXIT_FAILED
    # as an embedder's weights
    embedder = tmp_path / "embedder"
    shutil.copytree(embedder_dir, embedder)
    _plant(embedder / "model.safetensors", marker)
    assert main(["embed", str(scenes_dir / "test" / "images"), "--embedder", str(embedder),
                 "--out", str(tmp_path / "e.safetensors")]) == EXIT_FAILED
    # as a JSON config or results file
    _plant(tmp_path / "results.json", marker)
    assert main(["eval", "--results", str(tmp_path / "results.json"),
                 "--refs", str(scenes_dir / "test" / "captions.json")]) == EXIT_FAILED
    # the test itself is able to detect an unpickling:
    assert not marker.exists()
    with open(tmp_path / "evil.safetensors", "rb") as f:
        pickle.load(f)
    assert marker.exists()


def _train_command(scenes_dir, out, *extra):
    arch = {k: TINY_ARCH["model_cfg"]["vision_cfg"][k] for k in ("image_size",)}
    arch.update(embed_dim=32, vision_width=8, text_width=32, text_layers=1, context_length=24)
    return [sys.executable, "-m", "unembed.cli", "train", "clip", "--data", str(scenes_dir), "--out", str(out),
            "--arch", json.dumps(arch), "--max-steps", "12", "--batch-size", "16", "--checkpoint-every", "1",
            "--warmup-steps", "2", "--device", "cpu", "--seed", "5", *extra]


def _weights(directory):
    return load_tensors(directory / "model.safetensors")[0]


def _logged_steps(out):
    log = out / "train_log.jsonl"
    return len(log.read_text().splitlines()) if log.is_file() else 0


@pytest.mark.slow(seconds=27)
def test_sigkill_mid_training_then_resume_matches_uninterrupted(tmp_path, scenes_dir):
    full = tmp_path / "full"
    subprocess.run(_train_command(scenes_dir, full), check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_command(scenes_dir, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _logged_steps(killed) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    latest = json.loads((killed / "checkpoints" / "latest.json").read_text())
    assert 1 <= latest["step"] < 12 and not (killed / "config.json").exists()

    # What a kill during a checkpoint write leaves: a half-written temporary directory. It must be ignored.
    debris = killed / "checkpoints" / f".step-{latest['step'] + 1:08d}.tmp"
    debris.mkdir(exist_ok=True)
    (debris / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"trunc")
    subprocess.run(_train_command(scenes_dir, killed, "--resume"), check=True, capture_output=True, timeout=600)
    a, b = _weights(full), _weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_atomic_writes_get_the_mode_a_plain_write_gets(tmp_path):
    import os
    import stat

    from unembed.io import write_json

    (tmp_path / "plain.json").write_text("{}")
    write_json(tmp_path / "atomic.json", {"a": 1})
    mode = lambda name: stat.S_IMODE(os.stat(tmp_path / name).st_mode)  # noqa: E731
    assert mode("atomic.json") == mode("plain.json")


def test_a_safetensors_header_length_starting_with_pickles_magic_byte_still_loads(tmp_path):
    """0x80 is pickle's first byte and also the low byte of some safetensors header lengths."""
    import torch

    from unembed.io import load_tensors, save_tensors

    for pad in range(256):
        path = tmp_path / "weights.safetensors"
        save_tensors(path, {"w": torch.ones(2)}, {"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        raise AssertionError("no padding gave a header length with low byte 0x80")
    tensors, metadata = load_tensors(path)
    assert tensors["w"].tolist() == [1.0, 1.0]
