"""The README's GPU figures are the recorded GPU runs (benchmarks/results/gpu.json and
train_precision_gpu.json): each table cell is recomputed here from the JSON."""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _results(name: str) -> dict:
    return json.loads((ROOT / "benchmarks" / "results" / name).read_text())


def _gpu_section() -> str:
    return (ROOT / "README.md").read_text().split("On a GPU (one H200")[1].split("\n## ")[0]


def test_the_readme_gpu_table_rows_are_the_recorded_runs():
    gpu = _results("gpu.json")
    rows = []
    for key, dtype in (("prefix_fp32", "fp32"), ("prefix", "bf16")):
        for decoding in ("greedy", "beam 5"):
            runs = [r for r in gpu[key]["runs"] if r["decoding"] == decoding]
            assert [r["batch"] for r in runs] == [1, 64, 256]
            theirs = " / ".join(str(r["transformers_generate_captions_per_s"]) for r in runs)
            ours = " / ".join(str(r["unembed_captions_per_s"]) for r in runs)
            ratios = " / ".join(f"{r['ratio_unembed_over_generate']}x" for r in runs)
            rows.append(f"{theirs} captions/s | {ours} captions/s | {ratios} |")
    iterative = gpu["iterative"]
    rows.append(f"one image at a time: {iterative['magic_captions_per_s']} captions/s | "
                + " / ".join(str(r["captions_per_s"]) for r in iterative["runs"]) + " captions/s | "
                + " / ".join(f"{r['speedup_vs_magic']}x" for r in iterative["runs"]) + " |")
    chunked, whole = gpu["decap_projection"]["runs"]
    rows.append(f"the whole matrix: {whole['seconds']} s, {whole['extra_rss_mb_during_projection']:,} MB of GPU memory | "
                f"chunks of 16 queries: {chunked['seconds']} s, {chunked['extra_rss_mb_during_projection']} MB | "
                f"{gpu['decap_projection']['time_ratio_whole_over_chunked']}x the speed, "
                f"{gpu['decap_projection']['extra_memory_ratio_whole_over_chunked']}x less memory |")
    section = _gpu_section()
    for row in rows:
        assert row in section, row
    assert gpu["stages"]["iterative"]["exit"] == 0 and gpu["stages"]["decap_projection"]["exit"] == 0


def test_the_readme_training_precision_table_is_the_recorded_run():
    runs = _results("train_precision_gpu.json")["precisions"]
    assert set(runs) == {"no", "bf16", "fp16"}
    table = [line for line in _gpu_section().splitlines() if line.startswith("| fp32 (`no`)")
             or line.startswith("| bf16 |") or line.startswith("| fp16 |")]
    assert len(table) == 3
    for line, (name, run) in zip(table, runs.items()):
        cells = [c.strip() for c in line.strip("|").split("|")]
        same = f"{100 * run['same_captions_as_fp32']:.1f}%" if name != "no" else ""
        assert cells[1:] == [str(run["steps_per_second"]), str(run["final_loss"]), str(run["fp16_overflow_steps"]),
                             str(run["test_CIDEr"]), same], line
        assert run["train_steps"] == 600 and run["images"] == 1000


def test_the_recorded_captions_are_the_ones_the_training_run_scored():
    """Each precision's captions file lies beside its result, one caption per test image, with no
    machine's path in it (so `train_precision.py score` can be rerun from the repository)."""
    for run in _results("train_precision_gpu.json")["precisions"].values():
        rows = [json.loads(line) for line in (ROOT / "benchmarks" / "results" / run["captions"]).read_text().splitlines()]
        assert len(rows) == run["images"] == len({r["image_id"] for r in rows})
        assert all(set(r) == {"image_id", "caption"} for r in rows)


def test_scoring_the_recorded_captions_again_gives_the_recorded_cider(tmp_path):
    """`train_precision.py score` (the README's command) on the committed captions and the scenes
    world they were written for recomputes each precision's test CIDEr and its share of captions
    equal to fp32's. (A scene is drawn from (seed, split, index): 20 training scenes give the same
    1,000 test scenes, images and captions, as the 20,000 the run trained on.)"""
    import shutil
    import subprocess
    import sys

    results = ROOT / "benchmarks" / "results"
    recorded = _results("train_precision_gpu.json")
    for name in ["train_precision_gpu.json", *(run["captions"] for run in recorded["precisions"].values())]:
        shutil.copy(results / name, tmp_path / name)
    for run in json.loads((tmp_path / "train_precision_gpu.json").read_text())["precisions"].values():
        run.pop("test_CIDEr"), run.pop("same_captions_as_fp32", None)
    data = tmp_path / "scenes"
    subprocess.run([sys.executable, "-m", "unembed.cli", "data", "scenes", "--out", str(data), "--n", "20",
                    "--n-eval", "1000", "--seed", "0"], check=True, capture_output=True)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_precision.py"), "score", "--data", str(data),
                           "--result", str(tmp_path / "train_precision_gpu.json")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    again = json.loads((tmp_path / "train_precision_gpu.json").read_text())["precisions"]
    for name, run in recorded["precisions"].items():
        assert again[name]["test_CIDEr"] == run["test_CIDEr"], name
        assert again[name].get("same_captions_as_fp32") == run.get("same_captions_as_fp32"), name
