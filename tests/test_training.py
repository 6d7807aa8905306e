"""The one training loop: loss falls, resume reproduces an uninterrupted run, NaN stops cleanly."""
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_ARCH
from unembed.embedders import Embedder
from unembed.training.clip import ClipTask
from unembed.training.loop import TrainConfig, TrainingError, fit, lr_at
from unembed.training.prefix import PrefixTask


class CrashingClipTask(ClipTask):
    """Raises (like a killed process would stop) when it reaches a given step."""

    def __init__(self, *args, crash_at=None, nan_at=None, bad_grad_at=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.crash_at, self.nan_at, self.bad_grad_at = 0, crash_at, nan_at, bad_grad_at

    def loss(self, model, batch):
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt
        loss, logs = super().loss(model, batch)
        if self.calls in self.bad_grad_at:  # adds exactly 0 to the loss, and an infinite gradient
            weight = next(model.parameters())
            loss = loss + torch.sqrt(weight - weight.detach()).sum()
        return (loss * float("nan") if self.calls == self.nan_at else loss), logs


def _task(scenes_dir, **kw):
    torch.manual_seed(0)
    return CrashingClipTask(Embedder.from_config(TINY_ARCH, device="cpu"), scenes_dir / "train", **kw)


CONFIG = TrainConfig(max_steps=6, batch_size=16, lr=2e-3, warmup_steps=2, checkpoint_every=2, device="cpu", seed=3)


def test_loss_falls(scenes_dir, tmp_path):
    task = _task(scenes_dir)
    fit(task, TrainConfig(max_steps=25, batch_size=32, lr=3e-3, warmup_steps=2, device="cpu"), tmp_path, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1


class CrashingPrefixTask(PrefixTask):
    def __init__(self, *args, crash_at=None):
        super().__init__(*args)
        self.calls, self.crash_at = 0, crash_at

    def loss(self, model, batch):
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt
        return super().loss(model, batch)


def _prefix_task(embedder, scenes_dir, crash_at=None):
    """A capdec with a scratch GPT-2 at its default dropout (0.1) and the noise bridge: random draws in
    every step, from the global RNG (dropout) and from the step's generator (noise)."""
    from tests.test_prefix import tiny
    from unembed.data.captions import load_captions

    torch.manual_seed(0)
    decoder = tiny("capdec", embedder)
    assert decoder.lm.config.resid_pdrop == 0.1 and decoder.lm.config.attn_pdrop == 0.1
    captions = load_captions(scenes_dir / "train" / "captions.json")[:64]
    return CrashingPrefixTask(decoder, embedder.embed_texts(captions), torch.arange(len(captions)), captions, True,
                              crash_at=crash_at)


@pytest.mark.parametrize("make_task", ["clip", "prefix with dropout"])
def test_resume_reproduces_an_uninterrupted_run(make_task, scenes_dir, embedder, tmp_path):
    def task(**kw):
        return _task(scenes_dir, **kw) if make_task == "clip" else _prefix_task(embedder, scenes_dir, **kw)

    full = task()
    fit(full, CONFIG, tmp_path / "full", progress=False)

    broken = task(crash_at=6)  # dies during step 5, after the step-4 checkpoint
    with pytest.raises(KeyboardInterrupt):
        fit(broken, CONFIG, tmp_path / "resumed", progress=False)
    assert json.loads((tmp_path / "resumed" / "checkpoints" / "latest.json").read_text())["step"] == 4
    resumed = task()
    torch.manual_seed(123)  # whatever the process's RNG holds, steps 5 and 6 must draw what they drew before
    fit(resumed, CONFIG, tmp_path / "resumed", resume=True, progress=False)
    assert resumed.calls == 2  # only steps 5 and 6 ran again
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    untrained = task().model.state_dict().values()
    assert any(not torch.equal(a, b) for a, b in zip(full.model.state_dict().values(), untrained))  # training moved them


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(scenes_dir, tmp_path):
    task = _task(scenes_dir, nan_at=3)
    with pytest.raises(TrainingError, match="loss became nan at step 2"):
        fit(task, CONFIG, tmp_path, progress=False)
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert not (tmp_path / "config.json").exists()  # no final model from a diverged run


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1.0, warmup_steps=4)
    assert lr_at(0, 100, cfg) == pytest.approx(0.25) and lr_at(3, 100, cfg) == pytest.approx(1.0)
    assert lr_at(52, 100, cfg) == pytest.approx(0.5) and lr_at(100, 100, cfg) == pytest.approx(0.0)


def test_a_step_with_non_finite_gradients_is_skipped_and_counted(scenes_dir, tmp_path):
    task = _task(scenes_dir, bad_grad_at=(3,))
    fit(task, CONFIG, tmp_path, progress=False)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert {"step": 3, "skipped": "non-finite gradients"} in log and len(log) == CONFIG.max_steps
    assert all(torch.isfinite(v).all() for v in task.model.state_dict().values())
    assert json.loads((tmp_path / "metrics.json").read_text())["skipped_steps"] == 1


def test_non_finite_gradients_in_a_row_stop_the_run_at_the_last_good_checkpoint(scenes_dir, tmp_path):
    from dataclasses import replace

    task = _task(scenes_dir, bad_grad_at=range(3, 100))
    with pytest.raises(TrainingError, match="non-finite for 2 steps in a row"):
        fit(task, replace(CONFIG, max_bad_steps=2), tmp_path, progress=False)
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["step"] == 2


def test_resume_refuses_settings_that_change_the_run(scenes_dir, tmp_path):
    from dataclasses import replace

    broken = _task(scenes_dir, crash_at=6)
    with pytest.raises(KeyboardInterrupt):
        fit(broken, CONFIG, tmp_path, progress=False)
    with pytest.raises(TrainingError, match=r"\(lr 0.002 -> 0.001, max_steps 6 -> 8\)"):
        fit(_task(scenes_dir), replace(CONFIG, max_steps=8, lr=1e-3), tmp_path, resume=True, progress=False)
    fit(_task(scenes_dir), replace(CONFIG, checkpoint_every=3), tmp_path, resume=True, progress=False)  # harmless


def test_contrastive_loss_is_open_clips_on_one_process():
    from unembed.compat import import_open_clip
    from unembed.training.clip import contrastive_loss

    ClipLoss = import_open_clip().loss.ClipLoss  # as unembed imports it: alone, this test was the first import

    torch.manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(7, 16), dim=-1) for _ in range(2))
    scale = torch.tensor(14.3)
    torch.testing.assert_close(contrastive_loss(image, text, scale), ClipLoss()(image, text, scale))


