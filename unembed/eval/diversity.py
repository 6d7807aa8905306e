"""Diversity of a decoder's captions: the scores that show a decoder saying the same thing for every
image, which n-gram metrics against references can hide (a fine-tuned CoCa that writes one caption
for all images still earns BLEU on a dataset of similar scenes).

Captions are compared as written, lower-cased with spaces and a final full stop ignored; words are
runs of letters, digits and apostrophes.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

SAME_CAPTION_WARNING = 0.5  # warn when more than this share of the images get one caption
DIVERSITY_COLUMNS = ("unique %", "vocab", "words", "novel %")


def normalise(caption: str) -> str:
    return " ".join(caption.lower().split()).rstrip(" .")


def words(caption: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", caption.lower())


def diversity(captions: Iterable[str], training: Iterable[str] | None = None) -> dict:
    """{unique_share, vocabulary, mean_words, novel_share (None without `training`), top_caption,
    top_share} of N captions; `training`: the captions the decoder was trained on, when known."""
    captions = [normalise(c) for c in captions]
    if not captions:
        return {"unique_share": None, "vocabulary": 0, "mean_words": None, "novel_share": None,
                "top_caption": None, "top_share": None}
    counts = Counter(captions)
    top, top_count = counts.most_common(1)[0]
    seen = None if training is None else {normalise(c) for c in training}
    return {"unique_share": len(counts) / len(captions),
            "vocabulary": len({w for c in counts for w in words(c)}),
            "mean_words": sum(len(words(c)) for c in captions) / len(captions),
            "novel_share": None if seen is None else sum(c not in seen for c in captions) / len(captions),
            "top_caption": top, "top_share": top_count / len(captions)}


def same_caption_warning(name: str, scores: dict) -> str | None:
    """One line when more than half of the images share one caption, else None."""
    share = scores.get("top_share")
    if share is None or share <= SAME_CAPTION_WARNING:
        return None
    return (f"warning: {name} gives {share:.0%} of the images the same caption ({scores['top_caption']!r}): "
            "its scores describe one sentence, not the images")


def diversity_cells(scores: dict | None) -> list[str]:
    """The DIVERSITY_COLUMNS cells of one decoder: shares as %, vocabulary, mean words; n/a when unknown."""
    scores = scores or {}

    def share(key):
        return "n/a" if scores.get(key) is None else f"{100 * scores[key]:.0f}"

    return [share("unique_share"), str(scores.get("vocabulary", "n/a")),
            "n/a" if scores.get("mean_words") is None else f"{scores['mean_words']:.1f}", share("novel_share")]
