"""Published ClipCap, CapDec and DeCap checkpoints: fixtures in exactly the projects' key layouts
(tiny sizes, random weights, written with torch.save, stale GPT-2 buffers included), imported with
`unembed import`, must caption exactly as the official code generates: a naive loop that re-runs
the whole sequence every step, over the same weights, written here from the official model code.
Planted pickles are refused without running them, and nothing is created."""
import json
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

from tests.hub_cache import GPT2, write_hub_cache
from unembed.decoders import load_decoder
from unembed.embedders import Embedded

DIM, K, CLIP_LENGTH, LAYERS = 32, 4, 3, 2
SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def hub(tmp_path_factory, scenes_dir):
    from unembed.data.splits import split_captions

    home = tmp_path_factory.mktemp("hf")
    write_hub_cache(home, split_captions(scenes_dir / "train"))
    return home


@pytest.fixture(scope="module")
def base_gpt2(hub):
    from unembed.compat import import_transformers

    snapshot = next((hub / "hub" / "models--gpt2" / "snapshots").iterdir())
    return import_transformers().GPT2LMHeadModel.from_pretrained(snapshot).eval(), snapshot


def _run(argv, hub, cwd):
    """`unembed ARGV` in `cwd`, in this process, with the hub cache as HF_HOME (unembed reads the cache's
    place at call time; open_clip, which reads it at import, needs a fresh process: run_in_one_process)."""
    env = {"HF_HOME": str(hub), "HF_HUB_OFFLINE": "1"}
    import contextlib
    import io
    from types import SimpleNamespace

    from unembed.cli import main

    saved, here = {k: os.environ.get(k) for k in env}, os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
    finally:
        os.chdir(here)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def _vectors(n=5, seed=0):
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)) * 3  # not unit: ClipCap feeds them raw


# --- the official layouts -------------------------------------------------------------------------------

def _mlp_project(width: int, generator, dim: int = DIM) -> dict:
    hidden, out = width * K // 2, width * K
    return {"clip_project.model.0.weight": torch.randn(hidden, dim, generator=generator) * 0.2,
            "clip_project.model.0.bias": torch.randn(hidden, generator=generator) * 0.1,
            "clip_project.model.2.weight": torch.randn(out, hidden, generator=generator) * 0.2,
            "clip_project.model.2.bias": torch.randn(out, generator=generator) * 0.1}


def _transformer_project(width: int, generator, dim: int = DIM) -> dict:
    state = {"clip_project.linear.weight": torch.randn(CLIP_LENGTH * width, dim, generator=generator) * 0.2,
             "clip_project.linear.bias": torch.randn(CLIP_LENGTH * width, generator=generator) * 0.1,
             "clip_project.prefix_const": torch.randn(K, width, generator=generator)}
    for i in range(LAYERS):
        p = f"clip_project.transformer.layers.{i}."
        for name, shape in (("norm1.weight", (width,)), ("norm1.bias", (width,)), ("norm2.weight", (width,)),
                            ("norm2.bias", (width,)), ("attn.to_queries.weight", (width, width)),
                            ("attn.to_keys_values.weight", (2 * width, width)), ("attn.project.weight", (width, width)),
                            ("attn.project.bias", (width,)), ("mlp.fc1.weight", (2 * width, width)),
                            ("mlp.fc1.bias", (2 * width,)), ("mlp.fc2.weight", (width, 2 * width)),
                            ("mlp.fc2.bias", (width,))):
            state[p + name] = torch.randn(shape, generator=generator) * 0.2 + (1.0 if "norm" in name and
                                                                                name.endswith("weight") else 0.0)
    return state


