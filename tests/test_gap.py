"""The modality-gap diagnostic: a planted gap is found and measured, each bridge moves it as the
decoders would, and the report writes a readable JSON and a non-blank plot."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unembed.eval.gap import BRIDGES, format_gap, gap_report, modality_gap

N, D = 2000, 64


def planted(offset_norm: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, texts, offset g, memory): texts random unit vectors, images = normalise(texts + g + noise),
    memory = other random unit vectors (DeCap's caption memory)."""
    gen = torch.Generator().manual_seed(seed)
    texts = F.normalize(torch.randn(N, D, generator=gen), dim=-1)
    g = F.normalize(torch.randn(D, generator=gen), dim=0) * offset_norm
    images = F.normalize(texts + g + 0.05 * torch.randn(N, D, generator=gen) / D ** 0.5, dim=-1)
    memory = F.normalize(torch.randn(5000, D, generator=gen), dim=-1)
    return images, texts, g, memory


@pytest.fixture(scope="module")
def gap():
    images, texts, g, memory = planted(1.0)
    return modality_gap(images, texts, memory), g


def test_planted_gap_is_found(gap):
    result, g = gap
    assert F.cosine_similarity(torch.tensor(result["gap_vector"]), g, dim=0) > 0.95
    # images ~ (t + g) / sqrt(1 + |g|^2) with t ⟂ g and mean(t) ~ 0, so mean(img) - mean(txt) ~ g / sqrt(1 + |g|^2)
    assert result["centroid_distance"] == pytest.approx(1.0 / 2 ** 0.5, abs=0.05)
    assert result["matched_cosine"] > result["random_cosine"] + 0.3
    assert abs(result["random_cosine"]) < 0.05
    assert result["n_pairs"] == N and result["dim"] == D and len(result["gap_vector"]) == D


def test_bridges_move_the_gap(gap):
    result, _ = gap
    bridges = result["bridges"]
    assert set(bridges) == set(BRIDGES)
    assert bridges["none"]["centroid_distance"] == result["centroid_distance"] and bridges["none"]["gap_closed"] == 0
    assert bridges["none"]["retrieval_r1"] > 0.99  # the noise in the planted pairs is far below the text spread
    assert bridges["mean_shift"]["gap_closed"] > 0.9
    assert bridges["projection"]["gap_closed"] > 0.3
    # CapDec's noise leaves the images alone and the texts' mean near 0 here, but blurs which text is which
    assert bridges["noise"]["centroid_distance"] == pytest.approx(result["centroid_distance"], abs=0.02)
    assert bridges["noise"]["matched_cosine"] < bridges["none"]["matched_cosine"] - 0.1
    for stats in bridges.values():
        assert stats["gap_closed"] == pytest.approx(1 - stats["centroid_distance"] / result["centroid_distance"])


def test_mean_shift_centres_both_modalities():
    """Real embedders put each modality in its own cone: shifting only one mean would leave the other's."""
    gen = torch.Generator().manual_seed(2)
    shared = torch.randn(N, D, generator=gen) / D ** 0.5
    text_cone, image_cone = F.normalize(torch.randn(2, D, generator=gen), dim=-1)
    texts = F.normalize(shared + text_cone, dim=-1)
    images = F.normalize(shared + image_cone + 0.05 * torch.randn(N, D, generator=gen) / D ** 0.5, dim=-1)
    result = modality_gap(images, texts)
    assert result["centroid_distance"] > 0.5
    assert result["bridges"]["mean_shift"]["gap_closed"] > 0.9
    assert result["bridges"]["mean_shift"]["retrieval_r1"] > 0.99


def test_no_gap_control():
    images, texts, _, memory = planted(0.0)
    result = modality_gap(images, texts, memory)
    assert result["centroid_distance"] < 0.1
    assert abs(result["random_cosine"]) < 0.02
    assert result["matched_cosine"] > 0.99


def test_seeded_and_scale_free():
    images, texts, _, memory = planted(1.0, seed=1)
    scaled = modality_gap(3 * images[:50], 0.5 * texts[:50], memory)
    assert scaled["centroid_distance"] == pytest.approx(modality_gap(images[:50], texts[:50], memory)["centroid_distance"])
    assert modality_gap(images[:50], texts[:50], memory) == modality_gap(images[:50], texts[:50], memory)
    assert modality_gap(images[:50], texts[:50], memory, seed=1) != modality_gap(images[:50], texts[:50], memory)


@pytest.mark.parametrize("n", [2, 3, 7, 100])
def test_random_pairs_are_true_mismatches(n):
    from unembed.eval.gap import _derangement

    for seed in range(20):
        mismatch = _derangement(n, torch.Generator().manual_seed(seed))
        assert sorted(mismatch.tolist()) == list(range(n))
        assert not (mismatch == torch.arange(n)).any()


def test_gap_report_writes_json_and_plot(scenes_dir, embedder, tmp_path):
    from PIL import Image

    from unembed.data.splits import load_split

    result = gap_report(embedder, scenes_dir, split="test", out_dir=tmp_path)
    saved = json.loads((tmp_path / "gap.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("n_pairs", "dim", "centroid_distance", "gap_vector", "matched_cosine", "random_cosine",
                "bridges", "embedder", "split", "data", "plot"):
        assert key in saved
    assert saved["n_pairs"] == len(load_split(scenes_dir / "test")[0])
    assert saved["embedder"] == embedder.spec and saved["plot"] == "gap.png"
    assert saved["memory"]["split"] == "train"
    assert np.asarray(Image.open(tmp_path / "gap.png").convert("L"), dtype=float).std() > 20


def test_format_gap_names_every_bridge(gap):
    table = format_gap(gap[0])
    for name in BRIDGES:
        assert f"| {name} |" in table
    assert f"{gap[0]['centroid_distance']:.3f}" in table.splitlines()[0]


def test_gap_command_prints_the_table_and_writes_json_and_plot(scenes_dir, embedder_dir, tmp_path, capsys):
    from unembed.cli import EXIT_OK, main

    assert main(["gap", "--embedder", str(embedder_dir), "--data", str(scenes_dir), "--out", str(tmp_path / "gap"),
                 "--device", "cpu"]) == EXIT_OK
    out = capsys.readouterr().out
    assert all(name in out for name in ("none", "noise", "mean_shift", "projection"))
    assert (tmp_path / "gap" / "gap.json").is_file() and (tmp_path / "gap" / "gap.png").is_file()


def test_the_gap_plane_shows_the_gap():
    """The plot's first axis runs along the difference of the means, so the two clouds separate on it by
    the centroid distance even when the gap is much smaller than the spread (a PCA of the union would
    put both means near the origin of its plane)."""
    from unembed.eval.gap import gap_plane

    g = torch.Generator().manual_seed(0)
    spread = torch.zeros(16)
    spread[0] = 5.0  # a large spread along axis 0
    images = torch.randn(400, 16, generator=g) * 0.1 + torch.randn(400, 1, generator=g) * spread
    shift = torch.zeros(16)
    shift[3] = 0.5  # a small gap along axis 3
    texts = images + shift
    centre, axes = gap_plane(images, texts)
    image_mean, text_mean = ((v.mean(0) - centre) @ axes for v in (images, texts))
    assert torch.allclose(text_mean - image_mean, torch.tensor([0.5, 0.0]), atol=1e-4)
    assert abs(float(axes[:, 1] @ axes[:, 0])) < 1e-5 and abs(float(axes[0, 1])) > 0.99  # then the spread
