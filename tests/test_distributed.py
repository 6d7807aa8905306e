"""Real 2-process runs (torch.distributed, gloo on CPU) launched by `accelerate launch`, compared
with the same command in one process: trained weights match to float tolerance for the same global
batch, and sharded captioning / embedding give the same outputs in the same order."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unembed.io import load_tensors

# Dropout draws from each process's own random stream, so only a dropout-free model can match exactly.
NO_DROPOUT_LM = json.dumps({"n_layer": 1, "n_embd": 32, "n_head": 2, "resid_pdrop": 0, "embd_pdrop": 0, "attn_pdrop": 0})


def run_unembed(args, processes: int, tmp_path, module=("-m", "unembed.cli")):
    """`unembed ARGS` in one process, or under `accelerate launch` with `processes` of them."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    if processes == 1:
        command = [sys.executable, *module, *args]
    else:  # accelerate's launcher (torchrun underneath); through unembed.compat for this torch build
        command = [sys.executable, "-m", "unembed.compat", "accelerate", "launch", "--multi_gpu",
                   "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no", "--main_process_port", env["MASTER_PORT"], *module, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


def _trained_weights(out) -> dict:
    """Every weight file a training wrote (not its checkpoints), by file and tensor name."""
    return {f"{p.relative_to(out)}:{name}": value for p in sorted(out.rglob("*.safetensors"))
            if "checkpoints" not in p.parts for name, value in load_tensors(p)[0].items()}


def _without_key_bias(name: str, value: torch.Tensor) -> torch.Tensor:
    """Attention's key bias shifts every score of a query equally, which softmax ignores: its true
    gradient is 0, so float noise is all AdamW normalises there, and it differs with the summation
    order. The query and value biases are kept."""
    if not name.endswith("in_proj_bias"):
        return value
    width = len(value) // 3
    return torch.cat([value[:width], value[2 * width:]])


@pytest.mark.slow(seconds=65)
def test_every_trainer_at_two_processes_gives_the_one_process_weights_with_an_uneven_batch(
        tmp_path, scenes_dir, embedder_dir):
    """CLIP, CoCa (both objectives, and captioning only, whose contrastive head gets no gradient),
    clipcap, capdec (saving a moving average of its weights, --ema), decap and the LM, each on a global batch of 33 rows (17 + 16 on two processes):
    the same losses, step by step, and the same weights."""
    coca_arch = json.dumps({"image_size": 32, "embed_dim": 32, "patch_size": 8, "vision_width": 32, "vision_layers": 1,
                            "text_layers": 1, "decoder_layers": 1, "image_tokens": 4, "context_length": 16})
    clip_arch = json.dumps({"image_size": 32, "embed_dim": 32, "vision_width": 8, "text_width": 32,
                            "text_layers": 1, "context_length": 24, "patch_size": 8})  # ViT: no BatchNorm
    steps = ["--batch-size", "33", "--max-steps", "3", "--lr", "1e-3", "--warmup-steps", "1", "--device", "cpu"]
    prefix = ["--embedder", str(embedder_dir), "--data", str(scenes_dir), "--lm", "scratch", "--tokenizer",
              "corpus:64", "--lm-config", NO_DROPOUT_LM, "--prefix-length", "2"]
    init = tmp_path / "run-1" / "coca" / "embedder"  # both runs fine-tune the one-process run's CoCa
    outs = ("clip", "coca", "coca-init", "clipcap", "capdec", "decap", "lm")
    weights, losses = {}, {}
    for processes in (1, 2):
        run = tmp_path / f"run-{processes}"
        commands = [["train", "clip", "--data", str(scenes_dir), "--arch", clip_arch],
                    ["train", "coca", "--data", str(scenes_dir), "--arch", coca_arch],
                    ["train", "coca", "--data", str(scenes_dir), "--init", str(init)],
                    ["train", "clipcap", *prefix],
                    ["train", "capdec", *prefix, "--ema", "0.5"],  # saves its weight average: the same too
                    ["train", "decap", *prefix, "--projection-size", "40"],
                    ["train", "lm", "--data", str(scenes_dir), "--tokenizer", "corpus:64", "--lm-config", NO_DROPOUT_LM]]
        commands = [[*c, "--out", str(run / out), *steps] for c, out in zip(commands, outs)]
        (tmp_path / f"commands-{processes}.json").write_text(json.dumps(commands))
        result = run_unembed([f"commands-{processes}.json"], processes, tmp_path,
                             module=(str(Path(__file__).parent / "run_commands.py"),))
        assert result.returncode == 0, result.stderr[-3000:]
        weights[processes] = {out: _trained_weights(run / out) for out in outs}
        losses[processes] = {out: [json.loads(line) for line in (run / out / "train_log.jsonl").read_text().splitlines()]
                             for out in outs}
    for out in outs:
        one, two = losses[1][out], losses[2][out]
        assert [r["step"] for r in two] == [1, 2, 3]  # one log, written by the main process only
        assert one[0]["loss"] != one[-1]["loss"]  # the weights moved, so equal weights below mean equal updates
        assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4), out
        one, two = weights[1][out], weights[2][out]
        assert one and one.keys() == two.keys(), out
        for name, value in one.items():
            torch.testing.assert_close(_without_key_bias(name, two[name]), _without_key_bias(name, value),
                                       rtol=1e-4, atol=1e-5, msg=f"{out} {name}")
    init_weights = _trained_weights(init)  # captioning only: the contrastive head stayed as it was
    projection = next(k for k in init_weights if k.endswith("text_projection"))
    assert torch.equal(weights[2]["coca-init"]["embedder/" + projection], init_weights[projection])


