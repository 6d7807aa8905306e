"""Hub names resolve as huggingface_hub resolves them, and open_clip's pretrained tags build the
network their weights were trained as.

- "ViT-B-32:openai" builds open_clip's ViT-B-32-quickgelu (OpenAI trained with QuickGELU; open_clip's
  ViT-B-32 config has GELU and would only warn) and records that spelling; a QuickGELU spelling of GELU
  weights is refused in one line naming the right one.
- With HF_ENDPOINT pointing at a closed local port and HF_HUB_OFFLINE unset, a name in the local
  cache loads from it (huggingface_hub's own fallback: no probe, no process-wide offline flag), and a
  name not in the cache fails in one line naming the repo, in seconds.

The OpenAI fixture is the real layout open_clip downloads "ViT-B-32:openai" from (the repo
timm/vit_base_patch32_clip_224.openai holding open_clip_model.safetensors) with random fp16 weights of
the real shapes: ~300 MB written in a few seconds, and the load is a few seconds more. No smaller
architecture has an "openai" tag (RN50 is ~100M parameters), so the real name keeps the test honest.
Every load runs in a fresh process: huggingface_hub and open_clip read HF_HOME and HF_ENDPOINT at import.
Nothing here contacts an address other than 127.0.0.1."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.hub_cache import CLIP, _open_clip, add_openai_vit_b_32, add_repo
from unembed.errors import ModelLoadError

CLOSED = "http://127.0.0.1:9"  # discard port: nothing listens, a connection is refused at once
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def openai_hub(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf-openai")
    return home, add_openai_vit_b_32(home)


@pytest.fixture(scope="module")
def small_hub(tmp_path_factory):
    """A small open_clip hub model (the laion ViT-B-32 repo name) and a plain repo, in the hub layout."""
    home = tmp_path_factory.mktemp("hf-small")
    with tempfile.TemporaryDirectory() as staging:
        _open_clip(Path(staging), coca=False)
        add_repo(home / "hub", CLIP, Path(staging))
    with tempfile.TemporaryDirectory() as staging:
        (Path(staging) / "config.json").write_text('{"model_type": "gpt2"}')
        commit = add_repo(home / "hub", "someone/cached-model", Path(staging))
    return home, commit


def _python(code: str, home: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE")}
    env.update(HF_HOME=str(home), HF_ENDPOINT=CLOSED, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow(seconds=15)
def test_openai_name_builds_quickgelu_with_the_fixture_weights_from_the_cache_while_the_hub_is_unreachable(openai_hub):
    home, expected = openai_hub
    run = _python("""
import json
import huggingface_hub.constants, os
from unembed.embedders import Embedder
e = Embedder.from_spec("ViT-B-32:openai", device="cpu")
state = e.model.state_dict()
print(json.dumps({"spec": e.spec, "id": e.id,
                  "gelu": [type(b.mlp.gelu).__name__ for b in [*e.model.visual.transformer.resblocks, *e.model.transformer.resblocks]],
                  "offline_flag": [os.environ.get("HF_HUB_OFFLINE"), huggingface_hub.constants.HF_HUB_OFFLINE],
                  **{k: state[k].flatten()[:8].tolist() for k in %r}}))
""" % sorted(expected), home)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["spec"] == got["id"] == "ViT-B-32-quickgelu:openai"
    assert set(got["gelu"]) == {"QuickGELU"} and len(got["gelu"]) == 24
    assert got["offline_flag"] == [None, False]  # the cache was read without switching the process offline
    for key, tensor in expected.items():
        assert got[key] == pytest.approx(tensor.float().flatten()[:8].tolist()), key


def test_a_quickgelu_spelling_of_gelu_weights_is_refused_in_one_line(tmp_path):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=CLOSED)
    run = subprocess.run([sys.executable, "-m", "unembed.cli", "embed", "x.png", "--embedder",
                          "ViT-B-32-quickgelu:laion2b_s34b_b79k", "--out", str(tmp_path / "e.safetensors")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "use ViT-B-32:laion2b_s34b_b79k" in lines[0] and "GELU" in lines[0]


def test_every_registered_tag_is_spelled_with_its_weights_activation():
    """Over open_clip's whole registry: a tag trained with QuickGELU builds a QuickGELU architecture
    ("NAME:openai" -> "NAME-quickgelu"), a GELU tag under "NAME-quickgelu" is refused naming "NAME",
    the rest keep their spelling."""
    from unembed.compat import import_open_clip
    from unembed.hub import open_clip_spelling

    open_clip = import_open_clip()
    from open_clip.factory import get_model_config
    from open_clip.pretrained import get_pretrained_cfg

    models, mapped, refused = set(open_clip.list_models()), 0, 0
    for name, tag in open_clip.list_pretrained():
        if name not in models:
            continue
        quick = get_pretrained_cfg(name, tag).get("quick_gelu", False)
        built = open_clip_spelling(name, tag)
        assert tag in open_clip.list_pretrained_tags_by_model(built)
        if built != name:
            mapped += 1
            assert built == name + "-quickgelu" and quick and get_model_config(built)["quick_gelu"]
        elif get_model_config(name).get("quick_gelu", False) != quick:  # no other spelling exists: as open_clip
            assert not name.endswith("-quickgelu") and name + "-quickgelu" not in models
        assert open_clip_spelling(built, tag) == built  # the recorded spelling builds the same again
        if not quick and name + "-quickgelu" in models:
            refused += 1
            with pytest.raises(ModelLoadError, match=f"use {name}:{tag}$"):
                open_clip_spelling(name + "-quickgelu", tag)
    assert mapped >= 10 and refused >= 10 and open_clip_spelling("RN50", "openai") == "RN50-quickgelu"
    with pytest.raises(ModelLoadError, match="unknown pretrained tag"):
        open_clip_spelling("ViT-B-32", "no_such_tag")


def test_hub_names_read_the_cache_when_the_hub_is_unreachable_and_fail_fast_when_not_cached(small_hub):
    home, commit = small_hub
    run = _python(f"""
