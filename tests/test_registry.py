"""Tests that follow the registry (as timm and open_clip test every name in list_models()): every
registered decoder kind gets a create -> decode -> save -> load -> decode round trip from its own
`example`, so a new decoder is tested by registering it. Also the prefix core's per-item text
prompts, and the import rules docs/ARCHITECTURE.md states."""
import ast
from pathlib import Path

import pytest
import torch

from unembed.data.splits import split_captions
from unembed.decoders import decoder_class, list_decoders, load_decoder

ROOT = Path(__file__).resolve().parents[1]


def _images(scenes_dir, n=4):
    from PIL import Image

    paths = sorted((scenes_dir / "test" / "images").glob("*.png"))[:n]
    return [Image.open(p).convert("RGB") for p in paths], [p.stem for p in paths]


@pytest.mark.parametrize("kind", list_decoders())
def test_every_registered_decoder_round_trips_through_its_saved_directory(kind, embedder, scenes_dir, tmp_path):
    cls = decoder_class(kind)
    torch.manual_seed(0)
    decoder = cls.example(embedder, split_captions(scenes_dir / "train"), tmp_path)
    assert decoder.kind == kind and isinstance(decoder, cls)
    own = decoder.embedder if cls.needs_embedder else embedder  # CoCa decodes with its own model
    embedded = own.embed(*_images(scenes_dir), with_tokens=cls.needs_tokens)
    first = decoder.decode(embedded)
    assert len(first) == 4 and all(isinstance(c, str) for c in first)
    decoder.save(tmp_path / "saved")
    loaded = load_decoder(tmp_path / "saved")
    assert type(loaded) is cls and loaded.config == decoder.config
    assert loaded.decode(embedded) == first


def test_every_registered_decoder_declares_itself():
    for kind in list_decoders():
        cls = decoder_class(kind)
        assert cls.summary, kind
        fields = {f for f in cls.config_class.__dataclass_fields__}
        assert set(cls.cli_options) <= fields, kind


class _Prompted:
    """A prefix decoder whose inference prompt is given per row (the hook entity-aware decoders fill)."""

    def __init__(self, decoder, prompts):
        self.decoder, self.prompts = decoder, prompts

    def __enter__(self):
        self.decoder.text_prompts = lambda embedded, vectors, options=None: self.prompts
        return self.decoder

    def __exit__(self, *exc):
        del self.decoder.text_prompts


