"""Training that survives what long runs meet: fp16 overflow, a device or precision that is not there,
a validation that cannot run, a non-finite loss on one of several processes, images of any size,
and weight decay where open_clip puts it."""
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_ARCH
from tests.test_training import CONFIG, _task
from unembed.cli import main
from unembed.training.loop import fit

TINY_ARCH_OPTIONS = json.dumps({"image_size": 32, "embed_dim": 32, "vision_width": 8, "text_width": 32,
                                "text_layers": 1, "context_length": 24})
NO_DROPOUT_LM = json.dumps({"n_layer": 1, "n_embd": 32, "n_head": 2, "resid_pdrop": 0, "embd_pdrop": 0, "attn_pdrop": 0})


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# --- A: mixed precision -------------------------------------------------------------------------

def test_an_fp16_overflow_lowers_the_grad_scale_and_training_goes_on(scenes_dir, tmp_path):
    """The GPU's fp16 path (autocast to fp16, accelerate's scaler) on the CPU: a scale of 2**40 overflows
    the first step; the scaler skips it and lowers the scale, and the run trains on and saves."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40, backoff_factor=2.0 ** -30)
    task = _task(scenes_dir)
    before = [p.detach().clone() for p in task.model.parameters()]
    fit(task, replace(CONFIG, mixed_precision="fp16", max_steps=3), tmp_path, progress=False, grad_scaler=scaler)
    log = _log(tmp_path)
    assert log[0] == {"step": 1, "skipped": "fp16 overflow", "grad_scale": 1024.0}
    assert [r["step"] for r in log[1:]] == [2, 3] and all(torch.isfinite(torch.tensor(r["loss"])) for r in log[1:])
    assert scaler.get_scale() <= 1024.0 * 2  # fell from 2**40 (and may only grow after 2000 good steps)
    after = list(task.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after)) and all(torch.isfinite(p).all() for p in after)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["fp16_overflow_steps"] == 1 and metrics["skipped_steps"] == 0
    assert (tmp_path / "config.json").is_file()  # the embedder was saved


def test_fp16_on_a_cpu_says_it_trains_in_fp32(scenes_dir, tmp_path, capsys):
    fit(_task(scenes_dir), replace(CONFIG, mixed_precision="fp16", max_steps=1), tmp_path, progress=False)
    notes = [line for line in capsys.readouterr().err.splitlines() if "fp16" in line]
    assert notes == ["note: --mixed-precision fp16 needs a GPU; this run is on the cpu and trains in fp32 "
                     "(bf16 runs on CPUs too)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_that_is_not_there_is_one_line_and_exit_2(scenes_dir, tmp_path, capsys):
    from unembed.errors import BadInputError
    from unembed.training.loop import TrainConfig

    with pytest.raises(BadInputError, match="no CUDA devices"):  # fit itself, for library callers too
        fit(_task(scenes_dir), TrainConfig(device="cuda"), tmp_path / "fit", progress=False)
    code = main(["train", "clip", "--data", str(scenes_dir), "--out", str(tmp_path / "out"), "--arch", TINY_ARCH_OPTIONS,
                 "--max-steps", "1", "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0] == ("unembed: device 'cuda': this machine has no CUDA devices "
                                                           "(use --device cpu, or auto)")
    assert not (tmp_path / "out" / "config.json").exists()


# --- B: save first, validate after ----------------------------------------------------------------

def test_a_validation_that_cannot_run_keeps_the_model_and_resume_finishes(scenes_dir, embedder_dir, tmp_path,
                                                                          monkeypatch, capsys):
    no_java = tmp_path / "bin"
    no_java.mkdir()
    monkeypatch.setenv("PATH", str(no_java))  # the metrics look java up on PATH
    out = tmp_path / "capdec"
    argv = ["train", "capdec", "--embedder", str(embedder_dir), "--data", str(scenes_dir), "--out", str(out),
            "--lm", "scratch", "--tokenizer", "corpus:64", "--lm-config", NO_DROPOUT_LM, "--prefix-length", "2",
            "--max-steps", "2", "--batch-size", "8", "--device", "cpu"]
    for resume in ([], ["--resume"]):
        assert main(argv + resume) == 0
        warnings = [line for line in capsys.readouterr().err.splitlines() if "validation" in line]
        assert len(warnings) == 1 and warnings[0].startswith("warning: validation not run: pycocoevalcap needs Java")
        assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["validation"].startswith("not run: pycocoevalcap needs Java") and metrics["train_steps"] == 2


# --- C: a non-finite loss on one process stops them all ------------------------------------------

NAN_ON_RANK_1 = '''
import os, sys
from pathlib import Path
import torch
from unembed.training.loop import Task, TrainConfig, TrainingError, fit

RANK = int(os.environ["RANK"])


class Tiny(Task):
    def __init__(self):
        torch.manual_seed(0)
        self.model, self.calls = torch.nn.Linear(4, 1), 0

    def num_examples(self):
        return 16

    def batch(self, indices, generator):
        return {"x": torch.randn(len(indices), 4, generator=generator)}

    def loss(self, model, batch):
        self.calls += 1
        loss = model(batch["x"]).pow(2).mean()
        return (loss * float("nan") if RANK == 1 and self.calls == 3 else loss), {}

    def save(self, model, out_dir, metrics):
        Path(out_dir, "saved").write_text("")


out = Path(sys.argv[1])
try:
    fit(Tiny(), TrainConfig(max_steps=6, batch_size=8, warmup_steps=1, device="cpu"), out, progress=False)
    code, line = 0, ""
except TrainingError as e:
    code, line = 2, str(e)
(out / f"rank-{RANK}.json").write_text(__import__("json").dumps({"code": code, "line": line}))
sys.exit(code)
'''


@pytest.mark.slow(seconds=13)
def test_a_non_finite_loss_on_one_process_stops_every_process_at_that_step(tmp_path):
    from tests.test_distributed import run_unembed

    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    (tmp_path / "out").mkdir()
    run_unembed([str(tmp_path / "out")], 2, tmp_path, module=(str(script),))
    ranks = [json.loads((tmp_path / "out" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["code"] for r in ranks] == [2, 2]
    assert ranks[1]["line"].startswith("loss became nan at step 2;")
    assert ranks[0]["line"].startswith("loss became non-finite on another process at step 2;")
    assert not (tmp_path / "out" / "saved").exists()


# --- D: weight decay where open_clip puts it ------------------------------------------------------

def test_weight_decay_skips_biases_norms_gains_and_the_logit_scale_as_open_clip_does(scenes_dir, tmp_path):
    from unembed.embedders import Embedder
    from unembed.training.loop import parameter_groups

    model = Embedder.from_config(TINY_ARCH, device="cpu").model  # a real open_clip CLIP
    decayed, exempt = parameter_groups(model, list(model.parameters()), 0.1)
    names = {id(p): n for n, p in model.named_parameters()}

    def open_clip_exclude(n, p):  # open_clip's training/main.py
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    assert (decayed["weight_decay"], exempt["weight_decay"]) == (0.1, 0.0)
    assert sorted(names[id(p)] for p in exempt["params"]) == sorted(
        n for n, p in model.named_parameters() if open_clip_exclude(n, p))
    assert {"logit_scale", "ln_final.weight", "ln_final.bias"} <= {names[id(p)] for p in exempt["params"]}
    assert {"positional_embedding", "text_projection"} <= {names[id(p)] for p in decayed["params"]}
    # and every trainer's optimiser is built from them (the checkpoint records its groups)
    fit(_task(scenes_dir), replace(CONFIG, max_steps=1, weight_decay=0.1), tmp_path, progress=False)
    state = json.loads((tmp_path / "checkpoints" / "step-00000001" / "state.json").read_text())
    groups = state["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in groups] == [len(decayed["params"]), len(exempt["params"])]


# --- E: image training streams --------------------------------------------------------------------

def _mixed_size_split(root: Path, n: int = 8) -> Path:
    from PIL import Image

    images, annotations = [], []
    for i in range(n):
        size, suffix = ((40, 30), "png") if i % 2 else ((64, 80), "jpg")
        name = f"images/{i:03d}.{suffix}"
        (root / "train" / "images").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (30 * i, 255 - 30 * i, 90)).save(root / "train" / name)
        images.append({"id": i, "file_name": name, "width": size[0], "height": size[1]})
        annotations += [{"id": 2 * i + k, "image_id": i, "caption": f"a {'dark light'.split()[k]} square number {i}"}
                        for k in range(2)]
    (root / "train" / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


def test_images_of_mixed_sizes_and_formats_train_clip(tmp_path):
    data = _mixed_size_split(tmp_path / "data")
    code = main(["train", "clip", "--data", str(data), "--out", str(tmp_path / "out"), "--arch", TINY_ARCH_OPTIONS,
                 "--max-steps", "2", "--batch-size", "4", "--warmup-steps", "1", "--device", "cpu"])
    assert code == 0 and (tmp_path / "out" / "config.json").is_file()
    assert [r["step"] for r in _log(tmp_path / "out")] == [1, 2]


def test_clip_batches_are_the_same_resumed_and_with_workers(scenes_dir):
    """A step's pixels (random crops) are a function of (seed, step): the same from a resumed range of
    steps and when DataLoader workers read them."""
    task = _task(scenes_dir)
    whole = list(task.batches(range(0, 4), 16, 3))
    resumed = list(task.batches(range(2, 4), 16, 3, workers=2))
    for (i, a), (j, b) in zip(whole[2:], resumed):
        assert torch.equal(i, j) and torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["tokens"], b["tokens"])
    assert a["pixels"].shape == (16, 3, 32, 32)
    assert not torch.equal(whole[0][1]["pixels"], whole[1][1]["pixels"])


# --- F: the random-pair cosine pairs captions with other images -----------------------------------

def test_random_pair_cosine_pairs_each_caption_with_another_image():
    from unembed.training.clip import retrieval_metrics

    images = torch.eye(6)                      # 6 images, orthogonal: other images have cosine 0
    owner = torch.arange(6).repeat_interleave(5)  # 5 captions each, equal to their image's vector
    metrics = retrieval_metrics(images, images[owner], owner)
    assert metrics["gap_matched_cos"] == 1.0 and metrics["gap_random_cos"] == 0.0


# --- G: text-only training leaves the training images alone ---------------------------------------

def test_text_only_training_never_reads_the_training_images(scenes_dir, embedder_dir, tmp_path, monkeypatch):
    import unembed.training.prefix as prefix

    def embed_split(embedder, split_dir, **kw):  # the validation images are embedded; the training ones never
        assert Path(split_dir).name != "train", "embedded the training images"
        return real(embedder, split_dir, **kw)

    real = prefix.embed_split
    monkeypatch.setattr(prefix, "embed_split", embed_split)
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "captions.json").write_text((scenes_dir / "train" / "captions.json").read_text())
    (data / "train" / "images").mkdir()
    for p in sorted((scenes_dir / "train" / "images").glob("*.png"))[::2]:  # half unreadable, half missing
        (data / "train" / "images" / p.name).write_bytes(b"not an image")
    code = main(["train", "capdec", "--embedder", str(embedder_dir), "--data", str(data), "--out", str(tmp_path / "out"),
                 "--lm", "scratch", "--tokenizer", "corpus:64", "--lm-config", NO_DROPOUT_LM, "--prefix-length", "2",
                 "--max-steps", "1", "--batch-size", "8", "--device", "cpu"])
    assert code == 0 and (tmp_path / "out" / "config.json").is_file()
