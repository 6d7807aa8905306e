"""Options that do what they say: --device is honoured (and one clear line when the machine lacks
it), and `unembed train KIND` refuses an option its kind does not take."""
import argparse
import dataclasses
import json

import pytest
import torch

from unembed.cli import EXIT_FAILED, EXIT_OK, build_parser, main


def _lines(err):
    return [line for line in err.splitlines() if line.strip()]


# --- --device -------------------------------------------------------------------------------------

def _commands_with_device(parser, prefix=()):
    """(argv prefix, subparser) of every command that takes --device, each required argument a dummy."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands_with_device(sub, (*prefix, name))
    if any("--device" in a.option_strings for a in parser._actions):
        argv = list(prefix)
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                continue
            if not a.option_strings:
                argv += [] if a.nargs == "*" else [a.choices[0] if a.choices else "x"]
            elif a.required:
                argv += [a.option_strings[0], "x"]
        yield argv


COMMANDS = sorted(_commands_with_device(build_parser("train")))


def test_every_device_command_is_checked():
    assert {argv[0] for argv in COMMANDS} >= {"caption", "embed", "eval", "compare", "gap", "demo", "train", "build",
                                             "serve"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_a_device_the_machine_lacks_is_one_line_and_exit_2(argv, capsys):
    assert main([*argv, "--device", "cuda"]) == EXIT_FAILED
    [line] = _lines(capsys.readouterr().err)
    assert line == "unembed: device 'cuda': this machine has no CUDA devices (use --device cpu, or auto)"


def test_a_misspelt_device_is_one_line_and_exit_2(capsys):
    assert main(["embed", "x.png", "--embedder", "x", "--out", "x", "--device", "cdua"]) == EXIT_FAILED
    [line] = _lines(capsys.readouterr().err)
    assert "device 'cdua'" in line


def test_caption_embeddings_decode_on_the_device_asked_for(retrieval_dir, embedder_dir, scenes_dir, tmp_path,
                                                           monkeypatch):
    """--embeddings used to load the decoder on the CPU whatever --device said. CUDA is pretended here
    (the decoder still loads on the CPU) to see which device the command asks for."""
    import unembed.decoders

    vectors = tmp_path / "v.safetensors"
    assert main(["embed", str(scenes_dir / "test" / "images"), "--embedder", str(embedder_dir), "--out", str(vectors),
                 "--device", "cpu"]) == EXIT_OK
    asked, real = [], unembed.decoders.load_decoder

    def load_decoder(path, device="cpu", embedder=None):
        asked.append(device)
        return real(path, device="cpu", embedder=embedder)

    monkeypatch.setattr(unembed.decoders, "load_decoder", load_decoder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["caption", "--embeddings", str(vectors), "--decoder", str(retrieval_dir), "--out",
                 str(tmp_path / "c.jsonl"), "--device", "cuda"]) == EXIT_OK
    assert asked == ["cuda"]


# --- options of `unembed train KIND` ----------------------------------------------------------------

def _prefix_kinds():
    from unembed.decoders import decoder_class, prefix_kinds

    return [decoder_class(k) for k in prefix_kinds()]


def _refused():
    """(kind, option, the kinds that take it) for every option of one kind that another does not take."""
    kinds = _prefix_kinds()
    options = {name: [c.kind for c in kinds if name in c.cli_options] for c in kinds for name in c.cli_options}
    return [(c.kind, name, takers) for c in kinds for name, takers in options.items() if name not in c.cli_options]


def _value(name):
    """A value the option parses, none for a switch."""
    from unembed.cli.common import _type_name

    owner = next(c for c in _prefix_kinds() if name in c.cli_options)
    field = next(f for f in dataclasses.fields(owner.config_class) if f.name == name)
    kind_name = _type_name(field)
    if kind_name == "bool":
        return []
    choices = field.metadata.get("choices")
    return [str(choices[0]) if choices else {"int": "10", "float": "0.1", "dict": "{}"}.get(kind_name, "x")]


@pytest.fixture()
def no_training(monkeypatch):
    """train_prefix replaced by a recorder: these tests are about which options reach it."""
    import unembed.training.prefix

    seen = []
    monkeypatch.setattr(unembed.training.prefix, "train_prefix", lambda *args, **options: seen.append(options) or {})
    return seen


def test_clipcap_declares_no_bridge_options():
    from unembed.decoders import decoder_class
    from unembed.decoders.prefix import BRIDGE_OPTIONS

    assert not set(BRIDGE_OPTIONS) & set(decoder_class("clipcap").cli_options)
    assert set(BRIDGE_OPTIONS) <= set(decoder_class("capdec").cli_options)


@pytest.mark.parametrize("kind, name, takers", _refused(), ids=lambda v: v if isinstance(v, str) else "")
def test_an_option_the_kind_does_not_take_is_refused(kind, name, takers, embedder_dir, tmp_path, no_training, capsys):
    from unembed.cli.common import option_flag
    from unembed.decoders import decoder_class

    flag = option_flag(decoder_class(takers[0]).config_class, name)
    code = main(["train", kind, flag, *_value(name), "--embedder", str(embedder_dir), "--out",
                 str(tmp_path / "out"), "--device", "cpu"])
    assert code == EXIT_FAILED and not no_training
    [line] = _lines(capsys.readouterr().err)
    assert line.startswith(f"unembed: {flag}: does nothing for {kind}: only {', '.join(takers)} take")


@pytest.mark.parametrize("flag, value", [("--noise-variance", "0.1"), ("--projection-size", "10")])
def test_clipcap_refuses_bridge_options(flag, value, embedder_dir, tmp_path, no_training, capsys):
    code = main(["train", "clipcap", flag, value, "--embedder", str(embedder_dir), "--out", str(tmp_path / "out"),
                 "--device", "cpu"])
    assert code == EXIT_FAILED and not no_training
    [line] = _lines(capsys.readouterr().err)
    assert line == f"unembed: {flag}: does nothing for clipcap: only capdec, decap, viecap take it"


def test_capdec_takes_noise_variance(embedder_dir, tmp_path, no_training, capsys):
    (tmp_path / "caps.txt").write_text("a red square\n")
    assert main(["train", "capdec", "--noise-variance", "0.1", "--embedder", str(embedder_dir), "--out",
                 str(tmp_path / "out"), "--device", "cpu", "--captions", str(tmp_path / "caps.txt")]) == EXIT_OK
    assert [options["noise_variance"] for options in no_training] == [0.1]


def test_a_word_class_file_reaches_training_as_its_word_lists(embedder_dir, tmp_path, no_training):
    """The CLI reads a --recombine file once, to check it before the embedder loads, and hands training
    the word lists: training never opens the file again."""
    classes = tmp_path / "classes.json"
    classes.write_text('{"colours": ["Red", "green"], "sizes": ["big", "small"]}')
    (tmp_path / "caps.txt").write_text("a red square\n")
    assert main(["train", "capdec", "--recombine", f"{classes},colours", "--embedder", str(embedder_dir),
                 "--out", str(tmp_path / "out"), "--device", "cpu", "--captions", str(tmp_path / "caps.txt")]) == EXIT_OK
    [options] = no_training
    from unembed.data.recombine import BUILTIN_CLASSES
    assert json.loads(options["recombine"]) == [["red", "green"], ["big", "small"], list(BUILTIN_CLASSES["colours"])]


@pytest.mark.parametrize("content, says", [(b'{"n_layer": 2', "malformed JSON at line 1"),
                                           (b"\x80\x04K\x01.", "looks like a pickle"), (b"[1, 2]", "must be a JSON object")])
def test_a_bad_json_option_file_is_one_line_naming_it(content, says, embedder_dir, tmp_path, no_training, capsys):
    config = tmp_path / "lm.json"
    config.write_bytes(content)
    (tmp_path / "caps.txt").write_text("a red square\n")
    code = main(["train", "capdec", "--lm-config", str(config), "--embedder", str(embedder_dir),
                 "--out", str(tmp_path / "out"), "--device", "cpu", "--captions", str(tmp_path / "caps.txt")])
    assert code == EXIT_FAILED and not no_training
    [line] = _lines(capsys.readouterr().err)
    assert str(config) in line and says in line