def test_text_prompts_of_different_lengths_change_neither_loss_nor_captions_of_other_rows(embedder, scenes_dir,
                                                                                         tmp_path):
    torch.manual_seed(0)
    decoder = decoder_class("capdec").example(embedder, split_captions(scenes_dir / "train"), tmp_path).eval()
    tok = decoder.tokenizer
    prompts = [tok.encode("there is a red circle"), [], tok.encode("blue")]
    vectors = torch.nn.functional.normalize(torch.randn(3, embedder.dim), dim=-1)
    tokens, lengths = decoder.encode_captions(["a red circle on the left"] * 3)
    with torch.no_grad():
        together = decoder.caption_loss(vectors, tokens, lengths, prompts)
        alone = [decoder.caption_loss(vectors[i:i + 1], tokens[i:i + 1], lengths[i:i + 1], [prompts[i]])
                 for i in range(3)]
        torch.testing.assert_close(together, torch.stack(alone).mean(), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(alone[0], alone[1])  # the prompt is read
        plain = decoder.caption_loss(vectors[1:2], tokens[1:2], lengths[1:2])
        torch.testing.assert_close(alone[1], plain)  # an empty prompt is no prompt
    embedded = embedder.embed(*_images(scenes_dir, 3))
    with _Prompted(decoder, prompts) as prompted:
        batch = prompted.decode(embedded, num_beams=1)
    for i in range(3):
        with _Prompted(decoder, [prompts[i]]) as prompted:
            assert prompted.decode(embedded.select([i]), num_beams=1) == [batch[i]]


# --- import rules (docs/ARCHITECTURE.md) -------------------------------------------------------------

# The rooms from the bottom up: a module may import its own room and the rooms below it, nothing
# above. Keep in step with the table in docs/ARCHITECTURE.md (test_the_table_lists_every_module).
LEVELS = [
    ("base", {"unembed", "unembed.errors", "unembed.io", "unembed.compat", "unembed.hub", "unembed.distributed",
              "unembed.generation", "unembed.preload"}),
    ("bundle", {"unembed.bundle"}),
    ("data", {"unembed.data"}),
    ("embedders", {"unembed.embedders", "unembed.text_tower"}),
    ("text models", {"unembed.tokenizers", "unembed.lm", "unembed.memory", "unembed.entities"}),
    ("decoders", {"unembed.decoders", "unembed.zoo"}),
    ("pipeline", {"unembed.pipeline"}),
    ("eval", {"unembed.eval"}),
    ("training", {"unembed.training"}),  # above eval: validation scores with eval's metrics
    ("flows", {"unembed.compare", "unembed.serve", "unembed.serve_schema", "unembed.batching"}),
    ("cli", {"unembed.cli"}),
]
# The text models stand beside the embedders, not on them: they need only the base.
BESIDE = {"text models": {"embedders", "data", "bundle"}}


def _room(module: str) -> str:
    """unembed.decoders.prefix -> unembed.decoders; unembed.lm -> unembed.lm; unembed -> unembed."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def _level(room: str) -> int:
    found = [i for i, (_, rooms) in enumerate(LEVELS) if room in rooms]
    assert found, f"{room} is in no room of the architecture table"
    return found[0]


def _imports(path: Path) -> set[str]:
    return _imports_of(path.read_text())


def _imports_of(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _upward_imports(module: str, source: str) -> list[str]:
    """The imports of `module` (its source text) that reach a room above its own."""
    room = _room(module)
    level = _level(room)
    allowed = {r for name, rooms in LEVELS[:level + 1] if name not in BESIDE.get(LEVELS[level][0], ()) for r in rooms}
    return [f"{module} ({LEVELS[level][0]}) imports {name} ({LEVELS[_level(_room(name))][0]})"
            for name in sorted(_imports_of(source)) if name.startswith("unembed") and _room(name) not in allowed | {room}]


def test_rooms_import_only_the_rooms_below_them():
    broken = [line for path in sorted((ROOT / "unembed").rglob("*.py"))
              for line in _upward_imports(_module_name(path), path.read_text())]
    assert broken == []


def test_the_import_rule_catches_what_it_forbids():
    """The check is not vacuous: the violations it was written against are caught, and sound imports pass."""
    lazy = "def f():\n    from unembed.pipeline import iter_pixel_batches\n"
    assert _upward_imports("unembed.data.splits", lazy)  # a lazy import counts: the cycle data -> pipeline
    assert _upward_imports("unembed.data.vectors", "from unembed.embedders import Embedded\n")
    assert _upward_imports("unembed.eval.scoring", "import unembed.training.loop\n")
    assert _upward_imports("unembed.memory", "from unembed.embedders import Embedder\n")  # beside, not on
    assert _upward_imports("unembed.decoders.prefix", "from unembed.cli.common import fail\n")
    assert not _upward_imports("unembed.training.prefix", "from unembed.eval.metrics import coco_caption_metrics\n")
    assert not _upward_imports("unembed.decoders.prefix", "from unembed.lm import load_lm\nfrom unembed.io import x\n")


def test_the_table_lists_every_module():
    """docs/ARCHITECTURE.md's table names every top-level module and package of unembed."""
    table = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    modules = sorted(p.stem if p.is_file() else p.name for p in (ROOT / "unembed").iterdir()
                     if (p.suffix == ".py" and p.stem not in ("__init__", "__main__")) or (p / "__init__.py").is_file())
    missing = [m for m in modules if f"`{m}.py`" not in table and f"`unembed/{m}.py`" not in table
               and f"`unembed/{m}/`" not in table]
    assert missing == []
    for m in modules:  # and every one of them has a place in the import rule
        _level(f"unembed.{m}")


def test_nothing_unpickles():
    """Published checkpoints (PyTorch pickles) are read only with torch.load(weights_only=True); nothing
    else loads a pickle: no pickle.load(s), numpy never with allow_pickle, no other torch.load."""
    broken = []
    for path in sorted((ROOT / "unembed").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            words = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if name in ("pickle.load", "pickle.loads", "joblib.load", "dill.load", "torch.serialization.load"):
                broken.append(f"{path.name}: {name}")
            elif name == "torch.load" and words.get("weights_only") != "True":
                broken.append(f"{path.name}: torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load") and words.get("allow_pickle") != "False":
                broken.append(f"{path.name}: np.load without allow_pickle=False")
    assert broken == []


def test_weights_and_json_are_written_only_through_io():
    """Safetensors, torch.save and JSON files are written in one place (unembed/io.py: a temporary file
    renamed into place); everything else calls it (or a library's own save into a staged directory)."""
    writers = {"save_file", "safetensors.torch.save_file", "torch.save", "json.dump"}
    broken = [f"{path.relative_to(ROOT)}: {ast.unparse(node.func)}"
              for path in sorted((ROOT / "unembed").rglob("*.py")) if path.name != "io.py"
              for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.Call) and ast.unparse(node.func) in writers]
    assert broken == []


def test_only_the_cli_parses_arguments():
    users = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "unembed").rglob("*.py"))
             if "argparse" in _imports(p) and "cli" not in p.parts]
    assert users == []


def test_generated_train_options_parse_to_their_fields_types():
    from unembed.cli import build_parser
    from unembed.decoders import prefix_kinds

    for kind in prefix_kinds():  # the corrector is trained over a base: its own options are checked in test_loop
        args = build_parser("train").parse_args(["train", kind, "--embedder", "E", "--out", "O", "--prefix-length", "3",
                                                 "--noise-variance", "0.5", "--mean-shift", "--lm-mode", "lora"])
        assert (args.prefix_length, args.noise_variance, args.mean_shift, args.lm_mode) == (3, 0.5, True, "lora"), kind
