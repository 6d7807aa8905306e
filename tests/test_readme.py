"""Every command in README.md runs: the quickstart at a small scale, the pretrained-model commands
by name on a hub-layout cache offline, the library example on the tiny fixtures, and the set-up targets exist."""
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
         "train viecap": ["--max-steps", "3", "--batch-size", "16", "--warmup-steps", "1"],
         "caption scenes/test/images": ["--max-length", "6"],
         "caption scenes/compositional/images": ["--max-length", "6"],
         "compare --data": ["--max-steps", "2", "--max-images", "8", "--no-spice", "--no-meteor", "--no-gap"],
         "eval --results": ["--no-meteor"],  # METEOR's JVM is tested in test_metrics; here it would cost 10 s a call
         "demo --out": ["--n", "2"],
         "train corrector": ["--max-steps", "2", "--batch-size", "8", "--max-captions", "40", "--lm-config",
                             '{"n_layer": 1, "n_head": 2, "n_embd": 32}'],
         "eval --invert": ["--max-captions", "8"]}


def block(name: str) -> str:
    match = re.search(rf"<!-- readme-test: {name} -->\n```(\w+)\n(.*?)```", README, re.S)
    assert match, f"README has no '{name}' block"
    return match.group(2)


def commands(name: str) -> list[list[str]]:
    lines = block(name).replace("\\\n", " ").splitlines()  # a line ending in a backslash goes on
    return [shlex.split(line.split("#")[0]) for line in lines if line.strip()]


def run(argv, cwd, env=None):
    return subprocess.run(UNEMBED + argv[1:], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **(env or {})))


def test_setup_commands_are_make_targets():
    for argv in commands("setup") + commands("make-bundle"):
        assert argv[0] == "make"
        subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, check=True, capture_output=True)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("script, name", [("demo.sh", "demo"), ("quickstart.sh", "quickstart")])
def test_make_demo_and_quickstart_run_exactly_their_blocks(script, name):
    lines = [line for line in (ROOT / "scripts" / script).read_text().splitlines() if line.startswith("unembed ")]
    assert lines == [line for line in block(name).splitlines() if line.strip()]


@pytest.mark.slow(seconds=21)
def test_the_demo_block_runs_with_the_bundle(tmp_path):
    """The demo's commands as written, small: its compare on two of the bundled decoders (the appended
    --decoders wins), as all seven cost a fresh process each; test_bundle covers every bundled decoder."""
    from unembed.bundle import bundle_dir
    from unembed.compare import parse_decoders

    two = f"retrieval={bundle_dir() / 'retrieval'},clipcap={bundle_dir() / 'clipcap'}"

    def demo_small(argv):
        return small(argv) + (["--decoders", two] if argv[1] == "compare" else [])

    assert "--decoders bundle" in block("demo")
    everything = parse_decoders("bundle", tmp_path)  # what the demo's `--decoders bundle` compares
    assert [(e.name, e.given) for e in everything] == [(n, True) for n in ("retrieval", "clipcap", "capdec", "decap",
                                                                            "viecap", "iterative", "coca")]
    run_in_one_process(commands("demo"), tmp_path, demo_small)
    compared = json.loads((tmp_path / "compare-scenes" / "compare.json").read_text())
    assert [(d["name"], d["error"], d["train_minutes"]) for d in compared["decoders"]] == [
        (name, None, None) for name in ("retrieval", "clipcap")]
    assert all(d["diversity"]["novel_share"] is None for d in compared["decoders"])  # their training data is unknown
    assert (tmp_path / "compare-scenes" / "report.html").is_file()


def _run_listing(listing: Path, argvs, cwd, env, *flags) -> subprocess.CompletedProcess:
    """tests/run_commands.py over `argvs` (each starting with "unembed"), written to `listing`."""
    assert all(argv[0] == "unembed" for argv in argvs)
    listing.write_text(json.dumps([argv[1:] for argv in argvs]))
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "run_commands.py"), str(listing), *flags], cwd=cwd,
                            capture_output=True, text=True, timeout=900, env=dict(os.environ, **(env or {})))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_in_one_process(argvs, cwd, extra, env=None):
    """`unembed ARGS` for each command, in order, in ONE process (tests/run_commands.py, which stops at
    the first failure): the same commands, with Python's and torch's start-up paid once, not per line."""
    listing = Path(cwd) / f".commands-{len(list(Path(cwd).glob('.commands-*')))}.json"
    return _run_listing(listing, [argv + extra(argv) for argv in argvs], cwd, env)


