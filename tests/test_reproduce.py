"""The reproduction recipes (scripts/reproduce/) run end to end, so they cannot rot: on a
Karpathy-format split file of scenes images, with the hub-layout cache's small models standing in
for the papers' (EMBEDDER, LM and COCA given from outside, as the scripts allow) and tiny step counts.

Each script runs in bash as a user runs it, with `unembed` on PATH being a recorder that writes
down the command line bash expanded; the recorded commands then all run, for real, in ONE process
(tests/run_commands.py): the same commands, with Python's and torch's start-up paid once, not 13 times."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hub_cache import CLIP, COCA, write_hub_cache
from tests.test_readme import karpathy_fixture, run_each_in_one_process

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"clipcap_mlp": "clipcap-mlp", "clipcap_transformer": "clipcap-transformer", "capdec": "capdec",
           "decap": "decap", "magic": "magic", "coca": "coca"}
RECORDER = """#!{python}
import json, os, sys
with open(os.environ["UNEMBED_LISTING"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def recorded_commands(recipe: str, root: Path, env: dict) -> list[list[str]]:
    """The `unembed` command lines of scripts/reproduce/RECIPE.sh, as bash expands them."""
    listing = root / f"{recipe}.commands"
    result = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce" / f"{recipe}.sh")], cwd=root,
                            env=dict(env, UNEMBED_LISTING=str(listing)), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{recipe}\n{result.stderr}"
    return [json.loads(line) for line in listing.read_text().splitlines()]


@pytest.mark.slow(seconds=51)
def test_every_recipe_runs_and_ends_in_a_comparison(tmp_path, scenes_dir):
    from unembed.data.splits import split_captions

    write_hub_cache(tmp_path / "hf", split_captions(scenes_dir / "train"))
    karpathy_fixture(scenes_dir, tmp_path)
    assert sorted(p.stem for p in (ROOT / "scripts" / "reproduce").glob("*.sh") if p.stem != "common") == sorted(RECIPES)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "unembed").write_text(RECORDER.format(python=sys.executable))
    (tmp_path / "bin" / "unembed").chmod(0o755)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", KARPATHY="dataset_coco.json",
               IMAGES="coco-images", RUN="run", EMBEDDER=f"hf-hub:{CLIP}", LM="gpt2", COCA=f"hf-hub:{COCA}",
               TRAIN_FLAGS="--max-steps 1 --batch-size 4 --warmup-steps 1 --device cpu",
               COMPARE_FLAGS="--max-images 4 --no-spice --no-meteor --no-gap --device cpu")
    per_recipe = {name: recorded_commands(name, tmp_path, env) for name in RECIPES}
    # Every recipe imports the data first (common.sh skips it once done): here once for all.
    first = {json.dumps(c[0]) for c in per_recipe.values()}
    assert len(first) == 1 and per_recipe["capdec"][0][:3] == ["data", "import", "--format"]
    listing = [per_recipe["capdec"][0]] + [c for commands in per_recipe.values() for c in commands[1:]]
    results = run_each_in_one_process([["unembed", *argv] for argv in listing], tmp_path, env)
    assert not [(argv[:2], stderr[-2000:]) for argv, (code, stderr) in zip(listing, results) if code != 0]
    for name, commands in per_recipe.items():
        assert commands[-1][0] == "compare", name
        compared = json.loads((tmp_path / "run" / f"compare-{RECIPES[name]}" / "compare.json").read_text())
        assert [(d["name"], d["error"]) for d in compared["decoders"]] == [(RECIPES[name], None)]
        assert compared["n_images"] == 4 and compared["decoders"][0]["metrics"]["CIDEr"] is not None
