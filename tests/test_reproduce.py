"""The reproduction recipes (scripts/reproduce/) run end to end, so they cannot rot: on a
Karpathy-format split file of scenes images, with the hub-layout cache's small models standing in
for the papers' (EMBEDDER, LM and COCA given from outside, as the scripts allow) and tiny step counts."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.hub_cache import CLIP, COCA, write_hub_cache
from tests.test_readme import karpathy_fixture

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"clipcap_mlp": "clipcap-mlp", "clipcap_transformer": "clipcap-transformer", "capdec": "capdec",
           "decap": "decap", "magic": "magic", "coca": "coca"}


@pytest.mark.slow(seconds=117)
def test_every_recipe_runs_and_ends_in_a_comparison(tmp_path, scenes_dir):
    from unembed.data.splits import split_captions

    write_hub_cache(tmp_path / "hf", split_captions(scenes_dir / "train"))
    karpathy_fixture(scenes_dir, tmp_path)
    assert sorted(p.stem for p in (ROOT / "scripts" / "reproduce").glob("*.sh") if p.stem != "common") == sorted(RECIPES)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", KARPATHY="dataset_coco.json",
               IMAGES="coco-images", RUN="run", EMBEDDER=f"hf-hub:{CLIP}", LM="gpt2", COCA=f"hf-hub:{COCA}",
               TRAIN_FLAGS="--max-steps 1 --batch-size 4 --warmup-steps 1 --device cpu",
               COMPARE_FLAGS="--max-images 4 --no-spice --no-meteor --no-gap --device cpu")

    def recipe(name):
        return subprocess.run(["bash", str(ROOT / "scripts" / "reproduce" / f"{name}.sh")], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)

    first, *rest = RECIPES
    results = {first: recipe(first)}  # imports the data once for all
    with ThreadPoolExecutor(max_workers=2) as pool:  # the others in pairs: two cores
        results.update(zip(rest, pool.map(recipe, rest)))
    for name, result in results.items():
        assert result.returncode == 0, f"{name}\n{result.stderr[-3000:]}"
        compared = json.loads((tmp_path / "run" / f"compare-{RECIPES[name]}" / "compare.json").read_text())
        assert [(d["name"], d["error"]) for d in compared["decoders"]] == [(RECIPES[name], None)]
        assert compared["n_images"] == 4 and compared["decoders"][0]["metrics"]["CIDEr"] is not None