def _gpt2_state(model, prefix: str) -> dict:
    state = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    n = model.config.n_positions
    for i in range(model.config.n_layer):  # what older transformers saved (ClipCap #76)
        state[f"{prefix}transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        state[f"{prefix}transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state


# --- the official generation (naive loops over the raw weights) -------------------------------------------

def official_mlp(state, v):
    h = torch.tanh(F.linear(v, state["clip_project.model.0.weight"], state["clip_project.model.0.bias"]))
    return F.linear(h, state["clip_project.model.2.weight"], state["clip_project.model.2.bias"]).view(1, K, -1)


def official_transformer(state, v):
    width = state["clip_project.prefix_const"].shape[1]
    x = F.linear(v, state["clip_project.linear.weight"], state["clip_project.linear.bias"]).view(1, CLIP_LENGTH, -1)
    x = torch.cat([x, state["clip_project.prefix_const"][None]], dim=1)
    heads = 8
    for i in range(LAYERS):
        p = f"clip_project.transformer.layers.{i}."
        y = F.layer_norm(x, (width,), state[p + "norm1.weight"], state[p + "norm1.bias"])
        q = F.linear(y, state[p + "attn.to_queries.weight"]).reshape(1, -1, heads, width // heads)
        kv = F.linear(y, state[p + "attn.to_keys_values.weight"]).reshape(1, -1, 2, heads, width // heads)
        att = (torch.einsum("bnhd,bmhd->bnmh", q, kv[:, :, 0]) * (width // heads) ** -0.5).softmax(dim=2)
        out = torch.einsum("bnmh,bmhd->bnhd", att, kv[:, :, 1]).reshape(1, -1, width)
        x = x + F.linear(out, state[p + "attn.project.weight"], state[p + "attn.project.bias"])
        y = F.layer_norm(x, (width,), state[p + "norm2.weight"], state[p + "norm2.bias"])
        hidden = F.relu(F.linear(y, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"]))
        x = x + F.linear(hidden, state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
    return x[:, CLIP_LENGTH:]


@torch.no_grad()
def official_greedy(gpt, embeds, stops: set, length: int) -> list[int]:
    """The official loop: the whole sequence through the LM at every step, argmax, until a stop."""
    tokens = []
    for _ in range(length):
        token = int(gpt(inputs_embeds=embeds).logits[0, -1].argmax())
        tokens.append(token)
        if token in stops:
            break
        embeds = torch.cat([embeds, gpt.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
    return tokens


def _captions(decoder_dir, vectors):
    decoder = load_decoder(decoder_dir)
    return decoder.decode(Embedded(vectors, [str(i) for i in range(len(vectors))], "", "", "image"))


# --- the tests ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, mapper", [("clipcap", "mlp"), ("capdec", "mlp"), ("clipcap", "transformer")])
def test_clipcap_and_capdec_checkpoints_caption_as_the_official_loop(kind, mapper, hub, base_gpt2, tmp_path,
                                                                    monkeypatch):
    from unembed.tokenizers import HFTokenizer

    gpt, snapshot = base_gpt2
    generator = torch.Generator().manual_seed(1)
    width = gpt.config.n_embd
    if mapper == "mlp":  # MLP + fine-tuned GPT-2: the LM is in the file
        tuned = type(gpt)(gpt.config)
        state = {**_mlp_project(width, generator), **_gpt2_state(tuned, "gpt.")}
        lm, project = tuned.eval(), official_mlp
    else:  # transformer mapper + frozen GPT-2: only the mapper is in the file
        state, lm, project = _transformer_project(width, generator), gpt, official_transformer
    torch.save(state, tmp_path / "weights.pt")
    result = _run(["import", kind, "weights.pt", "--out", "imported", "--embedder", "ViT-B-32:openai"], hub, tmp_path)
    assert result.returncode == 0, result.stderr
    monkeypatch.setenv("HF_HOME", str(hub))
    config = json.loads((tmp_path / "imported" / "config.json").read_text())["config"]
    assert (config["mapper"], config["prefix_length"], config["embed_dim"]) == (mapper, K, DIM)
    assert config["lm_mode"] == ("full" if mapper == "mlp" else "frozen")

    tokenizer = HFTokenizer(str(snapshot))
    stops = {tokenizer.encode_piece(".")[0], tokenizer.eos_id}
    vectors = _vectors()
    expected = []
    for v in vectors:
        v = F.normalize(v, dim=-1) if kind == "capdec" else v  # CapDec normalises; ClipCap feeds CLIP's raw output
        ids = official_greedy(lm, project(state, v[None]), stops, min(67, lm.config.n_positions - K))
        expected.append(tokenizer.decode([t for t in ids if t != tokenizer.eos_id]))
    assert _captions(tmp_path / "imported", vectors) == expected
    assert len(set(expected)) > 1  # the vectors give different captions: a mix-up cannot pass


def test_decap_checkpoint_captions_as_the_official_loop(hub, tmp_path):
    from unembed.compat import import_transformers
    from unembed.tokenizers import ClipBpeTokenizer

    transformers = import_transformers()
    torch.manual_seed(2)
    config = transformers.GPT2Config(vocab_size=49408, n_positions=40, n_embd=32, n_layer=1, n_head=4,
                                     bos_token_id=SOT, eos_token_id=EOT)
    decoder = transformers.GPT2LMHeadModel(config).eval()
    state = {**_gpt2_state(decoder, "decoder."), "clip_project.model.0.weight": torch.randn(32, DIM) * 0.3,
             "clip_project.model.0.bias": torch.randn(32) * 0.1}
    torch.save(state, tmp_path / "decap.pt")
    result = _run(["import", "decap", "decap.pt", "--out", "imported"], hub, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "without DeCap's projection" in result.stderr
    tokenizer, vectors = ClipBpeTokenizer(), _vectors(seed=3)
    expected = []
    for v in F.normalize(vectors, dim=-1):
        prefix = F.linear(v, state["clip_project.model.0.weight"], state["clip_project.model.0.bias"]).view(1, 1, -1)
        ids = official_greedy(decoder, prefix, {EOT}, 30)
        expected.append(tokenizer.decode([t for t in ids if t not in (SOT, EOT)]))
    assert _captions(tmp_path / "imported", vectors) == expected


class Planted:
    def __reduce__(self):
        return (os.system, ("touch planted-ran",))


def test_planted_pickles_and_non_tensor_checkpoints_are_refused_and_create_nothing(hub, tmp_path):
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"clip_project.model.0.weight": Planted()}))
    torch.save({"clip_project.model.0.weight": torch.zeros(2, 2), "epoch": 3}, tmp_path / "mixed.pt")
    torch.save({"something.else": torch.zeros(2)}, tmp_path / "other.pt")
    for name, why in (("evil.pt", "refused: not a plain tensor checkpoint"),
                      ("mixed.pt", "refused: expected a state dict of named tensors"),
                      ("other.pt", "not a ClipCap/CapDec checkpoint")):
        result = _run(["import", "clipcap", name, "--out", "imported"], hub, tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and why in lines[0], lines
        assert not (tmp_path / "imported").exists() and not (tmp_path / "planted-ran").exists()


@pytest.mark.slow(seconds=11)
def test_the_guides_published_weights_commands_run(hub, base_gpt2, scenes_dir, tmp_path):
    """The "Use the published weights" block as written, on fixture files of those names in the official
    layouts; each import also gets the hub cache's small CLIP as --embedder (appended, so it wins), since
    the default ViT-B-32:openai is not in this offline cache."""
    import shutil

    from tests.hub_cache import CLIP
    from tests.test_readme import commands, run_in_one_process

    gpt, _ = base_gpt2
    generator, width = torch.Generator().manual_seed(4), gpt.config.n_embd
    clip_dim = 64  # the hub cache's CLIP
    for name in ("coco_weights.pt", "capdec_noise_0.016.pt"):
        torch.save({**_mlp_project(width, generator, clip_dim), **_gpt2_state(type(gpt)(gpt.config), "gpt.")},
                   tmp_path / name)
    torch.save(_transformer_project(width, generator, clip_dim), tmp_path / "transformer_weights.pt")
    from unembed.compat import import_transformers

    transformers = import_transformers()
    decap = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=49408, n_positions=40, n_embd=32,
                                                                 n_layer=1, n_head=4))
    torch.save({**_gpt2_state(decap, "decoder."), "clip_project.model.0.weight": torch.randn(32, 64),
                "clip_project.model.0.bias": torch.zeros(32)}, tmp_path / "coco_decap.pt")
    shutil.copytree(scenes_dir / "train", tmp_path / "coco" / "train", ignore=shutil.ignore_patterns(".unembed-cache"))
    (tmp_path / "photos").mkdir()
    for path in sorted((scenes_dir / "test" / "images").glob("*.png"))[:2]:
        shutil.copyfile(path, tmp_path / "photos" / path.name)
    def extra(argv):
        return ["--embedder", f"hf-hub:{CLIP}"] if argv[1] == "import" else ["--max-length", "5"]

    # In one fresh process (open_clip reads the hub cache's place at import), stopping at the first failure.
    result = run_in_one_process(commands("published"), tmp_path, extra, {"HF_HOME": str(hub), "HF_HUB_OFFLINE": "1"})
    captions = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [c["file"] for c in captions] == [f"photos/{p.name}" for p in sorted((tmp_path / "photos").iterdir())]
    from unembed.data.splits import split_captions

    config = json.loads((tmp_path / "models" / "decap-coco" / "config.json").read_text())["config"]
    assert config["projection_size"] == len(set(split_captions(tmp_path / "coco" / "train")))
