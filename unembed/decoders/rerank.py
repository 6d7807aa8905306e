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

With `consensus` (rerank_consensus) c > 0, each candidate also gets c x its expected likeness to the
row's others (minimum Bayes risk, as in MBR decoding for translation and captioning): the others
weighted by the softmax of their scores above, likeness the mean over n = 1 to 4 of the cosine between
two candidates' n-gram counts (CIDEr's similarity without document frequencies). A phrase most
candidates share is one the search is sure of; a word only one candidate has, such as the second
"yellow circle" of "a yellow circle and a yellow circle", is not (benchmarks/repeats_consensus.py). As in
MBR's expectation, the candidate itself is among the others; a caption of fewer than four words, having
no 4-grams, is less alike to itself (0.75 at three words).

With `stop` (rerank_stop) or `calls` (rerank_calls), the candidates are embedded in turns: the
decoder's best first, then each next one chosen by the decoder's score plus `guide` (rerank_guide) x
the logit scale x a cosine predicted from those already embedded. A row stops at the first cosine
that reaches `stop`, or after `calls` candidates. A text target's own text has cosine 1, which no
caption beats, so an inverter whose first beam is right spends one embedder call on it, and a hard
one spends its calls on the beams the cosines seen point to.
"""
from __future__ import annotations

from collections import Counter

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
           stop: float | None = None, calls: int | None = None, guide: float | None = None,
           consensus: float = 0.0) -> list[str]:
    """The best caption of each row's candidates (see the module docstring); `weight` None: the default.
    With `stop` or `calls`, the candidates are embedded in turns (`embed_in_turns`) and the pick is
    made among those embedded."""
    rows = [dedupe(row) for row in candidates]
    scale = logit_scale(embedder)
    if stop is not None or calls is not None:
        from unembed.generation import RERANK_GUIDE

        guide = RERANK_GUIDE if guide is None else guide
        seen = embed_in_turns(embedder, rows, embedded.unit(), stop, calls, guide * scale)
        kept = [[row[j] for j in sorted(cosines)] for row, cosines in zip(rows, seen)]
        return pick(kept, [cosines[j] for cosines in seen for j in sorted(cosines)], weight, scale, consensus)
    return pick(rows, row_cosines(embedder, embedded, rows), weight, scale, consensus)


def row_cosines(embedder, embedded, rows: list[list[tuple[str, float]]]) -> list[float]:
    """Every candidate's cosine with its row's input embedding, row-major as `pick` takes them (one
    batch; each distinct text embedded once)."""
    targets = embedded.unit().repeat_interleave(torch.tensor([len(r) for r in rows]), dim=0)
    return embedding_cosines(embedder, [c for row in rows for c, _ in row], targets).tolist()


def embed_in_turns(embedder, rows: list[list[tuple[str, float]]], targets: torch.Tensor, stop: float | None,
                   calls: int | None, strength: float) -> list[dict[int, float]]:
    """Each row's {candidate index: cosine with its target}: one candidate of each open row embedded per
    turn (one batch; a text already embedded in an earlier turn is not embedded again), the decoder's
    best first, then the one `next_candidate` chooses. A row closes when a cosine reaches `stop` or
    `calls` of its candidates are embedded. For a text target, whose own text has cosine 1, an easy
    input costs one embedder call instead of N."""
    seen: list[dict[int, float]] = [{} for _ in rows]
    shared: list[torch.Tensor | None] = [None] * len(rows)  # built at a row's second turn: most stop at the first
    vectors: dict[str, torch.Tensor] = {}
    targets = F.normalize(targets.float(), dim=-1).cpu()  # the cached vectors are on the CPU
    while True:
        turn = []
        for i, row in enumerate(rows):
            if len(seen[i]) >= min(len(row), calls or len(row)) or (
                    seen[i] and stop is not None and max(seen[i].values()) >= stop):
                continue
            if seen[i] and strength and shared[i] is None:
                shared[i] = shared_grams([text for text, _ in row])
            turn.append((i, next_candidate(row, seen[i], shared[i], strength)))
        if not turn:
            return seen
        new = list(dict.fromkeys(rows[i][j][0] for i, j in turn if rows[i][j][0] not in vectors))
        if new:
            vectors.update(zip(new, F.normalize(embedder.embed_texts(new).float(), dim=-1).cpu()))
        for i, j in turn:
            seen[i][j] = float(vectors[rows[i][j][0]] @ targets[i])


def next_candidate(row: list[tuple[str, float]], seen: dict[int, float], shared: torch.Tensor | None,
                   strength: float) -> int:
    """The candidate to embed next: the decoder's best first; then the highest decoder score plus
    `strength` x the cosine predicted from those embedded (`predicted_cosines`). Candidates differ in a
    few words, and the cosines seen tell which words move the embedding toward the target: a wrong
    relation in the first beams steers the search to a later beam that has another one."""
    rest = [j for j in range(len(row)) if j not in seen]
    if not seen or not strength:
        return rest[0]
    predicted = predicted_cosines(shared, list(seen), list(seen.values()))
    return max(rest, key=lambda j: row[j][1] + strength * float(predicted[j]))  # ties: the decoder's order


RIDGE = 0.1  # the ridge of predicted_cosines: the best of 0.01 to 1 in a trial on the scenes val beams


def word_grams(text: str) -> set[str]:
    words = ["<s>", *text.lower().replace(",", " ,").split(), "</s>"]
    return set(words) | {f"{a} {b}" for a, b in zip(words, words[1:])}


def shared_grams(texts: list[str]) -> torch.Tensor:
    """[n, n]: how many words and word pairs (with start and end marks) each two texts share."""
    grams = [word_grams(t) for t in texts]
    return torch.tensor([[float(len(a & b)) for b in grams] for a in grams], dtype=torch.float64)


def predicted_cosines(shared: torch.Tensor, seen: list[int], cosines: list[float]) -> torch.Tensor:
    """Every candidate's cosine predicted by a ridge regression (ridge RIDGE) of the seen cosines on
    word and word-pair indicators, in its kernel form: the shared-gram counts are the indicators' inner
    products, so no vocabulary is built. The intercept is fixed at the seen cosines' mean (the start
    and end marks, which every text has, act as a nearly free constant besides)."""
    y = torch.tensor(cosines, dtype=torch.float64)
    index = torch.tensor(seen)
    inner = shared[index][:, index] + RIDGE * torch.eye(len(seen), dtype=torch.float64)
    return y.mean() + shared[:, index] @ torch.linalg.solve(inner, y - y.mean())


def pick(rows: list[list[tuple[str, float]]], cosines: list[float], weight: float | None = None,
         scale: float = 100.0, consensus: float = 0.0) -> list[str]:
    """Each row's best candidate, given every candidate's cosine (row-major, as `rows` lists them);
    `consensus` > 0 adds that weight x each candidate's expected likeness to the row's candidates."""
    from unembed.generation import RERANK_WEIGHT

    weight = RERANK_WEIGHT if weight is None else weight
    best, start = [], 0
    for row in rows:
        cos = torch.tensor(cosines[start:start + len(row)])
        own = torch.tensor([s for _, s in row], dtype=torch.float)
        start += len(row)
        total = own + weight * scale * cos
        if consensus and len(row) > 1:
            total = total + consensus * (likeness([text for text, _ in row]) @ total.softmax(0))
        best.append(row[int(total.argmax())][0])  # ties: the decoder's first (its own best)
    return best


CONSENSUS_ORDER = 4  # n-grams of 1 to 4 words, as CIDEr and BLEU-4 count them


def likeness(texts: list[str]) -> torch.Tensor:
    """[n, n]: the mean over n = 1..CONSENSUS_ORDER of the cosine between two texts' n-gram counts."""
    words = [text.lower().split() for text in texts]
    total = torch.zeros(len(texts), len(texts))
    for n in range(1, CONSENSUS_ORDER + 1):
        counts = [Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1)) for w in words]
        grams = {g: k for k, g in enumerate({g for c in counts for g in c})}
        if not grams:
            continue
        matrix = torch.zeros(len(texts), len(grams))
        for row, c in enumerate(counts):
            for g, k in c.items():
                matrix[row, grams[g]] = float(k)
        unit = F.normalize(matrix, dim=-1)  # a text shorter than n words: a zero row, alike to nothing
        total += unit @ unit.T
    return total / CONSENSUS_ORDER


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
