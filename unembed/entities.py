"""Entities: what an entity-aware decoder (ViECap) names in its hard prompt.

Everything here works offline from the training captions alone, with no tagger or model to download.

Extraction is a lexicon-light chunker. A caption is split at closed-class words: determiners,
numbers, prepositions, pronouns, conjunctions, forms of "be", position words ("left", "top") and
caption frames ("image", "photo"). What is left are runs of content words. The last word of a run is
its head noun. The word just before the head is its attribute. So "a tiny red circle at the top
left" gives one chunk: head "circle", attribute "red". Plurals fold into a singular head that the
corpus also has ("crosses" -> "cross").

A vocabulary is one of two kinds:
- "nouns" (ViECap's kind): the head nouns seen in at least `min_count` captions.
- "phrases": attribute-noun phrases, including pairs never seen together. An attribute seen with a
  noun n' is allowed with a noun n when n and n' take alike attributes: the Jaccard overlap of their
  attribute sets is at least `similarity`. Colours seen with circles and squares transfer to stars,
  because stars take those colours too. That is how "purple star" enters the vocabulary when the
  training text never said it. A noun with no attributes stays a bare noun.

Captions are read the same way in training and at inference: `caption_entities` gives the
vocabulary entries a caption names, and `detect` ranks the entries for an image by zero-shot
classification.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every no all both either neither another other such
one two three four five six seven eight nine ten many several few more most much lots lot
of in on at to from by with without into onto over under above below beneath beside besides between
among around behind near next across along against through toward towards upon within out off up down
and or but nor so yet
it its it's they them their there here he she his her we our you your i me my
is are was were be been being am has have had do does did can could will would may might shall should
top bottom left right middle center centre side corner front back edge
image picture photo photograph view scene shot close closeup showing shows shown
""".split())
WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "there is a {} in the image.", "a {}.")


@dataclass(frozen=True)
class Chunk:
    noun: str
    attribute: str | None


def chunks(caption: str) -> list[Chunk]:
    """The (head noun, attribute) of each run of content words, in caption order (heads as written)."""
    out, run = [], []
    for word in WORD.findall(caption.lower()) + ["."]:
        if word in FUNCTION_WORDS or word == ".":
            if run:
                out.append(Chunk(run[-1], run[-2] if len(run) > 1 else None))
            run = []
        else:
            run.append(word)
    return out


def _singular(word: str, known: set[str]) -> str:
    for cut in ("es", "s"):
        if word.endswith(cut) and word[:-len(cut)] in known:
            return word[:-len(cut)]
    return word


class EntityVocabulary:
    """The entities a decoder can name, and how to read them from captions."""

    def __init__(self, entries: list[str], kind: str = "nouns"):
        if kind not in ("nouns", "phrases"):
            raise ValueError(f"unknown entity vocabulary kind {kind!r} (nouns | phrases)")
        self.entries, self.kind = list(entries), kind
        self.index = {e: i for i, e in enumerate(self.entries)}
        self.nouns = {e.split()[-1] for e in self.entries}

    @classmethod
    def from_captions(cls, captions: list[str], kind: str = "nouns", min_count: int = 5,
                      similarity: float = 0.5) -> "EntityVocabulary":
        """The vocabulary of a caption corpus (see the module docstring)."""
        seen = [chunks(c) for c in captions]
        heads = {ch.noun for cs in seen for ch in cs}
        singular = {w: _singular(w, heads) for w in heads}
        captions_naming = Counter(n for cs in seen for n in {singular[ch.noun] for ch in cs})  # once per caption
        nouns = {n for n, count in captions_naming.items() if count >= min_count}
        if kind == "nouns":
            return cls(sorted(nouns), kind)
        pairs = Counter((ch.attribute, singular[ch.noun]) for cs in seen for ch in set(cs) if ch.attribute)
        attributes_of: dict[str, set[str]] = {n: set() for n in nouns}
        for (attribute, noun), count in pairs.items():
            if noun in nouns and count >= min_count:
                attributes_of[noun].add(attribute)
        entries = set()
        for noun in nouns:
            own = attributes_of[noun]
            if not own:
                entries.add(noun)
            entries.update(f"{attribute} {noun}" for attribute in own)
            for other in nouns - {noun}:  # attributes of nouns that take alike ones
                theirs = attributes_of[other]
                if own and theirs and len(own & theirs) / len(own | theirs) >= similarity:
                    entries.update(f"{attribute} {noun}" for attribute in theirs)
        return cls(sorted(entries), kind)

    def caption_entities(self, caption: str) -> list[str]:
        """The vocabulary entries a caption names, in caption order, each once."""
        found = []
        for ch in chunks(caption):
            noun = _singular(ch.noun, self.nouns)
            entry = f"{ch.attribute} {noun}" if self.kind == "phrases" and ch.attribute else noun
            if entry not in self.index and self.kind == "phrases":
                entry = noun  # a noun this vocabulary keeps bare
            if entry in self.index and entry not in found:
                found.append(entry)
        return found