import json, time
from unembed import hub
from unembed.embedders import Embedder
from unembed.errors import ModelLoadError
out = {{"cached": str(hub.resolve("someone/cached-model", "LM"))}}
e = Embedder.from_spec("hf-hub:{CLIP}", device="cpu")
out["clip"] = [e.spec, e.id, e.dim]
for name in ("someone/not-cached", "hf-hub:someone/not-cached"):
    start = time.monotonic()
    try:
        hub.resolve(name, "LM") if name.startswith("someone") else Embedder.from_spec(name)
    except ModelLoadError as error:
        out[name] = [str(error), time.monotonic() - start]
print(json.dumps(out))
""", home)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["cached"].endswith(f"snapshots/{commit}")
    assert got["clip"] == [f"hf-hub:{CLIP}", f"hf-hub:{CLIP}", 64]
    for name in ("someone/not-cached", "hf-hub:someone/not-cached"):
        message, seconds = got[name]
        assert "\n" not in message and f"'{name}'" in message, message
        assert "not in the local Hugging Face cache" in message and CLOSED in message, message
        assert seconds < 10, seconds  # huggingface_hub's fallback, not a minute of retries


def test_a_hub_lm_is_fetched_without_the_weights_of_other_frameworks(monkeypatch, tmp_path):
    """gpt2's repo holds ~5 GB of TF, Flax, ONNX, tflite and Rust weights beside what transformers reads:
    resolve asks huggingface_hub for the configs, the tokenizer and the safetensors only (an import, which
    has the LM's weights in its checkpoint, for configs and tokenizer alone)."""
    import fnmatch

    import huggingface_hub

    from unembed.hub import TEXT_FILES, resolve

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: asked.append(kw.get("allow_patterns")) or str(tmp_path))
    gpt2_files = ["64-8bits.tflite", "flax_model.msgpack", "model.safetensors", "pytorch_model.bin", "rust_model.ot",
                  "tf_model.h5", "onnx/decoder_model.onnx", "config.json", "generation_config.json", "merges.txt",
                  "tokenizer.json", "tokenizer_config.json", "vocab.json"]

    def fetched(patterns):
        return sorted(f for f in gpt2_files if any(fnmatch.fnmatch(f, p) for p in patterns))

    resolve("gpt2", "LM")
    resolve("gpt2", "tokenizer")
    resolve("gpt2", "LM", allow_patterns=TEXT_FILES)
    texts = ["config.json", "generation_config.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
             "vocab.json"]
    assert [fetched(p) for p in asked] == [sorted(texts + ["model.safetensors"]), texts, texts]


def test_open_clips_own_hub_repo_of_a_tag_is_the_same_embedder_as_the_tag():
    """The zoo records ClipCap's CLIP as the hub repo open_clip downloads ViT-B-32:openai from; embeddings
    made with either spelling fit its decoders (and CoCa's likewise)."""
    from unembed.embedders import same_embedder

    assert same_embedder("hf-hub:timm/vit_base_patch32_clip_224.openai", "ViT-B-32:openai")
    assert same_embedder("hf-hub:laion/mscoco_finetuned_CoCa-ViT-B-32-laion2B-s13B-b90k",
                         "coca_ViT-B-32:mscoco_finetuned_laion2b_s13b_b90k")
    assert not same_embedder("hf-hub:timm/vit_base_patch32_clip_224.openai", "ViT-B-32:laion2b_s34b_b79k")
    assert not same_embedder("hf-hub:someone/clip", "ViT-B-32:openai")
