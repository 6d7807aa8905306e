"""Word edits: the embedder checks one-word rewrites of a caption against the input embedding.

A decoder trained on captions keeps, for each word, its substitutes: the words that stand in the same
places in those captions (colours with colours, shapes with shapes; `substitutes`). After the decoder
writes its caption (`--rerank` or not), each round of edits embeds every caption one word away from
it, that word replaced by one of its substitutes, in one batch (each distinct text once). The closest
to the input replaces the caption when the embedder's log-odds for it (logit scale x cosine) beat the
caption's by more than a margin; a round that changes nothing ends the edits. No training caption
needs to have paired the new word with its neighbours, which is how a pairing the captions never wrote
gets named.

The corrector (unembed/decoders/corrector.py) keeps its candidates by the same rule (`keep_closer`)
after each correction step, then edits as every decoder does.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from unembed.errors import BadInputError, ModelLoadError

SUBSTITUTES = 12      # per word, at most
SHARED_CONTEXTS = 3   # a substitute shares at least this many (left, right) contexts with the word
EDIT_MARGIN = 1.0     # log-odds; the corrector's default margin too (without one, edits hurt: loop_scenes.py)
FILE = "substitutes.json"


def no_substitutes(decoder: str) -> BadInputError:
    """The one-line refusal of `edits` for a decoder without a table."""
    from unembed.decoders import prefix_kinds

    return BadInputError("option edits", f"{decoder} has no word substitutes ({FILE}, which unembed writes when "
                                         f"it trains {', '.join(sorted(prefix_kinds()))} on captions)")


def substitutes(captions: list[str]) -> dict[str, list[str]]:
    """word -> the words that stand in the same places in the captions: those sharing the most (previous
    word, next word) contexts with it, most first (colours with colours, nouns with nouns)."""
    contexts: dict[str, set] = defaultdict(set)
    for caption in captions:
        words = ["<s>"] + caption.lower().split() + ["</s>"]
        for left, word, right in zip(words, words[1:], words[2:]):
            contexts[word].add((left, right))
    by_context: dict[tuple, list[str]] = defaultdict(list)
    for word, seen in contexts.items():
        for context in seen:
            by_context[context].append(word)
    out = {}
    for word, seen in contexts.items():
        shared = Counter(other for context in seen for other in by_context[context] if other != word)
        # Ties go by the word: the sets above iterate in hash order, which changes from one process to
        # the next, and the table must not (training twice on the same captions writes the same file).
        ranked = sorted(shared.items(), key=lambda item: (-item[1], item[0]))
        out[word] = [other for other, n in ranked[:SUBSTITUTES] if n >= SHARED_CONTEXTS]
    return {word: others for word, others in out.items() if others}


def substituted(caption: str, table: dict[str, list[str]]) -> list[str]:
    """Every caption that differs from `caption` in one word, replaced by one of its substitutes."""
    words = caption.split()
    return [" ".join(words[:i] + [other] + words[i + 1:])
            for i, word in enumerate(words) for other in table.get(word.lower(), ())]


def closest(embedder, targets: torch.Tensor, candidates: list[list[str]]):
    """Each row's candidate whose embedding is closest to its target: (texts, cosines, embeddings
    [N, D]); every distinct text is embedded once, in one batch."""
    unique = list(dict.fromkeys(c for row in candidates for c in row))
    vectors = F.normalize(embedder.embed_texts(unique).float(), dim=-1)
    position = {t: i for i, t in enumerate(unique)}
    targets = F.normalize(targets.float(), dim=-1).to(vectors.device)
    best, best_cos, best_vectors = [], [], []
    for row, target in zip(candidates, targets):
        index = torch.tensor([position[c] for c in row])
        cosines = vectors[index] @ target
        pick = int(cosines.argmax())
        best.append(row[pick])
        best_cos.append(float(cosines[pick]))
        best_vectors.append(vectors[index[pick]])
    return best, best_cos, torch.stack(best_vectors) if best_vectors else vectors[:0]


def keep_closer(embedder, live: list[int], new: list[list[str]], targets, best, best_cos, best_vectors,
                threshold: float) -> list[int]:
    """For each live row, its closest new candidate replaces the kept caption (in `best`, `best_cos`,
    `best_vectors`, updated in place) if closer by more than `threshold` (a cosine); returns the rows
    that changed (the others have converged)."""
    rows = [j for j, row in enumerate(new) if row]
    if not rows:
        return []
    found, found_cos, found_vectors = closest(embedder, targets[[live[j] for j in rows]], [new[j] for j in rows])
    changed = []
    for k, j in enumerate(rows):
        i = live[j]
        if found_cos[k] > best_cos[i] + threshold and found[k] != best[i]:
            best[i], best_cos[i], best_vectors[i] = found[k], found_cos[k], found_vectors[k]
            changed.append(i)
    return changed


def edit_rounds(embedder, targets, best, best_cos, best_vectors, table: dict, rounds: int, threshold: float) -> None:
    """`rounds` rounds of edits over the kept captions (updated in place), each over the rows the last
    one changed."""
    live = list(range(len(best)))
    for _ in range(rounds):
        if not live:
            break
        live = keep_closer(embedder, live, [substituted(best[i], table) for i in live], targets, best, best_cos,
                           best_vectors, threshold)


def edited(embedder, targets: torch.Tensor, captions: list[str], table: dict, rounds: int,
           margin: float | None = None) -> list[str]:
    """The captions after `rounds` rounds of edits at `margin` (log-odds; None: EDIT_MARGIN)."""
    from unembed.decoders.rerank import logit_scale

    threshold = (EDIT_MARGIN if margin is None else margin) / logit_scale(embedder)
    best, best_cos, best_vectors = closest(embedder, targets, [[c] for c in captions])
    edit_rounds(embedder, targets, best, best_cos, best_vectors, table, rounds, threshold)
    return best


def read_substitutes(path: Path) -> dict[str, list[str]]:
    """A decoder directory's substitutes.json ({} when it has none); a damaged one is refused in one line."""
    from unembed.errors import BadInputError
    from unembed.io import read_json

    file = Path(path) / FILE
    if not file.is_file():
        return {}
    try:
        table = read_json(file)
    except BadInputError as e:
        raise ModelLoadError(str(e)) from None
    if not (isinstance(table, dict) and all(isinstance(w, list) and all(isinstance(x, str) for x in w)
                                            for w in table.values())):
        raise ModelLoadError(f"{file}: not an object of word -> list of substitute words")
    return table
