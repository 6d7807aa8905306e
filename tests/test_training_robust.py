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
from unembed.errors import BadInputError
from unembed.io import load_tensors, save_module
from unembed.training.loop import Task, TrainingError, fit

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


# --- B2: keep the best validation ----------------------------------------------------------------

class ScoredTask(Task):
    """A linear model whose validations score as scripted (step -> score), recording the weights each
    validation saw; `stop_at`: the run is killed after that many steps; `start`: the step it resumes from."""

    def __init__(self, scores: dict, stop_at: int | None = None, start: int = 0):
        torch.manual_seed(0)
        self.model, self.scores, self.stop_at, self.seen = torch.nn.Linear(4, 1), scores, stop_at, {}
        self.steps = start

    def num_examples(self):
        return 16

    def batch(self, indices, generator):
        if self.steps == self.stop_at:
            raise KeyboardInterrupt
        self.steps += 1
        return {"x": torch.randn(len(indices), 4, generator=generator)}

    def loss(self, model, batch):
        return (model(batch["x"]) - 1).pow(2).mean(), {}

    def validate(self, model):
        # weights validated before (the best, restored at the end) score as they did then
        weight = model.weight.detach().clone()
        step = next((s for s, w in self.seen.items() if torch.equal(w, weight)), self.steps)
        self.seen.setdefault(step, weight)
        return {"score": self.scores[step]}

    def selection_score(self, metrics):
        return metrics.get("score")

    def save(self, model, out_dir, metrics):
        save_module(Path(out_dir) / "model.safetensors", model)
        Path(out_dir, "metrics.json").write_text(json.dumps(metrics))


def _saved_weight(out: Path) -> torch.Tensor:
    return load_tensors(out / "model.safetensors")[0]["weight"]


KEEP_BEST = replace(CONFIG, max_steps=8, validate_every=2, keep_best=True, checkpoint_every=2, keep_checkpoints=1)


def test_keep_best_saves_the_weights_of_the_best_validation_and_says_which_step(tmp_path):
    task = ScoredTask({2: 0.1, 4: 0.9, 6: 0.3, 8: 0.2})
    fit(task, KEEP_BEST, tmp_path, progress=False)
    assert torch.equal(_saved_weight(tmp_path), task.seen[4]) and not torch.equal(task.seen[4], task.seen[8])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["kept_step"] == 4 and metrics["last_step_score"] == 0.2 and metrics["score"] == 0.9
    assert [r["step"] for r in _log(tmp_path) if r.get("kept_as_best")] == [2, 4]
    # the last step's weights when they validate best
    task = ScoredTask({2: 0.1, 4: 0.9, 6: 0.3, 8: 0.95})
    fit(task, KEEP_BEST, tmp_path / "last", progress=False)
    assert torch.equal(_saved_weight(tmp_path / "last"), task.seen[8])
    assert json.loads((tmp_path / "last" / "metrics.json").read_text())["kept_step"] == 8


def test_keep_best_with_validations_that_give_no_score_says_so_once_and_keeps_the_last_step(tmp_path, capsys):
    task = ScoredTask(dict.fromkeys((2, 4, 6, 8)))  # a val split that is not there: every score None
    fit(task, KEEP_BEST, tmp_path, progress=False)
    assert capsys.readouterr().err.strip().splitlines() == [
        "note: --keep-best: the validation at step 2 gave no score to choose by (is there a val split?); the last "
        "step's weights will be kept"]
    assert torch.equal(_saved_weight(tmp_path), task.seen[8]) and not (tmp_path / "checkpoints" / "best").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["kept_step"] == 8


def test_a_resumed_run_keeps_the_best_from_before_it_stopped(tmp_path):
    scores = {2: 0.1, 4: 0.9, 6: 0.3, 8: 0.2}
    first = ScoredTask(scores, stop_at=5)  # killed after step 5: its last checkpoint is step 4's
    with pytest.raises(KeyboardInterrupt):
        fit(first, KEEP_BEST, tmp_path, progress=False)
    assert sorted(first.seen) == [2, 4]
    resumed = ScoredTask(scores, start=4)
    fit(resumed, KEEP_BEST, tmp_path, resume=True, progress=False)
    assert sorted(resumed.seen) == [6, 8]
    assert torch.equal(_saved_weight(tmp_path), first.seen[4])
    assert json.loads((tmp_path / "metrics.json").read_text())["kept_step"] == 4


