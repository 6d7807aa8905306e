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
