"""Retrieval: the nearest-caption baseline.

Decoding returns the caption of a memory whose text embedding is nearest (cosine) to the input
embedding. The papers report it as the floor a generative decoder must beat, and `TextMemory` is
also the memory that DeCap projects image embeddings onto.

Shapes: memory vectors [M, D] (L2-normalised), input [N, D] -> N captions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from unembed.decoders.base import Decoder, DecoderConfig, register_decoder
from unembed.errors import ModelLoadError
from unembed.io import write_json


class TextMemory(torch.nn.Module):
    """Caption texts with their embeddings, searched in chunks so N x M never sits in memory at once."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("vectors", torch.zeros(size, dim))
        self.texts: list[str] = []

    def fill(self, texts: list[str], vectors: torch.Tensor) -> None:
        self.texts = list(texts)
        self.vectors = torch.nn.functional.normalize(vectors.float(), dim=-1).to(self.vectors.device)

    @torch.no_grad()
    def nearest(self, queries: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """(cosine, index) of each query's nearest memory entry."""
        queries = torch.nn.functional.normalize(queries.float().to(self.vectors.device), dim=-1)
        best = [(queries[i:i + chunk] @ self.vectors.T).max(dim=1) for i in range(0, len(queries), chunk)]
        return torch.cat([b.values for b in best]), torch.cat([b.indices for b in best])

    @torch.no_grad()
    def project(self, queries: torch.Tensor, tau: float) -> torch.Tensor:
        """DeCap's training-free projection: normalise(softmax(q . T^T / tau) . T), [N, D] -> [N, D]."""
        queries = torch.nn.functional.normalize(queries.float().to(self.vectors.device), dim=-1)
        weights = torch.softmax(queries @ self.vectors.T / tau, dim=-1)
        return torch.nn.functional.normalize(weights @ self.vectors, dim=-1)

    def save_texts(self, path: Path) -> None:
        write_json(path, self.texts)

    def load_texts(self, path: Path) -> None:
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing: the caption memory's texts")
        self.texts = json.loads(path.read_text(encoding="utf-8"))
        if len(self.texts) != len(self.vectors):
            raise ModelLoadError(f"{path} holds {len(self.texts)} captions but the memory has {len(self.vectors)} vectors")


@dataclass
class RetrievalConfig(DecoderConfig):
    memory_size: int = 0


@register_decoder
class RetrievalDecoder(Decoder):
    kind = "retrieval"
    config_class = RetrievalConfig
    trainable_from_text = True

    def __init__(self, config: RetrievalConfig):
        super().__init__(config)
        self.memory = TextMemory(config.memory_size, config.embed_dim)

    @classmethod
    def build(cls, embedder, captions: list[str], batch_size: int = 256, max_captions: int = 0) -> "RetrievalDecoder":
        """Embed a caption corpus (deduplicated, order kept; the first `max_captions` when > 0, for a
        smaller memory) into a new decoder's memory."""
        captions = list(dict.fromkeys(captions))[:max_captions or None]
        vectors = embedder.embed_texts(captions, batch_size=batch_size)
        decoder = cls(RetrievalConfig(embedder.spec, embedder.id, vectors.shape[1], len(captions)))
        decoder.memory.fill(captions, vectors)
        return decoder

    def decode(self, embedded, **generation) -> list[str]:
        self.check_embedded(embedded)
        _, index = self.memory.nearest(embedded.vectors)
        return [self.memory.texts[i] for i in index.tolist()]

    def save_extra(self, path: Path) -> None:
        self.memory.save_texts(path / "captions.json")

    def load_extra(self, path: Path) -> None:
        self.memory.load_texts(path / "captions.json")
