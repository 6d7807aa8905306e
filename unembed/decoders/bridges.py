"""Bridging the modality gap, shared by every text-only decoder.

A decoder trained on TEXT embeddings must decode IMAGE embeddings, which sit elsewhere in the joint
space (Liang et al. 2022). Three composable bridges, each an option of the decoder's config:
- noise (CapDec, Nukrai et al. 2022): train on normalise(t + n), n ~ N(0, variance I), or n uniform
  in a ball of the same root-mean-square norm, so nearby image embeddings decode alike;
- mean shift (the "collapse" of C^3, Zhang et al. 2024): subtract each modality's mean embedding and
  re-normalise, at training (text mean) and at inference (image mean);
- projection (DeCap, Li et al. 2023): replace an image embedding by the softmax(v T^T / tau)-weighted
  mean of a memory T of training text embeddings, so the decoder sees a text-like vector.
Shapes: [N, D] in, [N, D] out, L2-normalised.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from unembed.memory import TextMemory
from unembed.errors import MismatchError


def effective_variance(variance: float, dim: int, reference_dim: int = 0) -> float:
    """CapDec's variance is per dimension, so the same value moves a D-wide unit vector further the
    wider it is (clean-to-noisy cosine ~ 1 / sqrt(1 + D * variance): 0.33 at 512-d with 0.016, 0.44
    at 256-d). With `reference_dim`, the variance is scaled to move vectors as far as it would at
    that width: 512 asks for the paper's effective noise (CLIP ViT-B/32) on any embedder."""
    return variance * reference_dim / dim if reference_dim else variance


def add_noise(vectors: torch.Tensor, variance: float, kind: str, generator: torch.Generator | None,
              reference_dim: int = 0) -> torch.Tensor:
    if variance <= 0:
        return vectors
    vectors = F.normalize(vectors.float(), dim=-1)  # CapDec: normalise, add noise, normalise again
    variance = effective_variance(variance, vectors.shape[1], reference_dim)
    if kind == "gaussian":
        noise = torch.randn(vectors.shape, generator=generator) * variance ** 0.5
    elif kind == "uniform":  # CapDec's own: uniform in the ball of radius sqrt(variance), the gaussian's std
        d = vectors.shape[1]
        direction = F.normalize(torch.randn(vectors.shape, generator=generator), dim=-1)
        radius = torch.rand(vectors.shape[0], 1, generator=generator) ** (1 / d) * variance ** 0.5
        noise = direction * radius
    else:
        raise ValueError(f"unknown noise kind {kind!r} (gaussian | uniform)")
    return F.normalize(vectors + noise.to(vectors.device), dim=-1)


class ModalityBridge(torch.nn.Module):
    """Holds the statistics the bridges need (modality means, projection memory) as buffers, so
    they are saved with the decoder and travel with it."""

    def __init__(self, dim: int, mean_shift: bool = False, projection_size: int = 0, projection_tau: float = 0.01,
                 noise_variance: float = 0.0, noise_kind: str = "gaussian", noise_reference_dim: int = 0):
        super().__init__()
        self.mean_shift, self.projection_tau = mean_shift, projection_tau
        self.noise_variance, self.noise_kind, self.noise_reference_dim = noise_variance, noise_kind, noise_reference_dim
        self.register_buffer("text_mean", torch.zeros(dim))
        self.register_buffer("image_mean", torch.zeros(dim))
        self.memory = TextMemory(projection_size, dim) if projection_size else None

    def fit(self, text_vectors: torch.Tensor, image_vectors: torch.Tensor | None, memory_texts=None,
            memory_vectors: torch.Tensor | None = None) -> None:
        """Estimate the modality means (image vectors need not be paired with the texts) and fill the memory."""
        self.text_mean = text_vectors.float().mean(0)
        if image_vectors is not None:
            self.image_mean = image_vectors.float().mean(0)
        elif self.mean_shift:
            raise MismatchError("mean shift needs the image embeddings' mean: give some images (they need no captions)")
        if self.memory is not None:
            self.memory.fill(memory_texts, self.shift(memory_vectors, self.text_mean))

    def shift(self, vectors: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        if not self.mean_shift:  # as they are: a decoder that feeds raw vectors (ClipCap's release) gets them raw
            return vectors.float()
        return F.normalize(vectors.float() - mean.to(vectors.device), dim=-1)

    def for_training(self, text_vectors: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return add_noise(self.shift(text_vectors, self.text_mean), self.noise_variance, self.noise_kind, generator,
                         self.noise_reference_dim)

    def for_inference(self, vectors: torch.Tensor, modality: str = "image") -> torch.Tensor:
        mean = self.text_mean if modality == "text" else self.image_mean
        vectors = self.shift(vectors, mean)
        if self.memory is not None:
            vectors = self.memory.project(vectors, self.projection_tau)
        return vectors
