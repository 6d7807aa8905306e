import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from unembed.embedders import Embedded, Embedder
from unembed.errors import BadInputError, MismatchError, ModelLoadError, UnsafeFileError


def test_embeddings_are_normalised_batched_and_deterministic(embedder, scenes_dir):
    images = [Image.open(p).convert("RGB") for p in sorted((scenes_dir / "test" / "images").glob("*.png"))[:5]]
    a = embedder.embed_images(images, batch_size=2)
    b = embedder.embed_images(images, batch_size=5)
    assert a.shape == (5, embedder.dim)
    assert torch.allclose(a.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(a, b, atol=1e-5)  # batching does not change results
    t = embedder.embed_texts(["a red circle", "two blue squares", "a red circle"])
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(t[0], t[2]) and not torch.allclose(t[0], t[1])


def test_training_preprocessing_matches_inference_preprocessing(embedder, scenes_dir):
    """Training augments (open_clip's random resized crop) but must see pixels of the same size and
    normalisation as inference does: the same Normalize and the same output shape."""
    from torchvision import transforms

    from unembed.training.clip import train_transform

    path = sorted((scenes_dir / "test" / "images").glob("*.png"))[0]
    train = train_transform(embedder.config["preprocess"])
    image = Image.open(path).convert("RGB")
    assert train(image).shape == embedder.preprocess(image).shape

    def normalize(transform):
        (found,) = [t for t in transform.transforms if isinstance(t, transforms.Normalize)]
        return tuple(found.mean), tuple(found.std)

    assert normalize(train) == normalize(embedder.preprocess)
    assert any(isinstance(t, transforms.RandomResizedCrop) for t in train.transforms)


def test_saved_embedder_reloads_identically(embedder, embedder_dir, tmp_path):
    again = Embedder.from_spec(str(embedder_dir), device="cpu")
    assert again.id == embedder.id and again.id.startswith("tiny-clip-")
    texts = ["a green star above a white heart"]
    assert torch.equal(again.embed_texts(texts), embedder.embed_texts(texts))


def test_training_reports_recall_and_gap(embedder_dir):
    import json

    metrics = json.loads((embedder_dir / "metrics.json").read_text())
    for split in ("val", "test", "compositional"):
        assert 0 <= metrics[split]["i2t_R@1"] <= metrics[split]["i2t_R@5"] <= 1
        assert "gap_mean_distance" in metrics[split]


def test_embedded_round_trip_and_raw_vectors(tmp_path, embedder):
    e = Embedded(torch.nn.functional.normalize(torch.randn(3, embedder.dim), dim=-1), ["a", "b", "c"],
                 embedder.id, embedder.spec)
    e.save(tmp_path / "e.safetensors")
    back = Embedded.load(tmp_path / "e.safetensors")
    assert back.ids == ["a", "b", "c"] and back.embedder_id == embedder.id and torch.equal(back.vectors, e.vectors)
    # A user's bare [N, D] tensor is accepted as it is (raw: each decoder normalises as its method does),
    # said to be raw since its rows are not of unit length, and numbered.
    from safetensors.torch import save_file

    given = torch.randn(4, embedder.dim) * 3
    save_file({"anything": given}, str(tmp_path / "raw.safetensors"))
    raw = Embedded.load(tmp_path / "raw.safetensors")
    assert raw.ids == ["0", "1", "2", "3"] and torch.equal(raw.vectors, given) and not raw.normalized
    assert torch.allclose(raw.unit().norm(dim=-1), torch.ones(4), atol=1e-5)
    embedder.check(back)
    with pytest.raises(MismatchError, match="not from"):
        embedder.check(Embedded(e.vectors, e.ids, "other-id", "ViT-B-32:openai"))


def test_pickles_are_refused_never_loaded(tmp_path):
    torch.save({"vectors": torch.zeros(2, 2)}, tmp_path / "e.safetensors")
    with pytest.raises(UnsafeFileError, match="pickle"):
        Embedded.load(tmp_path / "e.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file at all")
    with pytest.raises(BadInputError, match="junk.safetensors"):
        Embedded.load(tmp_path / "junk.safetensors")


def test_unknown_names_fail_with_a_clear_message():
    with pytest.raises(ModelLoadError, match="neither a directory nor an open_clip architecture"):
        Embedder.from_spec("no-such-model:whatever")
    with pytest.raises(ModelLoadError, match="unknown pretrained tag"):
        Embedder.from_spec("ViT-B-32:no_such_tag")


def test_random_weight_architecture_builds_offline():
    e = Embedder.from_spec("RN50", device="cpu")
    assert e.dim == 1024 and e.id == "RN50:random"


def test_pretrained_name_offline_fails_fast_with_one_line(tmp_path):
    """With no hub, a pretrained name must fail in seconds with one clear line, not hang or retry."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    run = subprocess.run([sys.executable, "-m", "unembed.cli", "embed", "nothing.png", "--embedder",
                          "ViT-B-32:laion2b_s34b_b79k", "--out", str(tmp_path / "e.safetensors")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "ViT-B-32:laion2b_s34b_b79k" in lines[0] and "local embedder directory" in lines[0]
