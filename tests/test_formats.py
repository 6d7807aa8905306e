"""Data at the scale users hold it: webdataset tar shards (as img2dataset writes them) captioned and
embedded as they are, and precomputed vectors as .npy files and clip-retrieval folders (.npy +
parquet metadata, LAION's layout) captioned with their ids and metadata carried into the output."""
import io
import json
import tarfile

import numpy as np
import pytest

from unembed.cli import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, main
from unembed.data.images import expand_inputs


def write_shards(scenes_dir, folder, per_shard=4, shards=2, broken: bool = True):
    """img2dataset's layout: KEY.jpg + KEY.txt + KEY.json per sample, keys numbered across shards."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = sorted((scenes_dir / "test" / "images").glob("*.png"))[:per_shard * shards]
    keys = []
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:04d}.tar", "w") as tar:
            for i, path in enumerate(paths[s * per_shard:(s + 1) * per_shard]):
                key = f"{s:04d}{i:04d}"
                buffer = io.BytesIO()
                Image.open(path).convert("RGB").save(buffer, format="PNG")
                for suffix, data in ((".png", buffer.getvalue()), (".txt", b"a caption"),
                                     (".json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(key + suffix)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                keys.append(key)
            if broken and s == 0:
                info = tarfile.TarInfo("0000broken.png")
                info.size = 9
                tar.addfile(info, io.BytesIO(b"not a png"))
    return paths, keys


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_webdataset_shards_caption_and_embed_as_they_are(scenes_dir, retrieval_dir, embedder_dir, tmp_path, capsys):
    paths, keys = write_shards(scenes_dir, tmp_path / "shards")
    files, errors = expand_inputs([str(tmp_path / "shards" / "shard-{0000..0001}.tar")])
    assert not errors and len(files) == len(keys) + 1
    assert expand_inputs([str(tmp_path / "shards" / "*.tar")])[0] == files
    out = tmp_path / "shards.jsonl"
    assert main(["caption", str(tmp_path / "shards" / "shard-{0000..0001}.tar"), "--decoder", str(retrieval_dir),
                 "--out", str(out), "--device", "cpu"]) == EXIT_PARTIAL
    assert "shard-0000.tar/0000broken.png: not an image file" in capsys.readouterr().err
    from_shards = _jsonl(out)
    assert [r["image_id"] for r in from_shards] == keys  # the sample key is the id, spelled exactly
    direct = tmp_path / "direct.jsonl"
    assert main(["caption", *map(str, paths), "--decoder", str(retrieval_dir), "--out", str(direct),
                 "--device", "cpu"]) == EXIT_OK
    assert [r["caption"] for r in from_shards] == [r["caption"] for r in _jsonl(direct)]
    assert main(["embed", str(tmp_path / "shards" / "*.tar"), "--embedder", str(embedder_dir), "--out",
                 str(tmp_path / "v.safetensors"), "--device", "cpu"]) == EXIT_PARTIAL


@pytest.fixture(scope="module")
def embedded(scenes_dir, embedder_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vectors") / "test.safetensors"
    assert main(["embed", str(scenes_dir / "test" / "images"), "--embedder", str(embedder_dir), "--out", str(out),
                 "--device", "cpu"]) == EXIT_OK
    from unembed.embedders import Embedded

    return out, Embedded.load(out)


def test_npy_and_clip_retrieval_folders_caption_with_ids_and_metadata(embedded, retrieval_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, vectors = embedded
    reference = tmp_path / "reference.jsonl"
    assert main(["caption", "--embeddings", str(path), "--decoder", str(retrieval_dir), "--out", str(reference),
                 "--batch-size", "5"]) == EXIT_OK
    expected = [r["caption"] for r in _jsonl(reference)]
    array = vectors.vectors.numpy()
    np.save(tmp_path / "img_emb.npy", array.astype(np.float16))
    assert main(["caption", "--embeddings", str(tmp_path / "img_emb.npy"), "--decoder", str(retrieval_dir),
                 "--out", str(tmp_path / "npy.jsonl"), "--batch-size", "5"]) == EXIT_OK
    assert "names no embedder" in capsys.readouterr().err
    assert [r["caption"] for r in _jsonl(tmp_path / "npy.jsonl")] == expected

    folder = tmp_path / "laion"
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    half = len(array) // 2
    for i, rows in enumerate((slice(0, half), slice(half, None))):
        np.save(folder / "img_emb" / f"img_emb_{i}.npy", array[rows])
        ids = list(range(len(array)))[rows]
        pq.write_table(pa.table({"key": [f"k{j:05d}" for j in ids], "url": [f"http://x/{j}.jpg" for j in ids],
                                 "caption": [f"alt {j}" for j in ids]}), folder / "metadata" / f"metadata_{i}.parquet")
    out = tmp_path / "laion.jsonl"
    assert main(["caption", "--embeddings", str(folder), "--decoder", str(retrieval_dir), "--out", str(out),
                 "--batch-size", "5"]) == EXIT_OK  # batches cross the two files
    records = _jsonl(out)
    assert [r["caption"] for r in records] == expected
    last = len(array) - 1
    assert [r["image_id"] for r in records] == [f"k{j:05d}" for j in range(len(array))]
    assert records[-1]["metadata"] == {"key": f"k{last:05d}", "url": f"http://x/{last}.jpg", "caption": f"alt {last}"}


def test_npy_that_needs_unpickling_is_refused(retrieval_dir, tmp_path, capsys):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    assert main(["caption", "--embeddings", str(tmp_path / "objects.npy"), "--decoder", str(retrieval_dir)]) == EXIT_FAILED
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot be read without unpickling" in line


def test_the_guides_at_scale_commands_run(scenes_dir, embedded, retrieval_dir, tmp_path, monkeypatch):
    """The "Data at scale" block as written, with the tiny retrieval decoder given last (so it wins)."""
    from tests.test_readme import commands

    write_shards(scenes_dir, tmp_path / "shards", broken=False)
    (tmp_path / "laion-embeddings" / "img_emb").mkdir(parents=True)
    from unembed.embedders import Embedded

    np.save(tmp_path / "laion-embeddings" / "img_emb" / "img_emb_0.npy", Embedded.load(embedded[0]).vectors.numpy())
    monkeypatch.chdir(tmp_path)
    for argv in commands("at-scale"):
        assert main(argv[1:] + ["--decoder", str(retrieval_dir), "--device", "cpu"]) == EXIT_OK, argv
    assert len(_jsonl(tmp_path / "shard-captions.jsonl")) == 8
    assert len(_jsonl(tmp_path / "laion-captions.jsonl")) == len(Embedded.load(embedded[0]))
