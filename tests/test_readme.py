"""Every command in README.md runs: the quickstart at a small scale, the network commands to
their offline failure, the library example on the tiny fixtures, and the set-up targets exist."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The README and the pages it links to: their command blocks are all exercised here.
README = "\n".join((ROOT / page).read_text() for page in ("README.md", "docs/GUIDE.md"))
UNEMBED = [sys.executable, "-m", "unembed.cli"]

# Appended flags win over the README's (argparse keeps the last): same commands, seconds instead of minutes.
SMALL = {"data scenes": ["--n", "160", "--n-eval", "16"], "train clip": ["--max-steps", "3", "--batch-size", "32"],
         "train clipcap": ["--max-steps", "3", "--batch-size", "16", "--warmup-steps", "1"],
         "train capdec": ["--max-steps", "3", "--batch-size", "16", "--warmup-steps", "1"],
         "train decap": ["--max-steps", "3", "--batch-size", "16", "--warmup-steps", "1"],
         "caption scenes/test/images": ["--max-length", "6"],
         "compare --data": ["--max-steps", "2", "--max-images", "8", "--no-spice"],
         "demo --out": ["--n", "2"]}


def block(name: str) -> str:
    match = re.search(rf"<!-- readme-test: {name} -->\n```(\w+)\n(.*?)```", README, re.S)
    assert match, f"README has no '{name}' block"
    return match.group(2)


def commands(name: str) -> list[list[str]]:
    return [shlex.split(line.split("#")[0]) for line in block(name).splitlines() if line.strip()]


def run(argv, cwd, env=None):
    return subprocess.run(UNEMBED + argv[1:], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **(env or {})))


def test_setup_commands_are_make_targets():
    for argv in commands("setup") + commands("make-bundle"):
        assert argv[0] == "make"
        subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, check=True, capture_output=True)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_make_demo_runs_exactly_the_quickstart():
    script = [line for line in (ROOT / "scripts" / "quickstart.sh").read_text().splitlines() if line.startswith("unembed ")]
    assert script == [line for line in block("quickstart").splitlines() if line.strip()]


def run_small(argv, cwd):
    extra = next((flags for key, flags in SMALL.items() if " ".join(argv[1:3]) == key), [])
    result = run(argv + extra, cwd)
    assert result.returncode == 0, f"{' '.join(argv)}\n{result.stderr[-2000:]}"
    return result


@pytest.mark.slow
def test_quickstart_then_prefix_decoders_run(tmp_path):
    for argv in commands("quickstart"):
        result = run_small(argv, tmp_path)
    assert re.search(r"\| CIDEr", result.stdout) and "CLIPScore" in result.stdout  # the last eval's table
    assert (tmp_path / "test-scores.json").is_file() and (tmp_path / "compositional-scores.json").is_file()
    for argv in commands("prefix"):
        result = run_small(argv, tmp_path)
    assert "| capdec-test |" in result.stdout
    for kind in ("clipcap", "capdec", "decap"):
        assert (tmp_path / "models" / kind / "config.json").is_file()
    for argv in commands("scaling"):
        assert argv[:5] == ["accelerate", "launch", "--multi_gpu", "--num_processes", "4"]
        launcher = [sys.executable, "-m", "unembed.compat", "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--dynamo_backend", "no", "--main_process_port", str(29000 + os.getpid() % 500)]
        extra = SMALL.get(" ".join(argv[7:9]), [])
        result = subprocess.run(launcher + argv[5:] + extra, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert result.returncode == 0, f"{' '.join(argv)}\n{result.stderr[-3000:]}"
    assert len((tmp_path / "test-captions-4gpu.jsonl").read_text().splitlines()) == 16
    for argv in commands("compare"):
        result = run_small(argv, tmp_path)
    compared = json.loads((tmp_path / "compare-run" / "compare.json").read_text())
    assert [(d["name"], d["error"]) for d in compared["decoders"]] == [
        (name, None) for name in ("retrieval", "clipcap", "capdec", "decap", "iterative", "coca")]
    assert (tmp_path / "compare-run" / "report.html").is_file() and (tmp_path / "gap" / "gap.png").is_file()


def test_bundle_commands_caption_with_the_shipped_models(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    outputs = [run_small(argv, tmp_path).stdout for argv in commands("bundle")]
    assert len(outputs[0].splitlines()) == len(list((ROOT / "examples").glob("*.png")))
    assert outputs[1].startswith("| image | a true caption |")


def test_network_commands_fail_fast_and_clearly_offline(tmp_path):
    (tmp_path / "my-captions.txt").write_text("a dog on a sofa\na cat on a mat\n")
    (tmp_path / "photos").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "photos" / "red.png")
    for argv in commands("network"):
        result = run(argv, tmp_path, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
        assert result.returncode == 2, result.stderr
        line = result.stderr.strip().splitlines()
        assert len(line) == 1 and ("hub is unreachable" in line[0] or "not a decoder directory" in line[0]), line


def test_library_example_runs(tmp_path, scenes_dir, embedder_dir, retrieval_dir):
    demo = tmp_path / "demo-run"
    (demo / "models").mkdir(parents=True)
    (demo / "models" / "scenes-clip").symlink_to(embedder_dir)
    (demo / "models" / "retrieval").symlink_to(retrieval_dir)
    (demo / "scenes").symlink_to(scenes_dir)
    code = re.search(r"## Library\n\n```python\n(.*?)```", README, re.S).group(1)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("['") and len(eval(result.stdout)) == 1
