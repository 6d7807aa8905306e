"""The command line on real (tiny) models: bad inputs mixed in, exit codes, streamed output."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

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
    assert all(r["caption"] and r["decoder"] == "retrieval" and r["batch_seconds"] >= 0 and 1 <= r["batch_size"] <= 2
               for r in records)
    assert {r["image_id"] for r in records} == {name[:-4] for name in good}  # stems spelled exactly
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
    import unembed.data.images as images
    import unembed.pipeline as pipeline
    from unembed.decoders import load_decoder

    loaded = []
    real_load = images.load_image
    monkeypatch.setattr(images, "load_image", lambda path: loaded.append(path) or real_load(path))
    decoder = load_decoder(retrieval_dir, embedder=embedder)
    batches = pipeline.caption_images([str(scenes_dir / "test" / "images")], decoder, embedder, batch_size=4)
    first = next(batches)
    assert len(first) == 4 and len(loaded) == 4
    assert sum(len(b) for b in batches) == 8 and len(loaded) == 12


def test_a_file_name_that_is_not_utf8_is_written_escaped_and_loses_nothing(scenes_dir, retrieval_dir, embedder_dir,
                                                                            tmp_path):
    import os
    import shutil

    folder = tmp_path / "photos"
    folder.mkdir()
    sources = sorted((scenes_dir / "test" / "images").glob("*.png"))[:3]
    for p in sources[:2]:
        shutil.copy(p, folder / p.name)
    odd = os.path.join(os.fsencode(folder), b"caf\xff.png")  # a valid PNG whose name has byte 0xFF
    shutil.copyfile(sources[2], odd)
    out, coco = tmp_path / "c.jsonl", tmp_path / "c.json"
    assert main(["caption", str(folder), "--decoder", str(retrieval_dir), "--out", str(out), "--batch-size", "2",
                 "--device", "cpu"]) == EXIT_OK
    records = _read_jsonl(out)
    assert len(records) == 3 and records[2]["file"].endswith("caf\\xff.png") and records[2]["image_id"] == "caf\\xff"
    assert main(["caption", str(folder), "--decoder", str(retrieval_dir), "--out", str(coco), "--format", "coco",
                 "--device", "cpu"]) == EXIT_OK
    assert [r["image_id"] for r in json.loads(coco.read_text())] == [r["image_id"] for r in records]
    assert main(["embed", str(folder), "--embedder", str(embedder_dir), "--out", str(tmp_path / "v.safetensors"),
                 "--device", "cpu"]) == EXIT_OK


def test_damaged_decoder_directories_fail_with_one_line_and_exit_2(retrieval_dir, tmp_path, capsys):
    import shutil

    cases = {}
    for name in ("truncated", "string-config", "negative-size"):
        cases[name] = tmp_path / name
        shutil.copytree(retrieval_dir, cases[name])
    weights = cases["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    config = json.loads((retrieval_dir / "config.json").read_text())
    (cases["string-config"] / "config.json").write_text(json.dumps(dict(config, config="memory_size=3")))
    (cases["negative-size"] / "config.json").write_text(
        json.dumps(dict(config, config=dict(config["config"], memory_size=-4))))
    image = Path(__file__).resolve().parents[1] / "examples" / "scene-0.png"  # a good image: the decoder fails
    for name, path in cases.items():
        assert main(["caption", str(image), "--decoder", str(path), "--device", "cpu"]) == EXIT_FAILED, name
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in lines[0], (name, lines)


def test_an_internal_error_has_its_own_exit_code_and_keeps_its_traceback(retrieval_dir, scenes_dir, monkeypatch,
                                                                         capsys):
    from unembed.cli import EXIT_INTERNAL
    from unembed.decoders.retrieval import RetrievalDecoder

    def broken(self, embedded, **generation):
        raise ZeroDivisionError("a bug in decode")

    monkeypatch.setattr(RetrievalDecoder, "decode", broken)
    image = str(sorted((scenes_dir / "test" / "images").glob("*.png"))[0])
    assert main(["caption", image, "--decoder", str(retrieval_dir), "--device", "cpu"]) == EXIT_INTERNAL
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "internal error: ZeroDivisionError: a bug in decode" in line
    saved = line.split("the traceback is in ")[1].split(",")[0]
    assert "in broken" in Path(saved).read_text()
    assert main(["--debug", "caption", image, "--decoder", str(retrieval_dir), "--device", "cpu"]) == EXIT_INTERNAL
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_workers_give_the_same_records_in_input_order_and_report_bad_files(scenes_dir, retrieval_dir, tmp_path):
    import shutil

    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in sorted((scenes_dir / "test" / "images").glob("*.png"))[:5]:
        shutil.copy(p, folder / p.name)
    (folder / "000003_broken.png").write_bytes(b"not an image")
    outputs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}.jsonl"
        assert main(["caption", str(folder), "--decoder", str(retrieval_dir), "--out", str(out), "--batch-size", "2",
                     "--workers", str(workers), "--device", "cpu"]) == EXIT_PARTIAL
        outputs[workers] = [(r["file"], r["caption"]) for r in _read_jsonl(out)]
    assert outputs[0] == outputs[2] and len(outputs[2]) == 5
    assert [f for f, _ in outputs[2]] == sorted(f for f, _ in outputs[2])  # input order


def test_dtype_runs_the_decoders_in_reduced_precision(tmp_path):
    import torch

    from unembed.pipeline import inference_precision

    a = torch.randn(4, 4)
    with inference_precision("bf16", "cpu"):
        assert (a @ a).dtype == torch.bfloat16
    with inference_precision("fp32", "cpu"):
        assert (a @ a).dtype == torch.float32
    examples = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "examples").glob("*.png"))
    for dtype in ("bf16", "fp16"):
        out = tmp_path / f"{dtype}.jsonl"
        assert main(["caption", *examples, "--dtype", dtype, "--out", str(out), "--device", "cpu"]) == EXIT_OK
        records = _read_jsonl(out)
        assert len(records) == len(examples) and all(r["caption"] for r in records)


def test_the_embedding_pass_leaves_the_global_random_stream_alone(scenes_dir, embedder):
    import torch

    from unembed.data.images import iter_pixel_batches

    files = sorted((scenes_dir / "test" / "images").glob("*.png"))[:3]
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(iter_pixel_batches(files, 2, embedder.preprocess, lambda e: None))
    assert torch.equal(torch.rand(3), expected)
