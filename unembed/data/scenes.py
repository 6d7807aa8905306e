"""The scenes world: a procedural image-caption dataset, our offline stand-in for COCO.

Each image holds 1-3 coloured shapes on a 3x3 grid (at most one per cell) over a plain or a
noisy grey background. `describe` writes short COCO-like captions from a small grammar, and
`caption_is_true` parses a caption of that grammar and checks every claim against the scene,
so a decoder's output can be scored exactly instead of by n-gram overlap alone.

What the grammar means:
  - "a red circle"            at least one red circle (listed items name different objects)
  - "two red circles"         exactly two; a size or position word narrows what is counted
  - "in the top left corner"  that cell; "at the top" / "on the left" are whole rows / columns
  - "left of" / "right of"    the column is smaller / larger and the rows differ by at most 1
  - "above" / "below"         the row is smaller / larger and the columns differ by at most 1
  - "next to" / "beside"      horizontally or vertically adjacent cells
Captions are lowercase, with commas but no final period.

The (colour, shape) pairs in HELDOUT_PAIRS never occur in train/val/test; every image of the
`compositional` split holds at least one, to test generalisation to unseen combinations.
Every item of a split is seeded from (seed, split, index), so the first k items of a split are
the same whatever n is.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from itertools import permutations
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from unembed.data.captions import indefinite_article
from unembed.errors import BadInputError
from unembed.data.splits import split_file
from unembed.io import write_json, write_text

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "ring")
COLOURS = {  # saturated or extreme, so none can be mistaken for the grey backgrounds
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (245, 215, 40),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (250, 250, 250), "black": (20, 20, 20),
}
SIZES = ("small", "large")
BACKGROUNDS = ("plain", "noisy")
SPLITS = ("train", "val", "test", "compositional")
HELDOUT_PAIRS = frozenset({("purple", "star"), ("orange", "heart")})
CAPTIONS_PER_IMAGE = 5
_TEXT_STREAM = len(SPLITS)  # seeds text_captions apart from every image split

# Rendering: shapes are drawn at SUPERSAMPLE x resolution and box-filtered down (anti-aliasing).
SUPERSAMPLE = 4
SIZE_FRACTION = {"small": 0.48, "large": 0.86}  # diameter as a fraction of the cell side

# ---------------------------------------------------------------------------------------------
# Vocabulary, shared by the caption writer and the parser

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
COLOUR_WORDS = {c: (c,) for c in COLOURS} | {"purple": ("purple", "violet")}
SHAPE_WORDS = {
    "circle": ("circle", "disc"), "square": ("square", "box"), "triangle": ("triangle",),
    "star": ("star",), "cross": ("cross", "plus sign"), "heart": ("heart",),
    "diamond": ("diamond", "rhombus"), "ring": ("ring", "hoop"),
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
BACKGROUND_WORDS = {"plain": ("plain", "flat", "uniform"), "noisy": ("noisy", "grainy", "speckled")}
RELATION_WORDS = {
    "left": ("to the left of", "left of"), "right": ("to the right of", "right of"),
    "above": ("above",), "below": ("below", "under", "beneath"), "next": ("next to", "beside"),
}
# "a blue square with a red circle to its left": the second object stands in the relation
RELATION_ITS_WORDS = {
    "left": ("to its left",), "right": ("to its right",), "above": ("above it",),
    "below": ("below it", "under it"), "next": ("next to it", "beside it"),
}
OPENERS = ("a picture of", "an image of", "an image showing", "a photo of", "there is", "there are")
FRONTED_LINKS = ("there is", "is")  # "in the middle there is ..."


def _position_words() -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Position phrase -> (rows, cols) of the cells it names."""
    every = (0, 1, 2)
    words = {}
    for v, row in (("top", 0), ("bottom", 2)):
        for h, col in (("left", 0), ("right", 2)):
            for form in ("in the {} {} corner", "in the {} {}", "at the {} {}"):
                words[form.format(v, h)] = ((row,), (col,))
        words[f"at the {v}"] = ((row,), every)
    for h, col in (("left", 0), ("right", 2)):
        words[f"on the {h}"] = words[f"on the {h} side"] = (every, (col,))
    for w in ("middle", "center", "centre"):
        words[f"in the {w}"] = ((1,), (1,))
    return words


