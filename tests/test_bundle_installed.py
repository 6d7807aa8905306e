"""The shipped bundle as a user gets it: the package copied to a folder of its own (as pip installs
it), run from another working directory, so nothing of the tree or the machine that built the
bundle can be found. Every bundled decoder captions the example images there, through the CLI, as
the repository's copy does; `unembed serve` with no --decoder answers for every one of them."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.test_serve import serve_process
from unembed.bundle import BUNDLE_DIR, BUNDLE_ENV, manifest

REPO = Path(__file__).resolve().parents[1]
DECODERS = manifest(BUNDLE_DIR)["decoders"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder holding a copy of the package, working folder holding a copy of the examples)."""
    root = tmp_path_factory.mktemp("installed")
    shutil.copytree(REPO / "unembed", root / "site" / "unembed", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "work" / "examples").mkdir(parents=True)
    for image in sorted((REPO / "examples").glob("*.png")):
        shutil.copyfile(image, root / "work" / "examples" / image.name)
    env = {k: v for k, v in os.environ.items() if k not in (BUNDLE_ENV, "PYTHONPATH")}
    env["PYTHONPATH"] = str(root / "site")
    return root / "site", root / "work", env


def _captions(lines: str) -> dict:
    return {Path(r["file"]).name: r["caption"] for r in map(json.loads, lines.splitlines())}


@pytest.fixture(scope="module")
def repo_captions(tmp_path_factory):
    """What the repository's own bundle says for each example, per decoder (in this process)."""
    from unembed.cli import EXIT_OK, main

    out, found = tmp_path_factory.mktemp("repo-captions"), {}
    examples = [str(p) for p in sorted((REPO / "examples").glob("*.png"))]
    for name in DECODERS:
        assert main(["caption", *examples, "--decoder", name, "--out", str(out / name), "--device", "cpu"]) == EXIT_OK
        found[name] = _captions((out / name).read_text())
    return found


def test_every_bundled_decoder_captions_the_examples_from_a_copy_of_the_package(installed, repo_captions):
    site, work, env = installed
    script = ("import sys, unembed; from unembed.cli import main\n"
              f"assert unembed.__file__.startswith({str(site)!r}), unembed.__file__\n"
              f"codes = [main(['caption', 'examples', '--decoder', n, '--out', n + '.jsonl', '--device', 'cpu']) "
              f"for n in {DECODERS!r}]\n"
              "sys.exit(max(codes))\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in DECODERS:
        captions = _captions((work / f"{name}.jsonl").read_text())
        assert len(captions) == 4 and all(captions.values()), name
        assert captions == repo_captions[name], name


def test_serve_with_no_decoder_answers_for_every_bundled_decoder(installed, repo_captions):
    site, work, env = installed
    with serve_process(["--device", "cpu"], work, env) as url:
        listed = httpx.get(f"{url}/decoders", timeout=10).json()
        assert sorted(d["name"] for d in listed) == sorted(DECODERS)
        assert str(site) not in json.dumps(listed) and str(REPO) not in json.dumps(listed)  # no machine paths
        image = work / "examples" / "scene-0.png"
        for name in DECODERS:
            reply = httpx.post(f"{url}/caption", params={"decoder": name}, timeout=60,
                               files={"file": (image.name, image.read_bytes(), "image/png")})
            assert reply.status_code == 200, (name, reply.text)
            assert reply.json()[0]["caption"] == repo_captions[name]["scene-0.png"], name


def test_packing_refuses_a_config_that_names_a_folder_of_this_machine(tmp_path):
    import importlib.util

    from unembed.errors import UnembedError

    spec = importlib.util.spec_from_file_location("pack_bundle", REPO / "scripts" / "pack_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.refuse_machine_paths({"config": {"lm": "local:gpt2", "embedder_spec": "../embedder"}}, tmp_path)
    with pytest.raises(UnembedError, match=r"config.lm names the absolute path '/work/run/iterative-lm'"):
        module.refuse_machine_paths({"config": {"lm": "/work/run/iterative-lm"}}, tmp_path / "config.json")
    # Every shipped config passes the same check.
    for config in sorted(BUNDLE_DIR.glob("*/config.json")):
        module.refuse_machine_paths(json.loads(config.read_text()), config)
