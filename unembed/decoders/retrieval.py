"""Retrieval: the nearest-caption baseline.

Decoding returns the caption of a memory whose text embedding is nearest (cosine) to the input
embedding (`unembed.memory.TextMemory`). The papers report it as the floor a generative decoder must beat.

Shapes: memory vectors [M, D] (L2-normalised), input [N, D] -> N captions.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unembed.decoders.base import Decoder, DecoderConfig, register_decoder
from unembed.memory import TextMemory

@dataclass
class RetrievalConfig(DecoderConfig):
    memory_size: int = 0

@register_decoder
class RetrievalDecoder(Decoder):
    kind = "retrieval"
    summary = "the nearest-caption baseline: a memory of caption embeddings"
    config_class = RetrievalConfig
    text_only = True
    candidate_score = "cosine with the input"

    @classmethod
    def example(cls, embedder, captions, workdir) -> "RetrievalDecoder":
        return cls.build(embedder, captions)

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

    def write(self, embedded, **options) -> list[str]:
        _, index = self.memory.nearest(embedded.unit())  # cosine: the nearest caption is the caption
        return [self.memory.texts[i] for i in index.tolist()]

    def candidates(self, embedded, n: int, **options) -> list[list[tuple[str, float]]]:
        """The n nearest captions, scored by their cosine with the input (the memory holds the embedder's
        own caption vectors, so reranking keeps the nearest unless the embedder has changed)."""
        cosines, index = self.memory.top(embedded.unit(), n)
        return [[(self.memory.texts[i], c) for i, c in zip(row, cos)] for row, cos in zip(index.tolist(), cosines.tolist())]

    def save_extra(self, path: Path) -> None:
        self.memory.save_texts(path / "captions.json")

    def load_extra(self, path: Path) -> None:
        self.memory.load_texts(path / "captions.json")