POSITION_WORDS = _position_words()


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x")) else "s")


RELATIONS = {  # whether "a <relation> b" holds
    "left": lambda a, b: a.col < b.col and abs(a.row - b.row) <= 1,
    "right": lambda a, b: a.col > b.col and abs(a.row - b.row) <= 1,
    "above": lambda a, b: a.row < b.row and abs(a.col - b.col) <= 1,
    "below": lambda a, b: a.row > b.row and abs(a.col - b.col) <= 1,
    "next": lambda a, b: abs(a.row - b.row) + abs(a.col - b.col) == 1,
}

# ---------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    row: int
    col: int

    def __post_init__(self):
        if (self.shape not in SHAPES or self.colour not in COLOURS or self.size not in SIZES
                or self.row not in (0, 1, 2) or self.col not in (0, 1, 2)):
            raise ValueError(f"invalid scene object {self}")


@dataclass
class Scene:
    objects: list[SceneObject]
    background: str

    def __post_init__(self):
        cells = [(o.row, o.col) for o in self.objects]
        if not 1 <= len(cells) <= 3 or len(set(cells)) != len(cells) or self.background not in BACKGROUNDS:
            raise ValueError(f"invalid scene {self}")

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "background": self.background}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls([SceneObject(**o) for o in d["objects"]], d["background"])


def _pick(rng: np.random.Generator, options):
    return options[int(rng.random() * len(options))]  # ~4x faster than rng.integers


