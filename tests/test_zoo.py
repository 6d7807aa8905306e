"""Pretrained decoders by name (unembed/zoo.py): `unembed caption PHOTO --decoder NAME`, offline, from a
Hugging Face cache in the hub's own layout that holds every entry's sources under their real repo ids
and file names, in their real key layouts, with tiny random weights (tests/hub_cache.py: the ClipCap
releases as torch.save'd state dicts, OpenAI's ViT-B/32 as timm's open_clip repo holds it, the LAION
CoCas as open_clip_config.json + open_clip_pytorch_model.bin, GPT-2's config and tokenizer).

For every entry: the first use downloads (here: finds) the file and converts it, once; the second use
loads the cached conversion (the converter is not called again, the directory is the same one,
untouched, and the captions are the same); a new upstream revision (a new commit whose file has other
bytes) is converted again, beside the old one. A name that means nothing fails in one line listing the
names. Commands run in this process (unembed reads HF_HOME, HF_HUB_OFFLINE and UNEMBED_CACHE at call
time); HF_ENDPOINT points at a closed local port, so nothing could be fetched even if something tried."""
import contextlib
import hashlib
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.hub_cache import OPENAI_VIT_B_32, add_zoo_source, write_zoo_cache
from unembed import zoo

CLOSED = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def zoo_hub(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf-zoo")
    return home, write_zoo_cache(home)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from PIL import Image, ImageDraw

    path = tmp_path_factory.mktemp("photos") / "photo.jpg"
    image = Image.new("RGB", (64, 48), (235, 235, 225))
    ImageDraw.Draw(image).rectangle((10, 8, 40, 36), fill=(200, 30, 30))
    image.save(path)
    return path


@pytest.fixture
def offline(zoo_hub, monkeypatch, tmp_path):
    """The zoo hub cache as HF_HOME, offline, and a fresh unembed cache; returns its zoo folder."""
    monkeypatch.setenv("HF_HOME", str(zoo_hub[0]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", CLOSED)
    monkeypatch.setenv("UNEMBED_CACHE", str(tmp_path / "unembed-cache"))
    return tmp_path / "unembed-cache" / "zoo"


@pytest.fixture
def conversions(monkeypatch):
    """Counts the converters' calls: the importer of published checkpoints, and CoCa's decoder-over-embedder."""
    from unembed.decoders import published
    from unembed.decoders.coca import CoCaDecoder

    calls = {"clipcap": 0, "coca": 0}
    importer, over_embedder = published.import_published, CoCaDecoder.for_embedder

    def counted_import(kind, *args, **kwargs):
        calls[kind] += 1
        return importer(kind, *args, **kwargs)

    def counted_coca(cls, *args, **kwargs):
        calls["coca"] += 1
        return over_embedder(*args, **kwargs)

    monkeypatch.setattr(published, "import_published", counted_import)
    monkeypatch.setattr(CoCaDecoder, "for_embedder", classmethod(counted_coca))
    return calls


def unembed(*argv) -> SimpleNamespace:
    from unembed.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return SimpleNamespace(code=code, stdout=out.getvalue(), stderr=err.getvalue())


def caption(name: str, photo: Path) -> list[str]:
    run = unembed("caption", photo, "--decoder", name, "--device", "cpu", "--max-length", "8")
    assert run.code == 0, run.stderr
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(records) == 1 and isinstance(records[0]["caption"], str), records
    return [r["caption"] for r in records]


def cached_file(home: Path, repo: str, file: str) -> tuple[Path, str]:
    root = home / "hub" / ("models--" + repo.replace("/", "--"))
    commit = (root / "refs" / "main").read_text()
    return root / "snapshots" / commit / file, commit


def converted(zoo_dir: Path) -> dict[str, dict]:
    """{folder name: its zoo.json} of the unembed cache's conversions."""
    return {p.name: json.loads((p / "zoo.json").read_text()) for p in sorted(zoo_dir.iterdir())} \
        if zoo_dir.is_dir() else {}


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_a_pretrained_name_converts_once_loads_the_cached_conversion_and_converts_a_new_revision(
        name, zoo_hub, offline, conversions, photo):
    from unembed.decoders.base import FORMAT_VERSION

    home, model = zoo_hub[0], zoo.ZOO[name]
    source, commit = cached_file(home, model.repo, model.file)
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    folder = f"{name}-{sha[:16]}-f{FORMAT_VERSION}"

    first = caption(name, photo)
    assert conversions[model.method] == 1
    made = converted(offline)
    assert list(made) == [folder]
    assert made[folder] == {"name": name, "method": model.method, "repo": model.repo, "file": model.file,
                            "revision": commit, "sha256": sha, "format_version": FORMAT_VERSION,
                            "unembed_version": made[folder]["unembed_version"]}
    decoder = offline / folder / name
    saved = json.loads((decoder / "config.json").read_text())
    assert saved["kind"] == model.method and saved["config"]["embedder_spec"] == model.embedder
    if model.method == "clipcap":  # the release's settings, as ClipCap's own inference runs it
        config = saved["config"]
        assert (config["mapper"], config["prefix_length"], config["lm"], config["lm_mode"], config["normalize"],
                config["stop"], config["num_beams"]) == ("mlp", 10, "gpt2", "full", False, ".", 1)
    stamp = [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(decoder.iterdir())]

    assert caption(name, photo) == first
    assert conversions[model.method] == 1  # not converted again
    assert list(converted(offline)) == [folder]
    assert [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(decoder.iterdir())] == stamp

    new_commit = add_zoo_source(home, model.repo, seed=1)
    new_source, _ = cached_file(home, model.repo, model.file)
    new_sha = hashlib.sha256(new_source.read_bytes()).hexdigest()
    assert new_sha != sha
    caption(name, photo)
    assert conversions[model.method] == 2
    made = converted(offline)
    assert sorted(made) == sorted([folder, f"{name}-{new_sha[:16]}-f{FORMAT_VERSION}"])
    assert made[f"{name}-{new_sha[:16]}-f{FORMAT_VERSION}"]["revision"] == new_commit


def test_the_library_and_the_server_take_the_same_names(offline, photo):
    import unembed
    from unembed.serve import Models

    by_cli = caption("clipcap-conceptual", photo)
    assert unembed.caption([str(photo)], decoder="clipcap-conceptual", device="cpu", max_length=8) == by_cli
    served = Models(["clipcap-conceptual", "coca-vit-b-32-coco"], device="cpu")
    assert [d["name"] for d in served.describe()] == ["clipcap-conceptual", "coca-vit-b-32-coco"]
    assert [d["embedder"] for d in served.describe()] == [zoo.ZOO[n].embedder for n in served.decoders]


def test_an_unknown_name_fails_in_one_line_listing_the_names(offline, photo):
    from unembed.bundle import manifest

    run = unembed("caption", photo, "--decoder", "clipcap-cocoo")
    lines = run.stderr.strip().splitlines()
    assert run.code == 2 and len(lines) == 1, run.stderr
    assert lines[0].startswith("unembed: decoder 'clipcap-cocoo': ") and "did you mean 'clipcap-coco'?" in lines[0]
    assert all(name in lines[0] for name in [*zoo.ZOO, *manifest()["decoders"]])
    assert not offline.exists()  # nothing was fetched or written
    run = unembed("models", "--fetch", "coca-vit-b32-coco")
    assert run.code == 2 and run.stderr.count("\n") == 1 and "did you mean 'coca-vit-b-32-coco'?" in run.stderr


def test_a_name_whose_file_is_not_in_the_cache_offline_fails_in_one_line(monkeypatch, tmp_path, photo):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("UNEMBED_CACHE", str(tmp_path / "cache"))
    run = unembed("caption", photo, "--decoder", "coca-vit-l-14-coco")
    lines = run.stderr.strip().splitlines()
    assert run.code == 2 and len(lines) == 1, run.stderr
    assert zoo.ZOO["coca-vit-l-14-coco"].repo in lines[0] and "HF_HUB_OFFLINE is set" in lines[0]


def test_models_lists_the_pretrained_names_and_the_bundle(offline, zoo_hub):
    from unembed.bundle import manifest

    fetched = unembed("models", "--fetch", "clipcap-coco")
    assert fetched.code == 0, fetched.stderr
    decoder = Path(fetched.stdout.strip())
    assert decoder.name == "clipcap-coco" and (decoder / "config.json").is_file()
    listed = unembed("models", "--json")
    assert listed.code == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert list(rows) == [*zoo.ZOO, *manifest()["decoders"]]
    assert rows["clipcap-coco"]["status"] == "converted"
    assert {rows[n]["status"] for n in zoo.ZOO if n != "clipcap-coco"} == {"downloaded"}
    for name in zoo.ZOO:
        row = rows[name]
        assert row["from"] == "pretrained" and all(row[k] for k in ("method", "embedder", "lm", "repo", "file",
                                                                        "size", "licence", "settings"))
    assert rows["clipcap-coco"]["scores"]["CIDEr"] == 108.35 and rows["clipcap-conceptual"]["scores"]["CIDEr"] == 87.26
    assert {rows[n]["from"] for n in manifest()["decoders"]} == {"bundle"}
    table = unembed("models")
    assert table.code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "METHOD", "EMBEDDER"]
    for name in rows:
        assert any(line.startswith(name + " ") for line in lines[1:]), name
    assert "akhaliq/CLIP-prefix-captioning-COCO-weights/coco_weights.pt" in table.stdout


def test_each_entry_names_the_repo_open_clip_itself_loads_those_weights_from():
    """The embedders are named by hub repo; open_clip's registry says that repo is where its pretrained
    name of the same weights comes from."""
    from unembed.compat import import_open_clip

    import_open_clip()
    from open_clip.pretrained import get_pretrained_cfg

    assert zoo.OPENAI_VIT_B_32 == f"hf-hub:{OPENAI_VIT_B_32}"
    for model in zoo.ZOO.values():
        arch, tag = model.open_clip_name.split(":")
        assert get_pretrained_cfg(arch, tag)["hf_hub"].rstrip("/") == model.embedder.removeprefix("hf-hub:")
        if model.method == "coca":
            assert model.repo == model.embedder.removeprefix("hf-hub:")
    assert os.path.basename(zoo.ZOO["clipcap-coco"].file) == "coco_weights.pt"


def test_the_readmes_zoo_commands_run_as_written(offline, photo):
    """README's `readme-test: zoo` block, line for line, from the fixture cache (photo.jpg in the cwd)."""
    import os
    import shlex
    import shutil

    from tests.test_readme import block

    shutil.copyfile(photo, Path.cwd() / "photo.jpg")
    lines = [shlex.split(line) for line in block("zoo").splitlines() if line.strip()]
    assert [argv[:2] for argv in lines] == [["unembed", "models"], ["unembed", "caption"]]
    listed = unembed(*lines[0][1:])
    assert listed.code == 0 and "clipcap-coco" in listed.stdout and "coca-vit-l-14-coco" in listed.stdout
    captioned = unembed(*lines[1][1:], "--max-length", "8")
    assert captioned.code == 0, captioned.stderr
    assert json.loads(captioned.stdout)["decoder"] == "clipcap" and os.path.isdir(offline)
