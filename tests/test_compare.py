"""unembed compare on the tiny scenes set: every decoder trained, captioned from one embedding pass,
scored, timed and reported; a broken decoder is one failed row, not a failed comparison."""
import json
import shutil

import pytest

from unembed.cli import EXIT_OK, EXIT_PARTIAL, main
from unembed.data.splits import CACHE_DIR, load_split
from unembed.embedders import Embedder
from unembed.compare import parse_decoders
from unembed.errors import BadInputError


def test_compare_trains_captions_scores_and_reports_every_decoder(compare_dir, scenes_dir, embedder_dir, capsys):
    out, code = compare_dir
    assert code == EXIT_OK
    result = json.loads((out / "compare.json").read_text())
    _, references, ids = load_split(scenes_dir / "test")
    assert [d["name"] for d in result["decoders"]] == ["retrieval", "decap"]
    for row in result["decoders"]:
        assert row["error"] is None
        assert set(row["metrics"]) >= {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "CLIPScore", "RefCLIPScore"}
        assert row["train_minutes"] > 0 and row["captions_per_second"] > 0 and row["peak_memory_mb"] > 100
        lines = (out / "captions" / f"{row['name']}.jsonl").read_text().splitlines()
        assert [json.loads(line)["image_id"] for line in lines] == ids
    # decap trained for 2 steps babbles; retrieval returns real captions: the scores must tell them apart
    by_name = {d["name"]: d["metrics"] for d in result["decoders"]}
    assert by_name["retrieval"]["BLEU-1"] > by_name["decap"]["BLEU-1"]
    assert result["n_images"] == len(ids) == len(result["images"])
    first = result["images"][0]
    assert first["references"] == references[0] and set(first["captions"]) == {"retrieval", "decap"}
    assert (out / first["file"]).is_file()
    # one embedding pass, cached beside the split, served both decoders and CLIPScore
    embedder_id = Embedder.load(embedder_dir, device="cpu").id
    assert (scenes_dir / "test" / CACHE_DIR / f"{embedder_id}.safetensors").is_file()
    for name in ("compare.md", "quality_vs_speed.png", "report.html", "gap.json", "gap.png"):
        assert (out / name).is_file(), name
    assert result["gap"]["n_pairs"] == len(ids)


def test_a_broken_decoder_is_one_failed_row_and_a_partial_exit(compare_dir, scenes_dir, embedder_dir, tmp_path, capsys):
    out, _ = compare_dir
    broken = tmp_path / "broken"
    shutil.copytree(out / "models" / "retrieval", broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 10)
    code = main(["compare", "--data", str(scenes_dir), "--decoders", f"retrieval={out / 'models' / 'retrieval'},"
                 f"broken={broken}", "--embedder", str(embedder_dir), "--out", str(tmp_path / "run"),
                 "--no-spice", "--no-gap", "--device", "cpu"])
    assert code == EXIT_PARTIAL
    rows = {d["name"]: d for d in json.loads((tmp_path / "run" / "compare.json").read_text())["decoders"]}
    assert rows["retrieval"]["error"] is None and rows["retrieval"]["train_minutes"] is None
    assert "model.safetensors" in rows["broken"]["error"]
    captured = capsys.readouterr()
    assert "broken failed:" in captured.err
    assert "failed: " in captured.out  # the table's row for it


def test_decoder_list_names_kinds_or_directories(tmp_path, retrieval_dir, scenes_dir):
    entries = parse_decoders(f"clipcap, mine={retrieval_dir}", tmp_path)
    assert [(e.name, e.kind, e.given) for e in entries] == [("clipcap", "clipcap", False), ("mine", "retrieval", True)]
    assert entries[0].path == tmp_path / "clipcap"
    for kind in ("ensemble", "corrector"):
        with pytest.raises(BadInputError) as caught:
            parse_decoders(f"clipcap,{kind}", tmp_path)
        article = "an" if kind == "ensemble" else "a"
        assert str(caught.value).startswith(f"{kind}: {article} {kind} decoder is made from other decoders (unembed ")
    for bad in ("nonsense", "clipcap,clipcap", "mine=ensemble"):
        assert main(["compare", "--data", str(scenes_dir), "--decoders", bad, "--out", str(tmp_path / "x")]) == 2
        assert not (tmp_path / "x").exists()  # refused before any work


def test_compare_reuses_a_trained_decoder_only_when_recipe_and_data_match(scenes_dir, embedder_dir, tmp_path, capsys):
    data = tmp_path / "scenes"
    shutil.copytree(scenes_dir, data, ignore=shutil.ignore_patterns(CACHE_DIR))
    run = ["compare", "--data", str(data), "--decoders", "retrieval", "--embedder", str(embedder_dir), "--out",
           str(tmp_path / "out"), "--no-spice", "--no-meteor", "--no-gap", "--max-images", "4", "--device", "cpu"]
    assert main(run) == EXIT_OK
    assert main(run) == EXIT_OK
    assert "retrieval: reusing" in capsys.readouterr().err
    assert main(run + ["--config", '{"retrieval": {"max_captions": 20}}']) == EXIT_OK
    assert "retrieval: retraining" in capsys.readouterr().err
    from unembed.data.scenes import write_scenes

    write_scenes(data, n=40, n_eval=8, image_size=32, seed=5)  # another world in the same folder
    assert main(run + ["--config", '{"retrieval": {"max_captions": 20}}']) == EXIT_OK
    assert "retrieval: retraining" in capsys.readouterr().err


def test_the_split_cache_goes_stale_when_the_split_is_rewritten(embedder, tmp_path):
    import torch

    from unembed.data.images import load_image
    from unembed.data.scenes import write_scenes
    from unembed.pipeline import embed_split

    write_scenes(tmp_path, n=8, n_eval=4, image_size=32, seed=0)
    first = embed_split(embedder, tmp_path / "test")
    write_scenes(tmp_path, n=8, n_eval=4, image_size=32, seed=1)  # same ids, other images
    paths, _, ids = load_split(tmp_path / "test")
    fresh = embedder.embed([load_image(p) for p in paths], [str(i) for i in ids])
    again = embed_split(embedder, tmp_path / "test")
    torch.testing.assert_close(again.vectors, fresh.vectors)
    assert not torch.allclose(again.vectors, first.vectors)
