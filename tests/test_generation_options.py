"""One decoding-options contract (unembed/generation.py): every decoder kind refuses an option it does
not take, and a value out of bounds, in the same one line from the library, the CLI and HTTP."""
from pathlib import Path

import pytest

from unembed.bundle import manifest
from unembed.decoders import decoder_class, list_decoders
from unembed.errors import BadInputError
from unembed.generation import GENERATION_OPTIONS, LOOP_OPTIONS, check_generation

EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "scene-0.png")


def foreign_option(kind: str) -> str:
    """An option this kind does not take (every kind lacks one)."""
    return next(name for name in GENERATION_OPTIONS if name not in decoder_class(kind).takes())


def refused(kind: str) -> list[tuple[dict, str]]:
    """(options, the one line that refuses them) for this kind: a foreign option, and a bound broken."""
    takes = decoder_class(kind).takes()
    name = foreign_option(kind)
    offered = f"it takes {', '.join(takes)}" if takes else "it takes no decoding options"
    cases = [({name: 1}, f"option {name}: the {kind} decoder does not take it ({offered})")]
    if "num_beams" in takes:
        cases.append(({"num_beams": 99}, f"option num_beams: the {kind} decoder takes an integer in [1, 16], got 99"))
    return cases


def test_every_kind_declares_only_known_options():
    for kind in list_decoders():
        takes = decoder_class(kind).takes()
        assert set(takes) <= set(GENERATION_OPTIONS), kind
    assert decoder_class("retrieval").generation_options == ()
    assert decoder_class("retrieval").takes() == LOOP_OPTIONS  # every kind reranks
    assert "do_sample" not in decoder_class("iterative").generation_options  # it re-ranks deterministically


BUNDLED = manifest()["decoders"]  # the kinds the library, the CLI and serve reach by name with no files


def test_every_kind_is_bundled_but_those_made_of_others():
    # a corrector is trained over a base decoder, an ensemble is built from members: both made by the user
    assert sorted(BUNDLED) == sorted(k for k in list_decoders() if k not in ("corrector", "ensemble"))
    line = "option k: the corrector decoder does not take it (it takes correct, num_beams, max_length, margin, edits, rerank)"
    with pytest.raises(BadInputError) as e:
        decoder_class("corrector").check_generation({"k": 1})
    assert str(e.value) == line


@pytest.mark.parametrize("kind", BUNDLED)
def test_the_library_refuses_in_one_line(kind):
    import unembed

    for options, line in refused(kind):
        with pytest.raises(BadInputError) as e:
            unembed.caption([EXAMPLE], decoder=kind, **options)
        assert str(e.value) == line


@pytest.mark.parametrize("kind", BUNDLED)
def test_the_cli_refuses_in_one_line_before_loading(kind, capsys):
    from unembed.cli import main

    for options, line in refused(kind):
        (name, value), = options.items()
        flag = "--sample" if name == "do_sample" else f"--{name.replace('_', '-')}"
        argv = ["caption", EXAMPLE, "--decoder", kind] + ([flag] if name == "do_sample" else [flag, str(value)])
        assert main(argv) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"unembed: {line}"


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    from unembed.serve import Models, ServeConfig, create_app

    return TestClient(create_app(ServeConfig(), models=Models([], "cpu")))  # every bundled decoder


@pytest.mark.parametrize("kind", BUNDLED)
def test_http_refuses_in_one_line_with_422(kind, client):
    for options, line in refused(kind):
        (name, value), = options.items()
        query = {"decoder": kind, ("sample" if name == "do_sample" else name): "true" if name == "do_sample" else value}
        with open(EXAMPLE, "rb") as image:
            response = client.post("/caption", params=query, files={"file": ("scene-0.png", image, "image/png")})
        assert (response.status_code, response.json()) == (422, {"error": line})


def test_rerank_gives_the_same_caption_from_the_library_the_cli_and_http(client):
    import contextlib
    import io
    import json

    import unembed
    from unembed.cli import main

    options = {"rerank": 4, "rerank_weight": 0.5}
    library = unembed.caption([EXAMPLE], decoder="capdec", **options)[0]
    with open(EXAMPLE, "rb") as image:
        response = client.post("/caption", params={"decoder": "capdec", **options},
                               files={"file": ("scene-0.png", image, "image/png")})
    assert response.status_code == 200 and [r["caption"] for r in response.json()] == [library]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["caption", EXAMPLE, "--decoder", "capdec", "--rerank", "4", "--rerank-weight", "0.5"]) == 0
    assert json.loads(out.getvalue().splitlines()[0])["caption"] == library


def test_bounds_and_types_are_checked():
    takes = ("num_beams", "top_p", "do_sample", "prompt")
    assert check_generation("x", takes, {"num_beams": 3.0, "top_p": None}) == {"num_beams": 3}
    for options, says in (({"num_beams": 0}, "an integer in [1, 16], got 0"),
                          ({"num_beams": 2.5}, "an integer in [1, 16], got 2.5"),
                          ({"num_beams": True}, "an integer in [1, 16], got True"),
                          ({"do_sample": True, "top_p": 0}, "a number in (0, 1], got 0"),
                          ({"do_sample": True, "top_p": float("nan")}, "a number in (0, 1], got nan"),
                          ({"do_sample": "yes"}, "true or false, got 'yes'"),
                          ({"prompt": "x" * 201}, "a text of at most 200 characters"),
                          ({"top_p": 0.5}, "uses it only with do_sample")):
        with pytest.raises(BadInputError, match=says.replace("(", r"\(").replace("[", r"\[")):
            check_generation("x", takes, options)