# --- --init: train a saved decoder further ----------------------------------------------------------

def _train_capdec(scenes_dir, embedder_dir, out, *extra) -> int:
    from unembed.cli import main

    return main(["train", "capdec", "--data", str(scenes_dir), "--embedder", str(embedder_dir), "--out", str(out),
                 "--device", "cpu", "--batch-size", "32", "--warmup-steps", "1", "--lr", "3e-3", *extra])


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_init_trains_a_saved_decoder_further(scenes_dir, embedder_dir, tmp_path, capsys):
    """--init starts from the saved weights (its first loss is near the first run's last, far below a new
    decoder's first) and keeps the saved settings, tokenizer and bridge; the weights move on."""
    from safetensors.torch import load_file

    from unembed.cli import EXIT_OK

    first, further = tmp_path / "first", tmp_path / "further"
    assert _train_capdec(scenes_dir, embedder_dir, first, "--max-steps", "40", "--lm", "scratch", "--tokenizer",
                         "corpus:200", "--lm-config", '{"n_layer": 1, "n_embd": 32, "n_head": 2}') == EXIT_OK
    capsys.readouterr()
    assert _train_capdec(scenes_dir, embedder_dir, further, "--max-steps", "3", "--init", str(first)) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["init"] == str(first)
    new, trained, again = _losses(first)[0], _losses(first)[-5:], _losses(further)[0]
    assert again < new - 1.0 and abs(again - sum(trained) / 5) < 0.5, (new, trained, again)
    saved = [json.loads((d / "config.json").read_text())["config"] for d in (first, further)]
    assert saved[0] == saved[1]
    assert (first / "tokenizer.json").read_bytes() == (further / "tokenizer.json").read_bytes()
    before, after = (load_file(d / "model.safetensors") for d in (first, further))
    assert before.keys() == after.keys()
    bridge = [k for k in before if k.startswith("bridge.")]
    assert bridge and all(torch.equal(before[k], after[k]) for k in bridge)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("mapper."))


def test_init_refuses_what_would_change_the_saved_decoder(scenes_dir, embedder_dir, tmp_path, capsys):
    from unembed.cli import EXIT_FAILED, EXIT_OK, main

    first = tmp_path / "first"
    assert _train_capdec(scenes_dir, embedder_dir, first, "--max-steps", "1", "--lm", "scratch", "--tokenizer",
                         "corpus:100", "--lm-config", '{"n_layer": 1, "n_embd": 16, "n_head": 2}') == EXIT_OK
    capsys.readouterr()
    out = tmp_path / "further"
    bundled = str(Path(__file__).resolve().parents[1] / "unembed" / "bundle" / "embedder")
    refusals = {  # argv -> what the one line says
        ("capdec", "--noise-variance", "0.1"): f"--noise-variance: is set by the decoder {first} that --init",
        ("decap",): f"{first}: is a capdec decoder; `train decap --init` needs a decap one",
        ("capdec", "--embedder", bundled): "was built for embedder",
    }
    for argv, says in refusals.items():
        embedder = [] if "--embedder" in argv else ["--embedder", str(embedder_dir)]
        code = main(["train", argv[0], *embedder, *argv[1:], "--data", str(scenes_dir), "--out", str(out),
                     "--device", "cpu", "--max-steps", "1", "--init", str(first)])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == EXIT_FAILED and len(lines) == 1 and says in lines[0], (argv, lines)
        assert not out.exists()


def test_a_bundled_decoder_trained_further_captions_image_files(scenes_dir, tmp_path, capsys):
    """`--init capdec` (the bundle's, whose config names its embedder "../embedder", beside it): the new
    directory names the embedder it was trained with, as a new decoder does, so `unembed caption FILES`
    finds it."""
    from unembed.cli import EXIT_OK, main

    further = tmp_path / "further"
    assert main(["train", "capdec", "--init", "capdec", "--embedder", "bundle", "--data", str(scenes_dir), "--out",
                 str(further), "--device", "cpu", "--max-steps", "1", "--batch-size", "8"]) == EXIT_OK
    recorded = json.loads((further / "config.json").read_text())["config"]["embedder_spec"]
    assert recorded == Embedder.from_spec("bundle", device="cpu").spec  # what a new decoder would record
    images = sorted((scenes_dir / "test" / "images").iterdir())[:2]
    capsys.readouterr()
    assert main(["caption", *map(str, images), "--decoder", str(further), "--device", "cpu"]) == EXIT_OK
    assert len([line for line in capsys.readouterr().out.splitlines() if line.strip()]) == 2
