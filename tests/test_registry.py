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
        self.decoder.text_prompts = lambda embedded, vectors: self.prompts
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

FORBIDDEN = {
    "unembed/eval": ("unembed.training", "unembed.cli", "unembed.compare"),
    "unembed/decoders": ("unembed.training", "unembed.cli", "unembed.eval", "unembed.compare"),
    "unembed/data": ("unembed.training", "unembed.cli", "unembed.eval", "unembed.compare", "unembed.decoders"),
    "unembed/training": ("unembed.cli", "unembed.compare"),
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_rooms_import_only_what_the_architecture_allows(room):
    broken = [f"{path.relative_to(ROOT)} imports {name}" for path in sorted((ROOT / room).rglob("*.py"))
              for name in _imports(path) if name.startswith(FORBIDDEN[room])]
    assert not broken, broken


def test_only_the_cli_parses_arguments():
    users = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "unembed").rglob("*.py"))
             if "argparse" in _imports(p) and "cli" not in p.parts]
    assert users == []


def test_generated_train_options_parse_to_their_fields_types():
    from unembed.cli import build_parser
    from unembed.decoders.prefix import PrefixDecoder

    for kind in list_decoders():
        if not issubclass(decoder_class(kind), PrefixDecoder):
            continue
        args = build_parser("train").parse_args(["train", kind, "--embedder", "E", "--out", "O", "--prefix-length", "3",
                                                 "--noise-variance", "0.5", "--mean-shift", "--lm-mode", "lora"])
        assert (args.prefix_length, args.noise_variance, args.mean_shift, args.lm_mode) == (3, 0.5, True, "lora"), kind