def test_train_keep_best_keeps_a_decoders_best_val_cider(scenes_dir, embedder_dir, tmp_path):
    """From the command line: capdec validated every 10 of 60 steps keeps the weights of its best val
    CIDEr (the first of equals, the last step's when it ties), and its metrics are that step's."""
    out = tmp_path / "capdec"
    assert main(["train", "capdec", "--embedder", str(embedder_dir), "--data", str(scenes_dir), "--out", str(out),
                 "--lm", "scratch", "--tokenizer", "corpus:64", "--lm-config", NO_DROPOUT_LM, "--prefix-length", "2",
                 "--max-steps", "60", "--batch-size", "16", "--lr", "1e-2", "--warmup-steps", "5", "--device", "cpu",
                 "--validate-every", "10", "--keep-best"]) == 0
    scores = {r["step"]: r["val_CIDEr"] for r in _log(out) if "val_CIDEr" in r}
    metrics = json.loads((out / "metrics.json").read_text())
    scores[60] = metrics.get("last_step_score", metrics["val_CIDEr"])
    assert sorted(scores) == [10, 20, 30, 40, 50, 60] and len(set(scores.values())) > 1  # the choice is a real one
    best = max(scores.values())
    kept = 60 if scores[60] == best else min(s for s, v in scores.items() if v == best)
    assert metrics["kept_step"] == kept and metrics["val_CIDEr"] == best
    saved, last = load_tensors(out / "model.safetensors")[0], load_tensors(out / "checkpoints" / "step-00000060" /
                                                                            "model.safetensors")[0]
    assert all(torch.equal(saved[k], last[k]) for k in saved) == (kept == 60)
    if kept < 60:
        best_weights = load_tensors(out / "checkpoints" / "best" / "model.safetensors")[0]
        assert json.loads((out / "checkpoints" / "best" / "best.json").read_text())["step"] == kept
        assert all(torch.equal(saved[k], best_weights[k]) for k in saved)