def run_each_in_one_process(argvs, cwd, env=None) -> list[tuple[int, str]]:
    """Like run_in_one_process, but every command runs whatever the others did (run_commands.py
    --each): each one's (exit code, stderr)."""
    listing = Path(cwd) / f".each-{len(list(Path(cwd).glob('.each-*.json')))}.json"
    _run_listing(listing, argvs, cwd, env, "--each")
    codes = json.loads(Path(f"{listing}.rank0.codes").read_text())
    assert len(codes) == len(argvs)
    return [(code, Path(f"{listing}.{i}.rank0.stderr").read_text()) for i, code in enumerate(codes)]


def small(argv) -> list[str]:
    flags = next((flags for key, flags in SMALL.items() if " ".join(argv[1:3]) == key), [])
    if "--max-length" in flags and "--decoder" in argv and argv[argv.index("--decoder") + 1].endswith("retrieval"):
        return []  # the retrieval decoder takes no decoding options (and refuses them)
    return flags


@pytest.mark.slow(seconds=43)
def test_quickstart_then_prefix_decoders_run(tmp_path):
    result = run_in_one_process(commands("quickstart"), tmp_path, small)
    assert re.search(r"\| CIDEr", result.stdout) and "CLIPScore" in result.stdout  # the evals' tables
    assert (tmp_path / "test-scores.json").is_file() and (tmp_path / "compositional-scores.json").is_file()
    result = run_in_one_process(commands("prefix") + commands("viecap"), tmp_path, small)
    assert "| capdec-test |" in result.stdout
    assert (tmp_path / "viecap-compositional-captions.jsonl").read_text().count("\n") == 16  # --n-eval 16
    for kind in ("clipcap", "capdec", "decap", "viecap"):
        assert (tmp_path / "models" / kind / "config.json").is_file()


