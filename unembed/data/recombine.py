"""Recombined captions: text-only training captions in which the words of a class (colours, say) trade
places, so a decoder that never read "a purple star" writes it when the embedding says so.

A text-only decoder learns (text embedding -> caption) from captions alone, so its language model also
learns the corpus's co-occurrences: a colour never written before a shape is a pairing it will not
write, whatever the image's embedding says. A recombined copy of a caption has every word of a class
replaced by a member drawn uniformly from that class, and it is embedded like any caption, so the
(embedding, caption) pair stays true to the embedder: the decoder must read the colour from the
embedding, not from the words around it. This is compositional data augmentation (GECA, Andreas 2020)
for the text side of a joint space; it costs nothing at inference.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

from unembed.data.captions import indefinite_article
from unembed.errors import BadInputError
from unembed.io import read_json

# Word classes by name; a class keeps only the members the training captions use, so a copy never
# brings in a word the decoder's tokenizer or the embedder has not seen.
BUILTIN_CLASSES = {
    "colours": ("red", "orange", "yellow", "green", "blue", "purple", "violet", "pink", "brown", "black", "white",
                "grey", "gray"),
}
BUILTIN_CLASSES["colors"] = BUILTIN_CLASSES["colours"]
PUNCTUATION = ",.;:!?"
MAX_RATE = 100  # copies per caption: more would only repeat the same draws, at a memory cost


def word_classes(spec: str) -> list[tuple[str, ...]]:
    """The classes a `recombine` spec names: inline JSON, or comma-separated builtin names (colours) and
    JSON files; the JSON is a list of classes (lists of words) or an object of them."""
    if spec.strip()[:1] in ("[", "{"):
        try:
            return _classes(json.loads(spec), "--recombine")
        except ValueError as e:
            raise BadInputError("--recombine", f"is not JSON ({e})") from None
    classes = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item in BUILTIN_CLASSES:
            classes.append(BUILTIN_CLASSES[item])
            continue
        path = Path(item)
        if not path.is_file():
            raise BadInputError(item, f"is neither a word class ({', '.join(sorted(BUILTIN_CLASSES))}) nor a JSON file")
        classes += _classes(read_json(path), path)
    return classes


def _classes(data, where) -> list[tuple[str, ...]]:
    groups = list(data.values()) if isinstance(data, dict) else data
    if not isinstance(groups, list) or not groups or not all(
            isinstance(g, list) and g and all(isinstance(w, str) and w.strip() for w in g) for g in groups):
        raise BadInputError(where, "must hold word classes: a list (or an object) of lists of words")
    spaced = next((w for g in groups for w in g if len(w.split()) > 1), None)
    if spaced is not None:  # captions are matched word by word
        raise BadInputError(where, f"has {spaced!r}: a class member must be one word")
    return [tuple(w.strip().lower() for w in g) for g in groups]


def inline_classes(classes: list[tuple[str, ...]]) -> str:
    """Word classes as the inline JSON a spec may be: what a decoder's config keeps (no file of this
    machine), and what training reads once the CLI has read a file."""
    return json.dumps([list(c) for c in classes])


def check_recombine(spec: str, rate: float | None) -> list[tuple[str, ...]]:
    """The word classes of a `recombine` spec, refused in one line when they or the rate cannot work:
    checked before any model loads."""
    if rate is not None and not spec:
        raise BadInputError("--recombine-rate", "needs --recombine (the word classes to recombine)")
    if rate is not None and not (math.isfinite(rate) and 0 < rate <= MAX_RATE):
        raise BadInputError("--recombine-rate", f"must be above 0 and at most {MAX_RATE:g} (got {rate:g})")
    classes = word_classes(spec)
    if not classes:
        raise BadInputError("--recombine", f"names no word class ({spec!r})")
    return classes


def recombined(captions: list[str], classes: list[tuple[str, ...]], rate: float, seed: int) -> list[str]:
    """New captions: for each caption with a class word, `rate` copies on average (its whole part for
    every caption, its fraction as a chance of one more), each class word replaced by a member of its
    class drawn uniformly among those the captions use, itself included ("a"/"an" before it made to fit
    by the new word's first letter). A word matches whole, in any case, less trailing punctuation."""
    used = {w.strip(PUNCTUATION).lower() for c in captions for w in c.split()}
    members = [tuple(w for w in dict.fromkeys(c) if w in used) for c in classes]
    class_of = {}
    for m in (m for m in members if len(m) > 1):
        for w in m:
            class_of.setdefault(w, m)  # the first class a word is in wins
    if not class_of:
        raise BadInputError("--recombine", "no word class has two members in the training captions "
                            f"({', '.join(sorted({w for c in classes for w in c})[:8])}...): nothing to recombine")
    rng = random.Random(seed)
    whole, fraction = math.floor(rate), rate - math.floor(rate)
    out = []
    for caption in captions:
        words = caption.split()
        if not any(w.strip(PUNCTUATION).lower() in class_of for w in words):
            continue
        for _ in range(whole + (rng.random() < fraction)):
            out.append(_recombine(words, class_of, rng))
    return out


def _recombine(words: list[str], class_of: dict[str, tuple[str, ...]], rng: random.Random) -> str:
    out = []
    for word in words:
        core = word.strip(PUNCTUATION)
        key = core.lower()
        if key in class_of:
            new = class_of[key][int(rng.random() * len(class_of[key]))]
            new = new.capitalize() if core[:1].isupper() else new
            word = word.replace(core, new, 1)
            if out and out[-1].lower() in ("a", "an"):
                article = indefinite_article(new)
                out[-1] = article.capitalize() if out[-1][0].isupper() else article
        out.append(word)
    return " ".join(out)