def _images_with_a_bad_one(scenes_dir, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for p in sorted((scenes_dir / "test" / "images").glob("*.png"))[:11]:
        shutil.copy(p, folder / p.name)
    (folder / "000005-broken.png").write_bytes(b"not a png")
    return folder


@pytest.mark.slow(seconds=45)
def test_two_process_captioning_and_embedding_equal_one_process(tmp_path, scenes_dir, retrieval_dir, embedder_dir):
    from tests.test_formats import write_shards

    folder = _images_with_a_bad_one(scenes_dir, tmp_path)
    _, keys = write_shards(scenes_dir, tmp_path / "shards", per_shard=3, shards=3, broken=False)
    captions, vectors, from_shards = {}, {}, {}
    for processes in (1, 2):  # the three commands in one launch: a process's start-up is paid once
        out, emb, shards = (tmp_path / f"{name}-{processes}{ext}" for name, ext in
                            (("captions", ".jsonl"), ("vectors", ".safetensors"), ("shards", ".jsonl")))
        listing = tmp_path / f"commands-{processes}.json"
        listing.write_text(json.dumps([
            ["caption", str(folder), "--decoder", str(retrieval_dir), "--out", str(out), "--batch-size", "4", "--device", "cpu"],
            ["embed", str(folder), "--embedder", str(embedder_dir), "--out", str(emb), "--batch-size", "4", "--device", "cpu"],
            # webdataset shards: the samples split across processes
            ["caption", "shards/shard-{0000..0002}.tar", "--decoder", str(retrieval_dir), "--out", str(shards),
             "--batch-size", "2", "--device", "cpu"]]))
        result = run_unembed([listing.name, "--each"], processes, tmp_path,
                             module=(str(Path(__file__).parent / "run_commands.py"),))
        assert result.returncode == 0, result.stderr[-3000:]
        stderr = [" ".join(p.read_text() for p in sorted(tmp_path.glob(f"{listing.name}.{i}.rank*.stderr")))
                  for i in range(3)]
        # the broken file makes captioning and embedding partial, and is named once, by one process
        codes = [json.loads(p.read_text()) for p in tmp_path.glob(f"{listing.name}.rank*.codes")]
        assert len(codes) == processes and [max(c) for c in zip(*codes)] == [1, 1, 0], stderr  # as the launcher's
        assert stderr[0].count("000005-broken.png") == 1 and "000005-broken.png" in stderr[1], stderr
        records = [json.loads(line) for line in out.read_text().splitlines()]
        captions[processes] = [(r["file"], r["caption"]) for r in records]
        assert not list(tmp_path.glob(f"captions-{processes}.jsonl.part*"))
        vectors[processes] = load_tensors(emb)
        from_shards[processes] = [(r["image_id"], r["caption"]) for r in map(json.loads, shards.read_text().splitlines())]
    assert len(captions[1]) == 11 and captions[2] == captions[1]
    assert [name for name, _ in captions[1]] == sorted(name for name, _ in captions[1])
    torch.testing.assert_close(vectors[2][0]["vectors"], vectors[1][0]["vectors"])
    assert vectors[2][1]["ids"] == vectors[1][1]["ids"]
    assert from_shards[2] == from_shards[1] and [i for i, _ in from_shards[1]] == keys  # keys spelled exactly
