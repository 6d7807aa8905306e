"""unembed.decoders.bridges checked value by value (written against the mutants `make mutation` found
surviving the rest of the suite): CapDec's noise drawn exactly as defined (gaussian and uniform-in-a-ball,
with the reference-width scaling), the bridge's defaults and buffers, fitting, the mean shift, and the
DeCap projection at inference. Fast: no shared fixture, 8-d vectors."""
import pytest
import torch
import torch.nn.functional as F

from unembed.decoders.bridges import ModalityBridge, add_noise, effective_variance
from unembed.errors import MismatchError

D = 8


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def gen(seed=7):
    return torch.Generator().manual_seed(seed)


def expected_gaussian(vectors, variance, seed=7):
    base = F.normalize(vectors.float(), dim=-1)
    return F.normalize(base + torch.randn(base.shape, generator=gen(seed)) * variance ** 0.5, dim=-1)


def expected_uniform(vectors, variance, seed=7):
    base = F.normalize(vectors.float(), dim=-1)
    g = gen(seed)
    direction = F.normalize(torch.randn(base.shape, generator=g), dim=-1)
    radius = torch.rand(base.shape[0], 1, generator=g) ** (1 / base.shape[1]) * variance ** 0.5
    return F.normalize(base + direction * radius, dim=-1)


def test_effective_variance_scales_to_the_reference_width():
    assert effective_variance(0.016, 256, 512) == pytest.approx(0.032)
    assert effective_variance(0.016, 1024, 512) == pytest.approx(0.008)
    assert effective_variance(0.016, 256) == 0.016  # no reference: per dimension, as given
    assert effective_variance(0.016, 256, 0) == 0.016


def test_no_noise_returns_the_vectors_untouched():
    raw = torch.randn(3, D, dtype=torch.float64) * 5  # not unit length, not float32
    assert add_noise(raw, 0.0, "gaussian", gen()) is raw
    assert add_noise(raw, -1.0, "nonsense", gen()) is raw


def test_gaussian_noise_is_normalise_add_normalise():
    raw = torch.randn(4, D, generator=gen(1)) * 3
    out = add_noise(raw, 0.05, "gaussian", gen())
    assert torch.allclose(out, expected_gaussian(raw, 0.05), atol=1e-6)
    assert torch.allclose(out.norm(dim=-1), torch.ones(4), atol=1e-6)


def test_gaussian_noise_with_a_reference_width():
    raw = unit(4, D)
    out = add_noise(raw, 0.05, "gaussian", gen(), reference_dim=32)
    assert torch.allclose(out, expected_gaussian(raw, 0.05 * 32 / D), atol=1e-6)


def test_uniform_noise_is_a_point_in_the_ball_of_radius_sqrt_variance():
    raw = torch.randn(5, D, generator=gen(2)) * 2
    out = add_noise(raw, 0.2, "uniform", gen())
    assert torch.allclose(out, expected_uniform(raw, 0.2), atol=1e-6)
    scaled = add_noise(raw, 0.2, "uniform", gen(), reference_dim=2 * D)
    assert torch.allclose(scaled, expected_uniform(raw, 0.4), atol=1e-6)


def test_unknown_noise_kind_is_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown noise kind 'pink' \(gaussian \| uniform\)"):
        add_noise(unit(2, D), 0.1, "pink", gen())


def test_bridge_defaults_and_buffers():
    bridge = ModalityBridge(D)
    assert (bridge.mean_shift, bridge.projection_tau, bridge.noise_variance, bridge.noise_kind,
            bridge.noise_reference_dim, bridge.memory) == (False, 0.01, 0.0, "gaussian", 0, None)
    assert sorted(bridge.state_dict()) == ["image_mean", "text_mean"]
    assert torch.equal(bridge.text_mean, torch.zeros(D)) and torch.equal(bridge.image_mean, torch.zeros(D))
    full = ModalityBridge(D, mean_shift=True, projection_size=3, projection_tau=0.5, noise_variance=0.1,
                          noise_kind="uniform", noise_reference_dim=512)
    assert (full.mean_shift, full.projection_tau, full.noise_variance, full.noise_kind,
            full.noise_reference_dim) == (True, 0.5, 0.1, "uniform", 512)
    assert full.memory.vectors.shape == (3, D) and sorted(full.state_dict()) == ["image_mean", "memory.vectors",
                                                                                 "text_mean"]


