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

import math
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from unembed.errors import BadInputError, ModelLoadError

SUBSTITUTES = 12      # per word, at most
SHARED_CONTEXTS = 3   # a substitute shares at least this many (left, right) contexts with the word
EDIT_MARGIN = 1.0     # log-odds; the corrector's default margin too (without one, edits hurt: loop_scenes.py)
FILE = "substitutes.json"
# A decoder trained with a val split of images chooses its own margin there (one round of edits at each
# of these, `chosen_margin`) and keeps it in MARGIN_FILE: an embedder that is less sure of one-word
# differences needs a larger one (benchmarks/loop_scenes.py --margin-sweep).
MARGIN_GRID = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
OFF = math.inf        # no margin beat the unedited captions on val: edits keep every caption
MARGIN_FILE = "edits.json"


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


def with_earlier(table: dict[str, list[str]], earlier: dict[str, list[str]]) -> dict[str, list[str]]:
    """`table` (from the captions a decoder is trained on now) with what `earlier` (its table from
    earlier training) adds: for each word, its new substitutes first, then its earlier ones, at most
    SUBSTITUTES."""
    merged = {}
    for word in {**earlier, **table}:
        new = table.get(word, [])
        merged[word] = (new + [w for w in earlier.get(word, []) if w not in new])[:SUBSTITUTES]
    return merged


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


def replaces(candidate: str, cosine: float, kept: str, kept_cosine: float, threshold: float) -> bool:
    """The rule of every rewrite: a candidate replaces the kept caption when it is another text and
    closer to the input by more than `threshold` (a cosine: the margin over the logit scale)."""
    return cosine > kept_cosine + threshold and candidate != kept


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
        if replaces(found[k], found_cos[k], best[i], best_cos[i], threshold):
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

    margin = EDIT_MARGIN if margin is None else margin
    if margin == OFF:
        return list(captions)
    threshold = margin / logit_scale(embedder)
    best, best_cos, best_vectors = closest(embedder, targets, [[c] for c in captions])
    edit_rounds(embedder, targets, best, best_cos, best_vectors, table, rounds, threshold)
    return best


def one_round_by_margin(embedder, targets: torch.Tensor, captions: list[str], table: dict,
                        margins) -> dict[float, list[str]]:
    """margin -> the captions after one round of edits at that margin (log-odds), every margin from the
    same embedding pass: the round's candidates do not depend on the margin, only which one is kept."""
    from unembed.decoders.rerank import logit_scale

    best, best_cos, _ = closest(embedder, targets, [[c] for c in captions])
    rows = [i for i, c in enumerate(captions) if substituted(c, table)]
    found, found_cos, _ = (closest(embedder, targets[rows], [substituted(captions[i], table) for i in rows])
                           if rows else ([], [], None))
    scale = logit_scale(embedder)
    out = {}
    for margin in margins:
        edited_captions = list(best)
        for k, i in enumerate(rows):
            if replaces(found[k], found_cos[k], best[i], best_cos[i], margin / scale):
                edited_captions[i] = found[k]
        out[margin] = edited_captions
    return out


def chosen_margin(scores: dict) -> float:
    """The margin (a key of `scores`, OFF included) with the best score (val CIDEr); a tie goes to the
    larger margin, which changes fewer captions."""
    return max(scores, key=lambda margin: (scores[margin], margin))


def margin_record(margin: float, scores: dict) -> dict:
    """What MARGIN_FILE holds: the margin ("off" for OFF) and the val scores it was chosen by."""
    name = lambda m: "off" if m == OFF else m
    return {"margin": name(margin), "chosen_by": "val CIDEr after one round of edits",
            "val_CIDEr": {str(name(m)): round(v, 4) for m, v in scores.items()}}


def margin_of(record: dict | None) -> float | None:
    """The margin a MARGIN_FILE record holds (OFF for "off"; None without a record)."""
    if record is None:
        return None
    return OFF if record["margin"] == "off" else float(record["margin"])


def read_margin_record(path: Path) -> dict | None:
    """A decoder directory's MARGIN_FILE record (None when it has none); a damaged file is refused in
    one line."""
    from unembed.io import read_json

    file = Path(path) / MARGIN_FILE
    if not file.is_file():
        return None
    try:
        record = read_json(file)
    except BadInputError as e:
        raise ModelLoadError(str(e)) from None
    margin = record.get("margin") if isinstance(record, dict) else None
    if margin != "off" and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                            or not 0 <= margin <= 100):
        raise ModelLoadError(f"{file}: its margin must be a number from 0 to 100 or \"off\"")
    return record


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
