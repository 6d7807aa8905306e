"""A memory of caption texts with their L2-normalised embeddings: searched by the retrieval decoder,
projected onto by DeCap's bridge, and matched against by entity detection.

Shapes: memory vectors [M, D]; queries [N, D].
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from unembed.errors import ModelLoadError
from unembed.io import write_json

PROJECTION_BUDGET = 1 << 24  # similarity entries held at once by a projection (64 MB of fp32)


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
        values, indices = self.top(queries, 1, chunk)
        return values[:, 0], indices[:, 0]

    @torch.no_grad()
    def top(self, queries: torch.Tensor, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """(cosines, indices) [N, k] of each query's k nearest memory entries, nearest first."""
        queries = torch.nn.functional.normalize(queries.float().to(self.vectors.device), dim=-1)
        k = min(k, len(self.vectors))
        best = [(queries[i:i + chunk] @ self.vectors.T).topk(k, dim=1) for i in range(0, len(queries), chunk)]
        if not best:
            return queries.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long)
        return torch.cat([b.values for b in best]), torch.cat([b.indices for b in best])

    @torch.no_grad()
    def project(self, queries: torch.Tensor, tau: float, budget: int = PROJECTION_BUDGET) -> torch.Tensor:
        """DeCap's training-free projection: normalise(softmax(q . T^T / tau) . T), [N, D] -> [N, D].
        Queries go in chunks of `budget` // M rows, so the weights held at once are O(chunk x M), never
        N x M; each row's result is computed exactly as unchunked."""
        queries = torch.nn.functional.normalize(queries.float().to(self.vectors.device), dim=-1)
        chunk = max(1, budget // max(1, len(self.vectors)))
        parts = [torch.softmax(queries[i:i + chunk] @ self.vectors.T / tau, dim=-1) @ self.vectors
                 for i in range(0, len(queries), chunk)]
        return torch.nn.functional.normalize(torch.cat(parts) if parts else queries, dim=-1)

    def save_texts(self, path: Path) -> None:
        write_json(path, self.texts)

    def load_texts(self, path: Path) -> None:
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing: the caption memory's texts")
        self.texts = json.loads(path.read_text(encoding="utf-8"))
        if len(self.texts) != len(self.vectors):
            raise ModelLoadError(f"{path} holds {len(self.texts)} captions but the memory has {len(self.vectors)} vectors")