def test_val_images_sets_how_many_val_images_val_cider_reads_and_a_bad_count_is_one_line(scenes_dir, embedder_dir,
                                                                                        tmp_path, capsys):
    argv = ["train", "capdec", "--embedder", str(embedder_dir), "--data", str(scenes_dir), "--lm", "scratch",
            "--tokenizer", "corpus:64", "--lm-config", NO_DROPOUT_LM, "--prefix-length", "2", "--max-steps", "4",
            "--batch-size", "8", "--device", "cpu", "--validate-every", "2"]
    for images, read in ((None, 12), ("5", 5), ("500", 12)):  # the fixture's val split has 12 images
        out = tmp_path / f"capdec-{images}"
        assert main(argv + ["--out", str(out)] + (["--val-images", images] if images else [])) == 0
        assert [r["val_images"] for r in _log(out) if "val_images" in r] == [read]
        assert json.loads((out / "metrics.json").read_text())["val_images"] == read
    # the corrector takes it too (over the capdec just trained)
    corrector = tmp_path / "corrector"
    assert main(["train", "corrector", "--base", str(tmp_path / "capdec-5"), "--data", str(scenes_dir), "--out",
                 str(corrector), "--lm-config", NO_DROPOUT_LM, "--max-captions", "16", "--max-steps", "2",
                 "--batch-size", "8", "--device", "cpu", "--val-images", "3"]) == 0
    assert json.loads((corrector / "metrics.json").read_text())["val_images"] == 3
    capsys.readouterr()
    assert main(argv + ["--out", str(tmp_path / "bad"), "--val-images", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["unembed: --val-images: must be at least 1 (got 0)"]
    assert not (tmp_path / "bad").exists()


def test_keep_best_without_validations_or_a_score_is_one_line_and_exit_2(scenes_dir, embedder_dir, tmp_path, capsys):
    argv = ["train", "capdec", "--embedder", str(embedder_dir), "--data", str(scenes_dir), "--lm", "scratch",
            "--tokenizer", "corpus:64", "--lm-config", NO_DROPOUT_LM, "--prefix-length", "2", "--max-steps", "2",
            "--batch-size", "8", "--device", "cpu", "--keep-best"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "unembed: --keep-best: needs --validate-every N: the weights it keeps are those of a validation"]
    assert not (tmp_path / "a" / "config.json").exists()
    with pytest.raises(BadInputError, match="^--keep-best: this model has no validation score to choose by$"):
        fit(Tiny(), KEEP_BEST, tmp_path / "b", progress=False)


# --- B3: a moving average of the weights (--ema) -------------------------------------------------

class AveragedTask(ScoredTask):
    """ScoredTask recording its weights before training and after every optimiser step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.raw = [self.model.weight.detach().clone()]

    def after_step(self, model):
        self.raw.append(model.weight.detach().clone())


def _by_hand(raw: list, decay: float) -> list:
    """The moving average after each step, written out: d = min(decay, (1 + n) / (10 + n)) at update n."""
    average, out = raw[0].clone(), [raw[0].clone()]
    for n, weight in enumerate(raw[1:], 1):
        d = min(decay, (1 + n) / (10 + n))
        average = d * average + (1 - d) * weight
        out.append(average)
    return out


EMA = replace(KEEP_BEST, keep_best=False, ema=0.9, lr=0.1)  # weights that move, so the average lags


def test_ema_saves_and_validates_the_moving_average_and_leaves_training_unchanged(tmp_path):
    scores = {2: 0.1, 4: 0.9, 6: 0.3, 8: 0.2}
    plain = AveragedTask(scores)
    fit(plain, replace(EMA, ema=0.0), tmp_path / "plain", progress=False)
    averaged = AveragedTask(scores)
    fit(averaged, EMA, tmp_path / "ema", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(plain.raw, averaged.raw, strict=True))  # the same training
    expected = _by_hand(averaged.raw, 0.9)
    assert not torch.allclose(expected[8], averaged.raw[8], atol=1e-3)  # the average is not the last step
    assert torch.allclose(_saved_weight(tmp_path / "ema"), expected[8], atol=1e-6)
    for step in (2, 4, 6):  # each validation read the average of its step
        assert torch.allclose(averaged.seen[step], expected[step], atol=1e-6)
    last = load_tensors(tmp_path / "ema" / "checkpoints" / "step-00000008" / "model.safetensors")[0]["weight"]
    assert torch.equal(last, averaged.raw[8])  # checkpoints hold the weights, and the average beside them
    assert json.loads((tmp_path / "ema" / "metrics.json").read_text())["ema_decay"] == 0.9
    assert "ema_decay" not in json.loads((tmp_path / "plain" / "metrics.json").read_text())


def test_ema_with_keep_best_keeps_the_best_average_and_a_resumed_run_averages_as_an_unbroken_one(tmp_path):
    scores, config = {2: 0.1, 4: 0.9, 6: 0.3, 8: 0.2}, replace(EMA, keep_best=True)
    whole = AveragedTask(scores)
    fit(whole, config, tmp_path / "whole", progress=False)
    assert torch.allclose(_saved_weight(tmp_path / "whole"), _by_hand(whole.raw, 0.9)[4], atol=1e-6)
    assert json.loads((tmp_path / "whole" / "metrics.json").read_text())["kept_step"] == 4
    first = AveragedTask(scores, stop_at=5)  # killed after step 5: its last checkpoint is step 4's
    with pytest.raises(KeyboardInterrupt):
        fit(first, config, tmp_path / "broken", progress=False)
    fit(AveragedTask(scores, start=4), config, tmp_path / "broken", resume=True, progress=False)
    assert torch.equal(_saved_weight(tmp_path / "broken"), _saved_weight(tmp_path / "whole"))
    # without the average it was trained with, the run does not resume
    with pytest.raises(TrainingError, match=r"would change the run \(ema 0.9 -> 0.0\)"):
        fit(AveragedTask(scores), replace(config, ema=0.0), tmp_path / "broken", resume=True, progress=False)


def test_train_ema_from_the_command_line_and_a_bad_decay_is_one_line_and_exit_2(scenes_dir, embedder_dir, tmp_path,
                                                                                capsys):
    argv = ["train", "capdec", "--embedder", str(embedder_dir), "--data", str(scenes_dir), "--lm", "scratch",
            "--tokenizer", "corpus:64", "--lm-config", NO_DROPOUT_LM, "--prefix-length", "2", "--max-steps", "4",
            "--batch-size", "8", "--device", "cpu"]
    out = tmp_path / "capdec"
    assert main(argv + ["--out", str(out), "--ema", "0.5", "--lr", "1e-2", "--warmup-steps", "1"]) == 0
    assert json.loads((out / "metrics.json").read_text())["ema_decay"] == 0.5
    checkpoint = out / "checkpoints" / "step-00000004"
    saved, last, average = (load_tensors(path)[0] for path in (out / "model.safetensors", checkpoint / "model.safetensors",
                                                                checkpoint / "ema.safetensors"))
    assert int(average.pop("updates")) == 4 and "mapper.net.0.weight" in average
    assert all(torch.equal(saved[k], average[k]) for k in average if k in saved)  # the decoder saved is the average
    assert not torch.equal(saved["mapper.net.0.weight"], last["mapper.net.0.weight"])
    capsys.readouterr()
    for bad in ("1.5", "1", "-0.1"):  # (0 is no average, the default)
        code = main(argv + ["--out", str(tmp_path / "bad"), "--ema", bad])
        assert (code, capsys.readouterr().err.strip().splitlines()) == (2, [
            f"unembed: --ema: the decay must be between 0 and 1, such as 0.999 (got {float(bad)})"])
        assert not (tmp_path / "bad").exists()


class Tiny(Task):  # trains, validates nothing
    def __init__(self):
        self.model = torch.nn.Linear(4, 1)

    def num_examples(self):
        return 16

    def batch(self, indices, generator):
        return {"x": torch.randn(len(indices), 4, generator=generator)}

    def loss(self, model, batch):
        return model(batch["x"]).pow(2).mean(), {}


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