def _quickstart_outputs(tmp_path, scenes_dir, embedder_dir) -> Path:
    """What the quickstart leaves that later blocks use (the scenes data and its embedder), from the
    session's fixtures, so those blocks run as tests of their own, in parallel with the quickstart."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "scenes-clip").symlink_to(embedder_dir)
    shutil.copytree(scenes_dir, tmp_path / "scenes", ignore=shutil.ignore_patterns(".unembed-cache"))
    return tmp_path


@pytest.mark.slow(seconds=35)
def test_scaling_commands_run_at_two_processes(tmp_path, scenes_dir, embedder_dir):
    _quickstart_outputs(tmp_path, scenes_dir, embedder_dir)
    argvs = commands("scaling")
    for argv in argvs:
        assert argv[:7] == ["accelerate", "launch", "--multi_gpu", "--num_processes", "4", "-m", "unembed.cli"]
    # The block's commands under one launch of 2 processes (tests/run_commands.py), not a launch each: the
    # same distributed runs, with the launcher's and each process's start-up paid once.
    listing = tmp_path / ".scaling.json"
    listing.write_text(json.dumps([argv[7:] + SMALL.get(" ".join(argv[7:9]), []) for argv in argvs]))
    launcher = [sys.executable, "-m", "unembed.compat", "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--dynamo_backend", "no", "--main_process_port", str(29000 + os.getpid() % 500)]
    result = subprocess.run([*launcher, str(ROOT / "tests" / "run_commands.py"), str(listing)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    images = len(list((tmp_path / "scenes" / "test" / "images").glob("*.png")))
    assert len((tmp_path / "test-captions-4gpu.jsonl").read_text().splitlines()) == images
    assert (tmp_path / "test-images.safetensors").is_file()
    assert (tmp_path / "models" / "capdec-4gpu" / "config.json").is_file()


@pytest.mark.slow(seconds=62)
def test_compare_commands_run(tmp_path, scenes_dir, embedder_dir):
    _quickstart_outputs(tmp_path, scenes_dir, embedder_dir)
    run_in_one_process(commands("compare"), tmp_path, small)
    compared = json.loads((tmp_path / "compare-run" / "compare.json").read_text())
    assert [(d["name"], d["error"]) for d in compared["decoders"]] == [
        (name, None) for name in ("retrieval", "clipcap", "capdec", "decap", "viecap", "iterative", "coca")]
    assert (tmp_path / "compare-run" / "report.html").is_file() and (tmp_path / "gap" / "gap.png").is_file()


def test_loop_commands_rerank_correct_and_invert(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    result = run_in_one_process(commands("loop"), tmp_path, small)
    captions = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"file"')]
    assert len(captions) == 6 * len(list((ROOT / "examples").glob("*.png")))
    assert {c["decoder"] for c in captions} == {"capdec", "corrector", "viecap", "ensemble"}
    assert json.loads((tmp_path / "text-only" / "config.json").read_text())["config"]["member_kinds"] == [
        "capdec", "viecap"]
    assert (tmp_path / "corrector" / "base" / "config.json").is_file()
    assert result.stdout.count("| exact match | BLEU-4 | cosine | embedder calls / caption |") == 2
    saved = [json.loads((tmp_path / name / "config.json").read_text())["config"] for name in ("inverter", "inverter-more")]
    assert saved[0]["noise_variance"] == 0 and saved[1] == saved[0]  # --init kept the inverter's settings
    recombined = json.loads((tmp_path / "capdec-recombined" / "config.json").read_text())["config"]
    assert "purple" in json.loads(recombined["recombine"])[0]  # the colour words, kept in the config
    assert json.loads((tmp_path / "capdec-recombined" / "substitutes.json").read_text())["red"]  # what --edits uses


@pytest.mark.slow(seconds=11)
def test_bundle_commands_caption_with_the_shipped_models(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    lines = run_in_one_process(commands("bundle"), tmp_path, small).stdout.splitlines()
    images = len(list((ROOT / "examples").glob("*.png")))
    assert [json.loads(line)["file"].startswith("examples/") for line in lines[:images]] == [True] * images
    assert lines[images].startswith("| image | a true caption |")  # then the demo's table


# The pretrained block on the hub-layout cache: the same commands, tiny step counts.
PRETRAINED_SMALL = {"train capdec": ["--max-steps", "2", "--batch-size", "8", "--warmup-steps", "1"],
                    "train clipcap": ["--max-steps", "2", "--batch-size", "8", "--warmup-steps", "1"],
                    "train decap": ["--max-steps", "2", "--batch-size", "8", "--warmup-steps", "1",
                                    "--lm-config", '{"n_layer": 1, "n_embd": 32}'],
                    "build iterative": ["--k", "4", "--max-length", "6"],
                    "train coca": ["--max-steps", "2", "--batch-size", "8", "--warmup-steps", "1"],
                    "caption photos/": ["--max-length", "6"], "caption coco/test/images": ["--max-length", "6"],
                    "eval --results": ["--no-spice", "--no-meteor"],
                    "compare --data": ["--max-steps", "2", "--max-images", "6", "--no-spice", "--no-gap", "--no-meteor"]}


def karpathy_fixture(scenes_dir, root: Path) -> None:
    """dataset_coco.json in Karpathy's format over scenes images in COCO's folders, and photos/."""
    from unembed.data.splits import load_split

    images = []
    for split, source in (("train", "train"), ("restval", "train"), ("val", "val"), ("test", "test")):
        paths, captions, ids = load_split(scenes_dir / source)
        part = slice(0, 12) if split != "restval" else slice(12, 24)
        folder = "train2014" if split == "train" else "val2014"
        (root / "coco-images" / folder).mkdir(parents=True, exist_ok=True)
        for path, caps, image_id in list(zip(paths, captions, ids))[part]:
            cocoid = 100000 * (1 + ["train", "restval", "val", "test"].index(split)) + image_id
            name = f"COCO_{folder}_{cocoid:012d}.png"
            shutil.copyfile(path, root / "coco-images" / folder / name)
            images.append({"filepath": folder, "filename": name, "cocoid": cocoid, "split": split,
                           "sentences": [{"raw": c, "tokens": c.split()} for c in caps]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    (root / "photos").mkdir()
    for path in sorted((scenes_dir / "test" / "images").glob("*.png"))[:3]:
        shutil.copyfile(path, root / "photos" / path.name)


@pytest.mark.slow(seconds=59)
def test_pretrained_commands_run_by_name_offline_from_the_hub_cache(tmp_path, scenes_dir):
    from tests.hub_cache import GPT2, write_hub_cache
    from unembed.data.splits import split_captions

    commits = write_hub_cache(tmp_path / "hf", split_captions(scenes_dir / "train"))
    karpathy_fixture(scenes_dir, tmp_path)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    def pretrained_small(argv):
        key = next((k for k in PRETRAINED_SMALL if " ".join(argv[1:]).startswith(k)), None)
        return PRETRAINED_SMALL.get(key, [])

    run_in_one_process(commands("pretrained"), tmp_path, pretrained_small, env)
    assert len((tmp_path / "photos-captions.jsonl").read_text().splitlines()) == 3
    compared = json.loads((tmp_path / "compare-coco" / "compare.json").read_text())
    assert [(d["name"], d["error"]) for d in compared["decoders"]] == [
        (name, None) for name in ("retrieval", "capdec", "decap", "magic", "coca")]

    # LoRA over the hub GPT-2: the mapper and a peft adapter, the base named by id and revision.
    capdec = tmp_path / "models" / "vitb32-capdec"
    config = json.loads((capdec / "config.json").read_text())["config"]
    assert (config["lm"], config["lm_revision"], config["lm_mode"]) == (GPT2, commits[GPT2], "lora")
    from safetensors import safe_open

    with safe_open(capdec / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if k.startswith("lm.")]
    adapter = json.loads((capdec / "adapter" / "adapter_config.json").read_text())
    assert (adapter["base_model_name_or_path"], adapter["revision"]) == (GPT2, commits[GPT2])
    card = (capdec / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: unembed\n") and '"gpt2"' in card.split("---")[1]
    magic = json.loads((tmp_path / "models" / "vitb32-magic" / "config.json").read_text())["config"]
    assert magic["lm_revision"] == commits[GPT2]
    full = sum(f.stat().st_size for f in (tmp_path / "hf").rglob("*") if f.is_file() and "gpt2" in str(f))
    assert sum(f.stat().st_size for f in (tmp_path / "models" / "vitb32-magic").rglob("*") if f.is_file()) < full / 2

    # Published to the hub (here: the cache) and loaded by name; then the base LM goes missing.
    from tests.hub_cache import add_decoder_repo

    add_decoder_repo(tmp_path / "hf", "someone/vitb32-capdec", capdec)
    # ...and it is the decoder that was trained: training validated its in-memory model on the val
    # split (metrics.json: the first image's caption and CIDEr over the split); the decoder loaded by
    # hub name must write the same captions and score the same (photos/ and the val images in one call).
    from unembed.data.splits import load_split
    from unembed.eval.metrics import coco_caption_metrics

    trained = json.loads((capdec / "metrics.json").read_text())
    paths, references, ids = load_split(tmp_path / "coco" / "val")
    by_name = run(["unembed", "caption", "photos/", *map(str, paths), "--decoder", "hf-hub:someone/vitb32-capdec"],
                  tmp_path, env)
    assert by_name.returncode == 0, by_name.stderr
    rows = [json.loads(r) for r in by_name.stdout.splitlines()]
    assert [r["file"].startswith("photos/") for r in rows] == [True] * 3 + [False] * len(ids)
    captions = [r["caption"] for r in rows[3:]]
    assert captions[0] == trained["val_example"]
    scores = coco_caption_metrics({str(i): c for i, c in zip(ids, captions)},
                                  {str(i): r for i, r in zip(ids, references)}, spice=False, meteor=False)
    assert round(scores["CIDEr"], 4) == trained["val_CIDEr"]
    shutil.rmtree(tmp_path / "hf" / "hub" / "models--gpt2")
    gone = run(["unembed", "caption", "photos/", "--decoder", str(capdec)], tmp_path, env)
    assert gone.returncode == 2
    assert gone.stderr.strip().splitlines() == [
        f"unembed: cannot load LM 'gpt2' at revision {commits[GPT2]}: it is not in the local Hugging Face cache "
        f"({tmp_path / 'hf' / 'hub'}) and the hub is unreachable (HF_HUB_OFFLINE is set)"]


@pytest.mark.slow(seconds=11)
def test_names_not_in_the_cache_fail_fast_with_one_line(tmp_path):
    (tmp_path / "caps.txt").write_text("a dog on a sofa\n")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    cases = ((["unembed", "build", "retrieval", "--captions", "caps.txt", "--embedder", "hf-hub:nobody/no-clip",
               "--out", "m"], "nobody/no-clip"),
             (["unembed", "build", "iterative", "--embedder", "RN50", "--lm", "nobody/no-lm", "--out", "m"],
              "LM 'nobody/no-lm'"),
             (["unembed", "caption", "caps.txt", "--decoder", "hf-hub:nobody/no-decoder"],
              "decoder 'hf-hub:nobody/no-decoder'"))
    results = run_each_in_one_process([argv for argv, _ in cases], tmp_path, env)  # one start-up for the three
    for (code, stderr), (_, named) in zip(results, cases):
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and named in lines[0], lines


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