def sample_scene(rng: np.random.Generator, *, exclude=frozenset(), require_one_of=frozenset()) -> Scene:
    """A random scene with no (colour, shape) pair from `exclude` and, if `require_one_of` is
    not empty, at least one pair from it."""
    allowed = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in exclude]
    required = sorted(set(require_one_of) - set(exclude))  # sorted: set order is not seeded
    if not allowed or (require_one_of and not required):
        raise ValueError("exclude leaves no (colour, shape) pair to draw")
    n = int(rng.integers(1, 4))
    pairs = [_pick(rng, required) if required else _pick(rng, allowed)]
    for _ in range(n - 1):
        # repeating the first pair now and then gives captions a reason to count ("two red stars")
        pairs.append(pairs[0] if rng.random() < 0.2 else _pick(rng, allowed))
    cells = rng.permutation(9)[:n]
    objects = [SceneObject(shape, colour, _pick(rng, SIZES), int(cell) // 3, int(cell) % 3)
               for (colour, shape), cell in zip(pairs, cells)]
    return Scene(objects, _pick(rng, BACKGROUNDS))

# ---------------------------------------------------------------------------------------------
# Rendering


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float) -> None:
    """Fill `shape` of radius r centred on (x, y) into a mask."""
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    elif shape == "ring":
        draw.ellipse((x - r, y - r, x + r, y + r), outline=255, width=max(1, round(0.34 * r)))
    elif shape == "square":
        s = 0.82 * r  # a full-radius square looks much bigger than the circle beside it
        draw.rectangle((x - s, y - s, x + s, y + s), fill=255)
    elif shape == "triangle":
        y += 0.2 * r  # centre the triangle's bounding box rather than its circumcentre
        draw.polygon([(x + r * math.cos(a), y + r * math.sin(a))
                      for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)], fill=255)
    elif shape == "star":
        radii = [r if i % 2 == 0 else 0.45 * r for i in range(10)]  # outer and inner points
        angles = [-math.pi / 2 + i * math.pi / 5 for i in range(10)]
        draw.polygon([(x + k * math.cos(a), y + k * math.sin(a)) for k, a in zip(radii, angles)], fill=255)
    elif shape == "cross":
        w = 0.3 * r
        draw.rectangle((x - r, y - w, x + r, y + w), fill=255)
        draw.rectangle((x - w, y - r, x + w, y + r), fill=255)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + 0.65 * r, y), (x, y + r), (x - 0.65 * r, y)], fill=255)
    elif shape == "heart":  # two lobes on top of a downward triangle
        for dx in (-0.45 * r, 0.45 * r):
            draw.ellipse((x + dx - 0.5 * r, y - 0.8 * r, x + dx + 0.5 * r, y + 0.2 * r), fill=255)
        draw.polygon([(x - 0.93 * r, y - 0.12 * r), (x + 0.93 * r, y - 0.12 * r), (x, y + 0.9 * r)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _background(kind: str, image_size: int, rng: np.random.Generator) -> Image.Image:
    if kind == "plain":
        return Image.new("RGB", (image_size, image_size), (int(rng.integers(100, 157)),) * 3)
    # grey (not coloured) noise in 96..159, well away from the white and black objects
    noise = np.frombuffer(rng.bytes(image_size * image_size), np.uint8) // 4 + 96
    return Image.fromarray(noise.reshape(image_size, image_size), "L").convert("RGB")


def render(scene: Scene, image_size: int = 64, seed: int = 0) -> Image.Image:
    """Draw `scene` as an RGB image; `seed` picks the background grey, noise and small jitter."""
    rng = np.random.default_rng(seed)
    image = _background(scene.background, image_size, rng)
    cell = image_size / 3
    for obj in scene.objects:
        radius = SIZE_FRACTION[obj.size] * cell / 2
        slack = 0.8 * (cell / 2 - radius)  # jitter that keeps the object inside its cell
        x = (obj.col + 0.5) * cell + slack * (2 * rng.random() - 1)
        y = (obj.row + 0.5) * cell + slack * (2 * rng.random() - 1)
        # the mask covers only the object's bounding box, which keeps rendering cheap
        left, top, side = int(x - radius) - 1, int(y - radius) - 1, math.ceil(2 * radius) + 3
        mask = Image.new("L", (side * SUPERSAMPLE,) * 2, 0)
        _draw_shape(ImageDraw.Draw(mask), obj.shape, (x - left) * SUPERSAMPLE, (y - top) * SUPERSAMPLE,
                    radius * SUPERSAMPLE)
        image.paste(COLOURS[obj.colour], (left, top), mask.reduce(SUPERSAMPLE))
    return image

# ---------------------------------------------------------------------------------------------
# Writing captions
#
# Each caption draws `alt` once: whether shapes and colours go by their second name ("disc",
# "violet"). One choice per caption keeps "a disc next to a circle" from suggesting two shapes.

_CELL_POSITIONS = {(r, c): [p for p, (rows, cols) in POSITION_WORDS.items() if r in rows and c in cols]
                   for r in range(3) for c in range(3)}


def _positions_of(objects: list[SceneObject]) -> list[str]:
    """The position phrases true of every object in `objects`."""
    first, *rest = objects
    return [p for p in _CELL_POSITIONS[first.row, first.col]
            if all(o.row in POSITION_WORDS[p][0] and o.col in POSITION_WORDS[p][1] for o in rest)]


def _noun_phrase(rng, alt: bool, obj: SceneObject, with_size: bool, count: int | None = None) -> str:
    """"a tiny red circle", or with a count "two red circles"."""
    words = [_pick(rng, SIZE_WORDS[obj.size])] if with_size else []
    words.append(COLOUR_WORDS[obj.colour][-1 if alt else 0])
    noun = SHAPE_WORDS[obj.shape][-1 if alt else 0]
    words.append(_plural(noun) if count and count > 1 else noun)
    det = NUMBER_WORDS[count] if count else indefinite_article(words[0])
    return " ".join([det, *words])


def _with_opener(rng, body: str, plural: bool) -> str:
    if rng.random() < 0.5:
        return body
    return f"{_pick(rng, OPENERS[:4] + (('there are',) if plural else ('there is',)))} {body}"


def _list_caption(rng, alt: bool, scene: Scene) -> str:
    """All objects, one phrase per (colour, shape), counted when there are several."""
    groups: dict[tuple[str, str], list[SceneObject]] = {}
    for o in scene.objects:
        groups.setdefault((o.colour, o.shape), []).append(o)
    groups = [list(groups.values())[k] for k in rng.permutation(len(groups))]
    items = []
    for group in groups:
        count = len(group) if len(group) > 1 or rng.random() < 0.05 else None
        same_size = all(o.size == group[0].size for o in group)
        text = _noun_phrase(rng, alt, group[0], same_size and rng.random() < 0.4, count)
        positions = _positions_of(group)
        if positions and rng.random() < 0.3:
            text += " " + _pick(rng, positions)
        items.append(text)
    body = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return _with_opener(rng, body, len(groups[0]) > 1)


def _single_caption(rng, alt: bool, scene: Scene) -> str:
    obj = _pick(rng, scene.objects)
    np_text = _noun_phrase(rng, alt, obj, rng.random() < 0.4)
    position = _pick(rng, _CELL_POSITIONS[obj.row, obj.col])
    roll = rng.random()
    if roll < 0.3:
        return f"{position} {_pick(rng, FRONTED_LINKS)} {np_text}"
    return _with_opener(rng, f"{np_text} {position}" if roll < 0.7 else np_text, False)


def _relation_caption(rng, alt: bool, pairs: list[tuple[SceneObject, SceneObject, str]]) -> str:
    a, b, rel = _pick(rng, pairs)
    np_a = _noun_phrase(rng, alt, a, rng.random() < 0.4)
    np_b = _noun_phrase(rng, alt, b, rng.random() < 0.4)
    if rng.random() < 0.3:
        return _with_opener(rng, f"{np_b} with {np_a} {_pick(rng, RELATION_ITS_WORDS[rel])}", False)
    return _with_opener(rng, f"{np_a} {_pick(rng, RELATION_WORDS[rel])} {np_b}", False)


def _one_caption(rng, scene: Scene, pairs) -> str:
    alt, roll = rng.random() < 0.3, rng.random()
    if pairs and roll < 0.35:
        caption = _relation_caption(rng, alt, pairs)
    elif roll < 0.7:
        caption = _list_caption(rng, alt, scene)
    else:
        caption = _single_caption(rng, alt, scene)
    if rng.random() < 0.25:
        background = _pick(rng, BACKGROUND_WORDS[scene.background])
        caption += f" {_pick(rng, ('on', 'against'))} a {background} background"
    return caption


def describe(scene: Scene, rng: np.random.Generator, n: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """`n` distinct true captions of 5-15 words (repeats only if the grammar runs short)."""
    # relations between two look-alikes ("a red star above a red star") read as nonsense
    pairs = [(a, b, rel) for a, b in permutations(scene.objects, 2) if (a.colour, a.shape) != (b.colour, b.shape)
             for rel, holds in RELATIONS.items() if holds(a, b)]
    captions: list[str] = []
    for _ in range(50 * n):
        caption = _one_caption(rng, scene, pairs)
        if 5 <= len(caption.split()) <= 15 and caption not in captions:
            captions.append(caption)
            if len(captions) == n:
                break
    return captions + [captions[i % len(captions)] for i in range(n - len(captions))]

# ---------------------------------------------------------------------------------------------
# Checking captions: a recursive-descent parser of the grammar, then a check of each claim


@dataclass
class _NounPhrase:
    colour: str
    shape: str
    size: str | None
    count: int | None  # None: "a"/"an" (at least one); a number: exactly that many
    cells: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # (rows, cols) if placed

    def matches(self, o: SceneObject) -> bool:
        return (o.colour == self.colour and o.shape == self.shape and self.size in (None, o.size)
                and (self.cells is None or (o.row in self.cells[0] and o.col in self.cells[1])))


def _table(words: dict) -> dict[tuple[str, ...], str]:
    """{meaning: phrases} -> {phrase as a word tuple: meaning}."""
    return {tuple(p.split()): meaning for meaning, phrases in words.items() for p in phrases}


_SIZES = _table(SIZE_WORDS)
_COLOURS = _table(COLOUR_WORDS)
_NOUNS = {**{k: (s, False) for k, s in _table(SHAPE_WORDS).items()},
          **{tuple(_plural(p).split()): (s, True) for s, ps in SHAPE_WORDS.items() for p in ps}}
_DETERMINERS = {("a",): None, ("an",): None} | {(w,): k for k, w in NUMBER_WORDS.items()}
_RELATIONS = _table(RELATION_WORDS)
_RELATIONS_ITS = _table(RELATION_ITS_WORDS)
_POSITIONS = {tuple(p.split()): cells for p, cells in POSITION_WORDS.items()}
_BACKGROUNDS = {(prep, "a", adj, "background"): kind for kind, adjs in BACKGROUND_WORDS.items()
                for adj in adjs for prep in ("on", "against")}
_OPENERS = {tuple(p.split()): p for p in OPENERS}
_LINKS = {tuple(p.split()): p for p in FRONTED_LINKS}
_MISSING = object()


class _NoParse(Exception):
    pass


class _Parser:
    def __init__(self, caption: str):
        self.words = caption.lower().strip().removesuffix(".").replace(",", " , ").split()
        self.i = 0

    def take(self, table: dict, default=_MISSING):
        """Consume the longest phrase of `table` found here and return its meaning."""
        for n in range(min(5, len(self.words) - self.i), 0, -1):
            key = tuple(self.words[self.i:self.i + n])
            if key in table:
                self.i += n
                return table[key]
        return default

    def skip(self, word: str) -> bool:
        """Consume `word` if it comes next."""
        found = self.words[self.i:self.i + 1] == [word]
        self.i += found
        return found

    def expect(self, table: dict):
        meaning = self.take(table)
        if meaning is _MISSING:
            raise _NoParse
        return meaning

    def noun_phrase(self) -> _NounPhrase:
        count = self.expect(_DETERMINERS)
        size = self.take(_SIZES, None)
        colour = self.expect(_COLOURS)
        shape, plural = self.expect(_NOUNS)
        if plural != (count is not None and count > 1):
            raise _NoParse
        return _NounPhrase(colour, shape, size, count)

    def item_list(self, first: _NounPhrase | None, cells) -> list[_NounPhrase]:
        """Noun phrases joined by commas and "and", each optionally followed by a position."""
        items = []
        while True:
            item = first or self.noun_phrase()
            first = None
            item.cells = cells or self.take(_POSITIONS, None)
            items.append(item)
            comma = self.skip(",")
            if not (self.skip("and") or comma):
                return items

    def caption(self) -> tuple[list[_NounPhrase], tuple | None, str | None]:
        """Returns (listed noun phrases, (a, relation, b) or None, background or None)."""
        items, relation = [], None
        fronted = self.take(_POSITIONS, None)
        if fronted is not None:  # "in the middle there is a red circle"
            self.skip(",")
            self.take(_LINKS, None)
            items = self.item_list(None, fronted)
        else:
            self.take(_OPENERS, None)
            first = self.noun_phrase()
            if (rel := self.take(_RELATIONS, None)) is not None:
                relation = (first, rel, self.noun_phrase())
            elif self.skip("with"):
                second = self.noun_phrase()
                relation = (second, self.expect(_RELATIONS_ITS), first)
            else:
                items = self.item_list(first, None)
        background = self.take(_BACKGROUNDS, None)
        if self.i != len(self.words) or (relation and any((p.count or 1) > 1 for p in relation[::2])):
            raise _NoParse
        return items, relation, background


def named_pairs(caption: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a caption names: a colour word right before a shape word, singular or
    plural, grammatical or not ("two violet stars" names ("purple", "star"))."""
    words = caption.lower().replace(",", " ").replace(".", " ").split()
    colours = {w: c for c, ws in COLOUR_WORDS.items() for w in ws}
    shapes = {tuple(w.split()): s for s, ws in SHAPE_WORDS.items() for w in ws}
    shapes |= {k[:-1] + (_plural(k[-1]),): s for k, s in shapes.items()}
    found = set()
    for i, word in enumerate(words[:-1]):
        if word in colours:
            for n in (1, 2):
                if tuple(words[i + 1:i + 1 + n]) in shapes:
                    found.add((colours[word], shapes[tuple(words[i + 1:i + 1 + n])]))
    return found


def caption_is_true(caption: str, scene: Scene) -> bool:
    """Whether `caption` parses in the scenes grammar and every claim in it holds in `scene`."""
    try:
        items, relation, background = _Parser(caption).caption()
    except _NoParse:
        return False
    objects = scene.objects
    if background is not None and background != scene.background:
        return False
    phrases = items + ([relation[0], relation[2]] if relation else [])
    if any(p.count is not None and sum(map(p.matches, objects)) != p.count for p in phrases):
        return False
    if relation:
        a, rel, b = relation
        return any(a.matches(x) and b.matches(y) and RELATIONS[rel](x, y)
                   for x, y in permutations(objects, 2))
    # objects a counted phrase covers are spoken for; each "a ..." needs an object of its own
    counted = {k for p in items if p.count is not None for k, o in enumerate(objects) if p.matches(o)}
    free = [o for k, o in enumerate(objects) if k not in counted]
    singles = [p for p in items if p.count is None]
    return any(all(map(_NounPhrase.matches, singles, chosen)) for chosen in permutations(free, len(singles)))

# ---------------------------------------------------------------------------------------------
# Splits and files


def generate_split(split: str, n: int, seed: int) -> Iterator[tuple[Scene, list[str], int]]:
    """Yield (scene, captions, render seed) for items 0..n-1 of `split`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    for i in range(n):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        if split == "compositional":
            scene = sample_scene(rng, require_one_of=HELDOUT_PAIRS)
        else:
            scene = sample_scene(rng, exclude=HELDOUT_PAIRS)
        yield scene, describe(scene, rng), int(rng.integers(2**31))


def text_captions(n: int, seed: int, exclude=HELDOUT_PAIRS) -> list[str]:
    """`n` captions of random scenes, for text-only training corpora (no images drawn)."""
    captions = []
    for i in range(n):
        rng = np.random.default_rng([seed, _TEXT_STREAM, i])
        captions += describe(sample_scene(rng, exclude=exclude), rng, n=1)
    return captions


def _write_split(split_dir: Path, split: str, n: int, seed: int, image_size: int, text_only: bool) -> None:
    images, annotations, scene_lines, metadata_lines = [], [], [], []
    if not text_only:
        (split_dir / "images").mkdir(parents=True, exist_ok=True)
    for i, (scene, captions, render_seed) in enumerate(generate_split(split, n, seed)):
        name = f"{i:06d}.png"
        file_name = None if text_only else f"images/{name}"
        image = {"id": i} if text_only else {"id": i, "file_name": file_name}
        images.append(image | {"width": image_size, "height": image_size})
        annotations += [{"id": i * CAPTIONS_PER_IMAGE + j, "image_id": i, "caption": c}
                        for j, c in enumerate(captions)]
        scene_lines.append(json.dumps({"image_id": i, "file_name": file_name, "scene": scene.to_dict()}))
        if not text_only:
            # PNGs are written in place: captions.json, written last, marks a finished split.
            # Level 1 is the fastest zlib level and, on these noisy images, smaller than level 6.
            render(scene, image_size, render_seed).save(split_dir / file_name, format="PNG", compress_level=1)
            metadata_lines.append(json.dumps({"file_name": name, "image_id": i, "captions": captions}))
    write_text(split_dir / "scenes.jsonl", "".join(line + "\n" for line in scene_lines))
    if not text_only:
        write_text(split_dir / "images" / "metadata.jsonl", "".join(line + "\n" for line in metadata_lines))
    info = {"description": "unembed scenes world: procedural shapes with captions",
            "generator": "unembed.data.scenes", "split": split, "seed": seed,
            "image_size": image_size, "text_only": text_only}
    write_json(split_file(split_dir), {"info": info, "images": images, "annotations": annotations})


def write_scenes(out_dir, n: int = 20000, seed: int = 0, n_eval: int | None = None,
                 image_size: int = 64, text_only: bool = False) -> dict[str, int]:
    """Write train (n images) and val/test/compositional (n_eval each) under out_dir/<split>/.

    Returns {split: number of images}."""
    n_eval = max(10, n // 20) if n_eval is None else n_eval
    counts = {split: n if split == "train" else n_eval for split in SPLITS}
    for split, count in counts.items():
        _write_split(Path(out_dir) / split, split, count, seed, image_size, text_only)
    return counts


def load_split(split_dir) -> list[dict]:
    """Read <split_dir>/scenes.jsonl back as [{"image_id", "file_name", "scene": Scene}]."""
    path = Path(split_dir) / "scenes.jsonl"
    if not path.is_file():
        raise BadInputError(path, "no such file")
    records = []
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
            records.append(record | {"scene": Scene.from_dict(record["scene"])})
        except (ValueError, KeyError, TypeError) as e:
            raise BadInputError(path, f"line {k}: not a scene record ({e})") from None
    return records
