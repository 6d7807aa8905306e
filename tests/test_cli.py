"""The command line on real (tiny) models: bad inputs mixed in, exit codes, streamed output."""
import json
import shutil
import subprocess
import sys

import pytest

from unembed.cli import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, main


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture()
def mixed_folder(tmp_path, scenes_dir):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted((scenes_dir / "test" / "images").glob("*.png"))[:5]
    for p in good:
        shutil.copy(p, folder / p.name)
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.jpg").write_text("I am not an image")
    (folder / "cut.png").write_bytes(good[0].read_bytes()[:60])
    return folder, [p.name for p in good]


def test_caption_folder_with_bad_inputs_goes_on_and_says_so(mixed_folder, retrieval_dir, tmp_path, capsys):
    folder, good = mixed_folder
    out = tmp_path / "captions.jsonl"
    code = main(["caption", str(folder), str(tmp_path / "missing.png"), "--decoder", str(retrieval_dir),
                 "--batch-size", "2", "--out", str(out), "--device", "cpu"])
    assert code == EXIT_PARTIAL
    records = _read_jsonl(out)
    assert sorted(r["file"].rsplit("/", 1)[1] for r in records) == sorted(good)
    assert all(r["caption"] and r["decoder"] == "retrieval" and r["seconds"] >= 0 for r in records)
    assert {r["image_id"] for r in records} == {int(name[:-4]) for name in good}
    err = capsys.readouterr().err
    for name in ("zero.png", "text.jpg", "cut.png", "missing.png"):
        assert sum(name in line for line in err.splitlines()) == 1, err
    assert "captioned 5 item(s); 4 failed" in err


def test_caption_all_good_exits_zero_and_coco_format(scenes_dir, retrieval_dir, tmp_path):
    out = tmp_path / "results.json"
    code = main(["caption", str(scenes_dir / "test" / "images" / "*.png"), "--decoder", str(retrieval_dir),
                 "--format", "coco", "--out", str(out), "--device", "cpu"])
    assert code == EXIT_OK
    results = json.loads(out.read_text())
    assert len(results) == 12 and set(results[0]) == {"image_id", "caption"}


def test_caption_nothing_usable_exits_failed(tmp_path, retrieval_dir):
    (tmp_path / "a.png").write_bytes(b"")
    assert main(["caption", str(tmp_path / "a.png"), "--decoder", str(retrieval_dir), "--device", "cpu"]) == EXIT_FAILED


def test_embed_then_caption_embeddings_equals_captioning_images(scenes_dir, retrieval_dir, embedder_dir, tmp_path):
    images = str(scenes_dir / "test" / "images")
    emb = tmp_path / "test.safetensors"
    assert main(["embed", images, "--embedder", str(embedder_dir), "--out", str(emb), "--device", "cpu"]) == EXIT_OK
    direct, via = tmp_path / "direct.jsonl", tmp_path / "via.jsonl"
    assert main(["caption", images, "--decoder", str(retrieval_dir), "--out", str(direct), "--device", "cpu"]) == 0
    assert main(["caption", "--embeddings", str(emb), "--decoder", str(retrieval_dir), "--out", str(via)]) == 0
    assert [(r["image_id"], r["caption"]) for r in _read_jsonl(direct)] == \
        [(r["image_id"], r["caption"]) for r in _read_jsonl(via)]


def test_caption_refuses_embeddings_from_another_embedder(tmp_path, retrieval_dir, embedder):
    import torch

    from unembed.embedders import Embedded

    Embedded(torch.randn(2, embedder.dim), ["a", "b"], "other-embedder-id", "ViT-B-32:openai").save(tmp_path / "e.safetensors")
    assert main(["caption", "--embeddings", str(tmp_path / "e.safetensors"), "--decoder", str(retrieval_dir)]) == EXIT_FAILED


def test_console_script_runs_and_help_is_fast(tmp_path):
    run = subprocess.run([sys.executable, "-m", "unembed.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("caption", "train", "eval", "embed", "data"):
        assert command in run.stdout
    code = "import sys, unembed.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_data_scenes_command(tmp_path):
    assert main(["data", "scenes", "--out", str(tmp_path / "s"), "--n", "20", "--n-eval", "5", "--text-only"]) == 0
    assert not list((tmp_path / "s").rglob("*.png"))
    assert len(json.loads((tmp_path / "s" / "train" / "captions.json").read_text())["annotations"]) == 100


def test_captioning_streams_one_batch_at_a_time(tmp_path, scenes_dir, retrieval_dir, embedder, monkeypatch):
    """Memory is bounded by the batch, not the folder: when the first batch's captions come out,
    only that batch's images have been read (benchmarks/caption_memory.py measures 10,000 images)."""
    import unembed.pipeline as pipeline
    from unembed.decoders import load_decoder

    loaded = []
    real_load = pipeline.load_image
    monkeypatch.setattr(pipeline, "load_image", lambda path: loaded.append(path) or real_load(path))
    decoder = load_decoder(retrieval_dir, embedder=embedder)
    batches = pipeline.caption_images([str(scenes_dir / "test" / "images")], decoder, embedder, batch_size=4)
    first = next(batches)
    assert len(first) == 4 and len(loaded) == 4
    assert sum(len(b) for b in batches) == 8 and len(loaded) == 12