def test_fit_takes_each_modalitys_mean_and_fills_the_memory_with_shifted_vectors():
    text, image = unit(6, D, seed=3), unit(4, D, seed=4) + 1.0
    bridge = ModalityBridge(D, mean_shift=True, projection_size=3)
    bridge.fit(text.double(), image, ["a", "b", "c"], text[:3])
    assert bridge.text_mean.dtype == torch.float32 and torch.allclose(bridge.text_mean, text.mean(0))
    assert torch.allclose(bridge.image_mean, image.mean(0))
    assert bridge.memory.texts == ["a", "b", "c"]
    assert torch.allclose(bridge.memory.vectors, F.normalize(text[:3] - text.mean(0), dim=-1), atol=1e-6)


def test_fit_without_images_keeps_the_image_mean_unless_the_shift_needs_it():
    text = unit(6, D, seed=3)
    plain = ModalityBridge(D, projection_size=2)
    plain.fit(text, None, ["a", "b"], text[:2] * 3)
    assert torch.equal(plain.image_mean, torch.zeros(D))
    assert torch.allclose(plain.memory.vectors, text[:2], atol=1e-6)  # no shift: only normalised
    with pytest.raises(MismatchError, match=r"^mean shift needs the image embeddings' mean: give some images "
                                            r"\(they need no captions\)$"):
        ModalityBridge(D, mean_shift=True).fit(text, None)


def test_shift_is_the_identity_without_mean_shift_and_recentres_with_it():
    raw = torch.randn(3, D, dtype=torch.float64) * 4
    mean = torch.randn(D)
    same = ModalityBridge(D).shift(raw, mean)
    assert same.dtype == torch.float32 and torch.allclose(same, raw.float())
    shifted = ModalityBridge(D, mean_shift=True).shift(raw, mean)
    assert torch.allclose(shifted, F.normalize(raw.float() - mean, dim=-1), atol=1e-6)


def test_for_training_shifts_by_the_text_mean_then_adds_the_configured_noise():
    text = unit(5, D, seed=5)
    bridge = ModalityBridge(D, mean_shift=True, noise_variance=0.03, noise_kind="uniform", noise_reference_dim=4 * D)
    bridge.fit(text, unit(3, D, seed=6))
    shifted = F.normalize(text - text.mean(0), dim=-1)
    assert torch.allclose(bridge.for_training(text, gen()), expected_uniform(shifted, 0.12), atol=1e-6)
    gaussian = ModalityBridge(D, noise_variance=0.03)
    gaussian.fit(text, None)
    assert torch.allclose(gaussian.for_training(text, gen()), expected_gaussian(text, 0.03), atol=1e-6)


def test_for_inference_shifts_by_the_modalitys_own_mean():
    text, image = unit(5, D, seed=5), unit(5, D, seed=6) + 0.5
    bridge = ModalityBridge(D, mean_shift=True)
    bridge.fit(text, image)
    queries = unit(2, D, seed=8)
    assert torch.allclose(bridge.for_inference(queries), F.normalize(queries - image.mean(0), dim=-1), atol=1e-6)
    assert torch.allclose(bridge.for_inference(queries, "image"), bridge.for_inference(queries), atol=1e-6)
    assert torch.allclose(bridge.for_inference(queries, "text"), F.normalize(queries - text.mean(0), dim=-1),
                          atol=1e-6)


def test_for_inference_projects_onto_the_memory_at_its_temperature():
    text = unit(6, D, seed=9)
    bridge = ModalityBridge(D, projection_size=6, projection_tau=0.5)
    bridge.fit(text, None, [str(i) for i in range(6)], text)
    queries = unit(3, D, seed=10)
    weights = torch.softmax(queries @ text.T / 0.5, dim=-1)
    assert torch.allclose(bridge.for_inference(queries), F.normalize(weights @ text, dim=-1), atol=1e-5)


def test_noise_and_means_move_to_the_vectors_device():
    # Vectors on an accelerator meet noise drawn from a CPU generator and means kept where the bridge
    # lives: both must move to the vectors ("meta" stands in for an accelerator on a CPU-only machine).
    meta = torch.ones(3, D, device="meta")
    assert add_noise(meta, 0.1, "gaussian", gen()).device.type == "meta"
    assert add_noise(meta, 0.1, "uniform", gen()).device.type == "meta"
    bridge = ModalityBridge(D, mean_shift=True)
    bridge.fit(unit(4, D), unit(4, D, seed=1))
    assert bridge.for_inference(meta).device.type == "meta" and bridge.for_inference(meta).shape == (3, D)
