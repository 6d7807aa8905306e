"""Reranking: the embedder checks the decoder's candidates against the input embedding.

Every decoder kind writes N candidates per input with its own search (`Decoder.candidates`: beams or
samples of an LM, a CoCa's beams, MAGIC's beams, the nearest captions of a memory), each with the
decoder's own score. The embedder's text tower embeds them (one batch, unique texts only, at their
real lengths) and scores each by its cosine with the input embedding, as CLIPScore does. The two
scores live on different scales (log-probabilities, MAGIC's mixed scores, cosines), so each is
standardised over an input's candidates before mixing:

    score = weight * z(cosine) + (1 - weight) * z(decoder score)

one weight that means the same for every kind: 1 trusts the embedder alone, 0 the decoder alone
(its own best, as without reranking). The default (generation.RERANK_WEIGHT) was chosen on the
scenes val split (benchmarks/loop_scenes.py records the sweep).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def standardised(scores: torch.Tensor) -> torch.Tensor:
    """(s - mean) / std over the last dimension; a row with no spread gives zeros (it cannot decide)."""
    centred = scores - scores.mean(dim=-1, keepdim=True)
    spread = scores.std(dim=-1, keepdim=True, unbiased=False)
    return torch.where(spread > 1e-6, centred / spread.clamp(min=1e-6), torch.zeros_like(centred))


def embedding_cosines(embedder, texts: list[str], targets: torch.Tensor) -> torch.Tensor:
    """Cosine of each text's embedding with its row of `targets` [len(texts), D]; each distinct text
    is embedded once."""
    unique = list(dict.fromkeys(texts))
    vectors = F.normalize(embedder.embed_texts(unique).float(), dim=-1)
    position = {t: i for i, t in enumerate(unique)}
    index = torch.tensor([position[t] for t in texts], dtype=torch.long)
    return (vectors[index] * F.normalize(targets.float(), dim=-1).to(vectors.device)).sum(-1).cpu()


def rerank(embedder, embedded, candidates: list[list[tuple[str, float]]], weight: float | None = None) -> list[str]:
    """The best caption of each row's candidates (see the module docstring); `weight` None: the default."""
    from unembed.generation import RERANK_WEIGHT

    weight = RERANK_WEIGHT if weight is None else weight
    rows = [dedupe(row) for row in candidates]
    texts = [c for row in rows for c, _ in row]
    targets = embedded.unit().repeat_interleave(torch.tensor([len(r) for r in rows]), dim=0)
    cosines = embedding_cosines(embedder, texts, targets).tolist()
    best, start = [], 0
    for row in rows:
        cos = torch.tensor(cosines[start:start + len(row)])
        own = torch.tensor([s for _, s in row], dtype=torch.float)
        start += len(row)
        total = weight * standardised(cos) + (1 - weight) * standardised(own)
        best.append(row[int(total.argmax())][0])  # ties: the decoder's first (its own best)
    return best


def dedupe(row: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """A row's candidates, each text once with its best score, in the decoder's order (beams often
    differ only in tokens that decode to the same text)."""
    kept: dict[str, float] = {}
    for text, score in row:
        kept[text] = max(score, kept.get(text, float("-inf")))
    return list(kept.items())
