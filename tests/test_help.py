"""Help that teaches: every command has examples that parse, every option a description."""
import argparse
import shlex

import pytest

from unembed.cli import build_parser
from unembed.cli.help import EXAMPLES, commands

PARSER = build_parser()
ALIASES = {"train retrieval", "train iterative"}  # old spellings of `build ...`, kept working
COMMANDS = {name: p for name, p in commands(PARSER)
            if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)}


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - ALIASES))
def test_every_command_has_examples_that_parse(name):
    assert name in EXAMPLES and 1 <= len(EXAMPLES[name]) <= 3
    assert COMMANDS[name].epilog.startswith("examples:\n")
    for line in EXAMPLES[name]:
        argv = shlex.split(line)
        assert argv[0] == "unembed" and " ".join(argv[1:]).startswith(name)
        PARSER.parse_args(argv[1:])  # an example that no longer parses exits 2 here


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_a_description(name):
    undocumented = [a.option_strings[0] if a.option_strings else a.dest for a in COMMANDS[name]._actions
                    if a.help is None and not isinstance(a, argparse._HelpAction)]
    assert undocumented == []


def test_defaults_are_shown(capsys):
    with pytest.raises(SystemExit) as done:
        PARSER.parse_args(["caption", "--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0
    assert "(default: 32)" in text and "(default: auto)" in text and "examples:\n  unembed caption" in text


def test_the_bundled_embedder_has_a_name(tmp_path):
    from unembed.cli import main

    out = tmp_path / "e.safetensors"
    image = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "scene-0.png")
    assert main(["embed", image, "--embedder", "bundle", "--out", str(out)]) == 0
    from unembed.bundle import bundle_dir
    from unembed.embedders import Embedded, load_embedder

    assert Embedded.load(out).embedder_id == load_embedder(str(bundle_dir() / "embedder")).id