def entity_vectors(embedder, entries: list[str], templates=TEMPLATES) -> torch.Tensor:
    """Prompt-ensembled text embeddings of the entries [V, D]: the mean of each entry's templated
    embeddings, normalised (CLIP's zero-shot recipe, which ViECap follows)."""
    texts = [t.format(e) for e in entries for t in templates]
    vectors = F.normalize(embedder.embed_texts(texts).float(), dim=-1).view(len(entries), len(templates), -1)
    return F.normalize(vectors.mean(1), dim=-1)


def entity_counts(vocabulary: EntityVocabulary, captions) -> tuple[list[int], dict[str, list[str]]]:
    """How many of `captions` name each entry (vocabulary order), and each caption's entries (its
    prompt in training, so a caption is read once)."""
    named = {c: vocabulary.caption_entities(c) for c in dict.fromkeys(captions)}
    counts = Counter(e for c in captions for e in named[c])
    return [counts[e] for e in vocabulary.entries], named


def synonym_groups(entry_vectors: torch.Tensor, counts: list[int], threshold: float) -> list[int]:
    """For each entry, the entry that names its group. Entries whose text embeddings have a cosine of at
    least `threshold` with every member of a group join it ("ring" and "hoop", "square" and "box"), taken
    commonest first (the most training captions name it; the first on a tie), so the commonest member
    names the group and no chain of near pairs links two unlike entries. Without groups a detector splits
    one shape's probability between its words, names it twice ("a hoop with a hoop"), or by its rarer
    word, which the references seldom use."""
    vectors = F.normalize(entry_vectors.float(), dim=-1)
    near = (vectors @ vectors.T >= threshold).tolist()
    groups: list[list[int]] = []
    for i in sorted(range(len(vectors)), key=lambda i: (-counts[i], i)):
        joined = next((g for g in groups if all(near[i][j] for j in g)), None)
        if joined is None:
            groups.append([i])
        else:
            joined.append(i)
    name = {i: g[0] for g in groups for i in g}
    return [name[i] for i in range(len(vectors))]


def detect(vectors: torch.Tensor, entries: list[str], entry_vectors: torch.Tensor, top_k: int = 3,
           threshold: float = 0.2, temperature: float = 0.01, groups: list[int] | None = None) -> list[list[str]]:
    """The entities of each embedding [N, D], best first: at most `top_k` entries whose zero-shot
    probability (softmax over the vocabulary of cos / temperature) is at least `threshold`. With
    `groups` (synonym_groups), a group is one entity: its members' probabilities summed, under its name."""
    if not entries:
        return [[] for _ in range(len(vectors))]
    probs = (F.normalize(vectors.float(), dim=-1) @ entry_vectors.float().to(vectors.device).T / temperature).softmax(-1)
    if groups is not None:  # each group's sum at its name's column; -inf elsewhere, under any threshold
        names = torch.tensor(groups, device=probs.device)
        summed = torch.full_like(probs, -math.inf)
        summed[:, names.unique()] = 0.0
        probs = summed.index_add_(1, names, probs)
    top, index = probs.topk(min(top_k, len(entries)), dim=-1)
    return [[entries[i] for p, i in zip(ps.tolist(), ix.tolist()) if p >= threshold] for ps, ix in zip(top, index)]


def detection_scores(detected: list[list[str]], references: list[list[str]], vocabulary: EntityVocabulary,
                     groups: list[int] | None = None) -> dict:
    """Micro precision and recall of detected entities against the entities the reference captions
    name (the union over each image's references); with `groups` (synonym_groups, as the detections
    were made), each reference entity is read as its group's name."""
    name = {e: vocabulary.entries[g] for e, g in zip(vocabulary.entries, groups)} if groups is not None else {}
    hits = found = named = 0
    for predicted, refs in zip(detected, references):
        truth = {name.get(e, e) for ref in refs for e in vocabulary.caption_entities(ref)}
        hits += len(set(predicted) & truth)
        found += len(set(predicted))
        named += len(truth)
    return {"precision": round(hits / found, 4) if found else None, "recall": round(hits / named, 4) if named else None,
            "entities_per_image": round(found / max(1, len(detected)), 2)}
