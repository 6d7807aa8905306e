"""Image ids: what an image is called in captions and results, and how that name finds its references.

An image file or an embedding row is named by its key spelled exactly as given (a file stem, a
webdataset key): img2dataset's all-digit key "000000030" stays "000000030", never image 30. Names
meet a COCO captions file's integer ids only through that file: its images[].file_name (a raw COCO
file name "COCO_val2014_000000391895.jpg", its stem, or the path as written) or the id itself
written as text ("391895", as a split's embeddings carry it). One `IdIndex` does that for
`unembed caption --refs`, `eval` and `compare`.
"""
from __future__ import annotations

from pathlib import PurePosixPath

from unembed.errors import BadInputError
from unembed.io import read_json


def file_id(name: str) -> str:
    """The id of an image file or a keyed row: its stem, spelled exactly."""
    return PurePosixPath(str(name)).stem


class IdIndex:
    """A COCO captions file's image ids by every name a prediction may give them. A name two images
    share (the same stem in two folders) names neither, so it never picks the wrong references."""

    def __init__(self, images: list):
        images = [im for im in images if isinstance(im, dict) and isinstance(im.get("id"), (int, str))]
        self.ids = {im["id"] for im in images}
        self.by_file = _unique((name, im["id"]) for im in images for name in _file_names(im.get("file_name")))
        self.by_text = _unique((str(im["id"]), im["id"]) for im in images)

    @classmethod
    def from_file(cls, captions_file) -> "IdIndex":
        coco = read_json(captions_file)
        if not isinstance(coco, dict):
            raise BadInputError(captions_file, "expected a COCO captions file (an object with images[])")
        # the annotations' ids too: a refs file may list no images[], and "12" should still find image 12
        annotated = [{"id": a.get("image_id")} for a in coco.get("annotations") or [] if isinstance(a, dict)]
        return cls([*(coco.get("images") or []), *annotated])

    def resolve(self, name):
        """The captions file's id for `name`: itself when it is one, else through a file name, else
        through the id's text; a name that matches nothing is returned unchanged."""
        if name in self.ids and not isinstance(name, bool):
            return name
        text = str(name)
        return self.by_file.get(text, self.by_text.get(text, name))

    def rename(self, predictions: dict, where) -> dict:
        """{id: caption} with every name resolved; two names of one image are refused, naming both."""
        renamed, seen = {}, {}
        for name, caption in predictions.items():
            image = self.resolve(name)
            if image in renamed:
                raise BadInputError(where, f"predictions {seen[image]!r} and {name!r} both name image {image!r}")
            renamed[image], seen[image] = caption, name
        return renamed


def coverage(predictions: dict, references: dict) -> tuple[int, list, list]:
    """(how many predictions have references, the predicted ids without references, the referenced
    ids without a prediction)."""
    unreferenced = [i for i in predictions if i not in references]
    unpredicted = [i for i in references if i not in predictions]
    return len(predictions) - len(unreferenced), unreferenced, unpredicted


def _file_names(file_name) -> list[str]:
    """The names a file_name answers to: as written, its base name, and its stem."""
    if not isinstance(file_name, str) or not file_name:
        return []
    path = PurePosixPath(file_name.replace("\\", "/"))
    return list(dict.fromkeys([file_name, path.name, path.stem]))


def _unique(pairs) -> dict:
    found: dict = {}
    for name, image in pairs:
        found.setdefault(name, set()).add(image)
    return {name: images.pop() for name, images in found.items() if len(images) == 1}
