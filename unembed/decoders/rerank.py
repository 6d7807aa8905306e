"""Reranking: the embedder checks the decoder's candidates against the input embedding.

Every decoder kind writes N candidates per input with its own search (`Decoder.candidates`: beams or
samples of an LM, a CoCa's beams, MAGIC's beams, the nearest captions of a memory), each with the
decoder's own score (a mean token log-probability, for an LM). The embedder's text tower embeds them
(one batch, each distinct text once, at their real lengths) and each gets

    score = decoder score + weight * logit_scale * cosine(caption embedding, input embedding)

logit_scale * cosine is the embedder's own log-odds among the candidates, at the temperature it was
trained with (exp of open_clip's logit_scale; CLIP's is 100): where the embedder cannot tell the
candidates apart, their cosines differ little and the decoder's score decides, so an unsure embedder
is not trusted. weight 0 is the decoder alone (its own best of the N); a large weight the embedder
alone. The default (generation.RERANK_WEIGHT) was chosen on the scenes val split, where standardising
both scores instead (one z-score each) did worse: it amplifies cosine differences the embedder does
not mean (benchmarks/loop_scenes.py records the sweep).

With `stop` (rerank_stop), the candidates are embedded one per round, best first, and a row stops at
the first whose cosine reaches it. A text target's own text has cosine 1, which no caption beats, so
an inverter whose first beam is right spends one embedder call on it and its N on the hard ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_LOGIT_SCALE = 100.0  # CLIP's trained temperature, for embedders that have none


def embedding_cosines(embedder, texts: list[str], targets: torch.Tensor) -> torch.Tensor:
    """Cosine of each text's embedding with its row of `targets` [len(texts), D]; each distinct text
    is embedded once."""
    unique = list(dict.fromkeys(texts))
    vectors = F.normalize(embedder.embed_texts(unique).float(), dim=-1)
    position = {t: i for i, t in enumerate(unique)}
    index = torch.tensor([position[t] for t in texts], dtype=torch.long)
    return (vectors[index] * F.normalize(targets.float(), dim=-1).to(vectors.device)).sum(-1).cpu()


def rerank(embedder, embedded, candidates: list[list[tuple[str, float]]], weight: float | None = None,
           stop: float | None = None) -> list[str]:
    """The best caption of each row's candidates (see the module docstring); `weight` None: the default.
    `stop`: embed in rounds instead (`cosines_until`), and pick among the candidates embedded."""
    rows = [dedupe(row) for row in candidates]
    if stop is not None:
        cosines = cosines_until(embedder, rows, embedded.unit(), stop)
        rows = [row[:len(c)] for row, c in zip(rows, cosines)]
        return pick(rows, [c for row in cosines for c in row], weight, logit_scale(embedder))
    texts = [c for row in rows for c, _ in row]
    targets = embedded.unit().repeat_interleave(torch.tensor([len(r) for r in rows]), dim=0)
    return pick(rows, embedding_cosines(embedder, texts, targets).tolist(), weight, logit_scale(embedder))


def cosines_until(embedder, rows: list[list[tuple[str, float]]], targets: torch.Tensor, stop: float) -> list[list[float]]:
    """Each row's cosines with its target, its candidates embedded one per round in the decoder's
    order until one reaches `stop` (one batch a round over the rows still open). An inversion whose
    first beam is already the target's own text costs one embedder call, not N."""
    cosines: list[list[float]] = [[] for _ in rows]
    for turn in range(max((len(row) for row in rows), default=0)):
        open_rows = [i for i, row in enumerate(rows) if turn < len(row) and not (cosines[i] and max(cosines[i]) >= stop)]
        if not open_rows:
            break
        got = embedding_cosines(embedder, [rows[i][turn][0] for i in open_rows], targets[open_rows])
        for i, cosine in zip(open_rows, got.tolist()):
            cosines[i].append(cosine)
    return cosines


def pick(rows: list[list[tuple[str, float]]], cosines: list[float], weight: float | None = None,
         scale: float = 100.0) -> list[str]:
    """Each row's best candidate, given every candidate's cosine (row-major, as `rows` lists them)."""
    from unembed.generation import RERANK_WEIGHT

    weight = RERANK_WEIGHT if weight is None else weight
    best, start = [], 0
    for row in rows:
        cos = torch.tensor(cosines[start:start + len(row)])
        own = torch.tensor([s for _, s in row], dtype=torch.float)
        start += len(row)
        total = own + weight * scale * cos
        best.append(row[int(total.argmax())][0])  # ties: the decoder's first (its own best)
    return best


def logit_scale(embedder) -> float:
    """The embedder's contrastive temperature: exp(logit_scale) of an open_clip model, else CLIP's 100."""
    scale = getattr(getattr(embedder, "model", None), "logit_scale", None)
    return float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else DEFAULT_LOGIT_SCALE


def dedupe(row: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """A row's candidates, each text once with its best score, in the decoder's order (beams often
    differ only in tokens that decode to the same text)."""
    kept: dict[str, float] = {}
    for text, score in row:
        kept[text] = max(score, kept.get(text, float("-inf")))
    return list(kept.items())
