"""Finding image files on the command line and decoding them safely into RGB.

`expand_inputs` turns the user's arguments (files, folders, glob patterns, brace ranges, and
webdataset tar shards as img2dataset writes them) into a list of paths plus one BadInputError per
argument that yields nothing, so a run can go on without them. A shard's samples are members of
the tar grouped by key (`000123.jpg` beside `000123.txt`, `000123.json`); each image member is a
`ShardMember`, a path-like string SHARD/MEMBER read straight from the tar (never extracted).
`load_image` decodes one file into a fully loaded RGB image, or raises BadInputError with a
short reason. Paths may hold undecodable bytes (surrogateescape); `display_path` makes them
printable, and every error names its file that way.
"""
from __future__ import annotations

import glob
import io
import os
import re
import tarfile
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from unembed.data import MAX_PIXELS
from unembed.errors import BadInputError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"})

# What a broken image file can make Pillow's decoders raise (truncation surfaces as OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError)


def display_path(path: str | os.PathLike) -> str:
    """`path` as a printable str: undecodable bytes become \\xNN instead of crashing print()."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def has_image_extension(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def expand_inputs(paths: Sequence[str]) -> tuple[list[str], list[BadInputError]]:
    """Expand files, folders and glob patterns, in the user's order and without exact repeats.

    Returns the paths found and one error per argument that yielded none.
    """
    found: dict[str, None] = {}  # an ordered set: keeps first appearances in the user's order
    errors: list[BadInputError] = []
    for arg in paths:
        try:
            found.update(dict.fromkeys(_expand_one(arg)))
        except BadInputError as err:
            errors.append(err)
    return list(found), errors


class ShardMember(str):
    """One image inside a webdataset tar shard: reads as "SHARD/MEMBER" (its stem is the sample's
    key, which becomes its image id), and knows where its bytes lie in the tar."""

    def __new__(cls, shard: str, name: str, offset: int, size: int):
        member = super().__new__(cls, f"{shard}/{name}")
        member.shard, member.name, member.offset, member.size = shard, name, offset, size
        return member

    def read_bytes(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


def expand_braces(pattern: str) -> list[str]:
    """webdataset's shard syntax: "shards-{0000..0099}.tar" (zero padding kept) and "{a,b}"."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    ranged = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if ranged:
        lo, hi = ranged.groups()
        choices = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def _shard_members(shard: str) -> list[str]:
    """The image of each sample in a tar shard, in the shard's order."""
    try:
        with tarfile.open(shard, "r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError) as err:
        raise BadInputError(display_path(shard), f"is not a readable tar shard ({err})") from None
    images: dict[str, ShardMember] = {}
    for m in members:
        base = os.path.basename(m.name)
        key = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0])
        if key not in images and has_image_extension(m.name) and not base.startswith("."):
            images[key] = ShardMember(shard, m.name, m.offset_data, m.size)
    if not images:
        raise BadInputError(display_path(shard), "is a tar shard with no images")
    return list(images.values())


def _is_shard(path: str) -> bool:
    return path.endswith(".tar") and os.path.isfile(path)


def _expand_one(arg: str) -> list[str]:
    if isinstance(arg, ShardMember):  # already found in its shard
        return [arg]
    if "{" in arg and not os.path.lexists(arg) and len(expand_braces(arg)) > 1:
        found = []
        for part in expand_braces(arg):
            found += _expand_one(part)
        return found
    if _is_shard(arg):
        return _shard_members(arg)
    if os.path.isdir(arg):  # even when named like an image, e.g. "photo.jpg/"
        images = _walk_images(arg)
        if not images:
            raise BadInputError(display_path(arg), "is a directory with no images")
        return images
    if os.path.lexists(arg):
        # Kept whatever its extension (or a dangling link): the user asked for this file,
        # and load_image will say what is wrong with it. Checked before globbing so that a
        # file literally named "a[1].png" is found.
        return [arg]
    if glob.has_magic(arg):
        return _expand_glob(arg)
    raise BadInputError(display_path(arg), "no such file or directory")


def _expand_glob(pattern: str) -> list[str]:
    matches = sorted(glob.glob(pattern, recursive=True))
    if not matches:
        raise BadInputError(display_path(pattern), "pattern matched no files")
    # A pattern like "data/*" also matches notes and folders: keep images, walk folders.
    images = []
    for path in matches:
        if os.path.isdir(path):
            images += _walk_images(path)
        elif has_image_extension(path):
            images.append(path)
        elif _is_shard(path):
            images += _shard_members(path)
    if not images:
        raise BadInputError(display_path(pattern), "pattern matched no image files")
    return images


def _walk_images(folder: str) -> list[str]:
    """Image files under `folder`, recursively and sorted, skipping hidden files and folders."""
    images = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [name for name in dirs if not name.startswith(".")]  # .git, .thumbnails, ...
        images += [
            os.path.join(root, name)
            for name in files
            if not name.startswith(".") and has_image_extension(name)
        ]
    return sorted(images)


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode `path` into a fully loaded RGB image, upright per its EXIF orientation.

    Transparency is composited over white; animations give their first frame. Images over
    `max_pixels` are refused from their header, before any pixel is decoded.
    """
    name = display_path(path)
    if isinstance(path, ShardMember):
        return load_image_bytes(path.read_bytes(), name, max_pixels)
    try:
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_size == 0:
                raise BadInputError(name, "empty file (0 bytes)")
            return _decode(file, name, max_pixels)
    except OSError as err:  # only open() itself gets here; _decode turns its errors into ours
        raise BadInputError(name, _os_reason(err)) from err


def load_image_bytes(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """`load_image` for bytes already in memory (a shard member, an upload); `name` names it in errors."""
    if not data:
        raise BadInputError(name, "empty file (0 bytes)")
    return _decode(io.BytesIO(data), name, max_pixels)


def _os_reason(err: OSError) -> str:
    if isinstance(err, IsADirectoryError):
        return "is a directory"
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, FileNotFoundError):
        return "no such file or directory"
    return f"cannot read file ({err.strerror or err})"


def _decode(file, name: str, max_pixels: int) -> Image.Image:
    try:
        with Image.open(file) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise BadInputError(name, _too_big(width * height, max_pixels, f"{width}x{height} = "))
            image.load()  # decode now, so truncated data fails here rather than later
            return _to_rgb(ImageOps.exif_transpose(image))
    except UnidentifiedImageError as err:
        raise BadInputError(name, "not an image file (unrecognised format)") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadInputError(name, _pillow_bomb_reason(err, max_pixels)) from err
    except _DECODE_ERRORS as err:
        raise BadInputError(name, "truncated or corrupt image data") from err


def _pillow_bomb_reason(err: Exception, max_pixels: int) -> str:
    # Pillow refuses the largest images inside Image.open, before we can read their size;
    # its message carries the pixel count, which is then all we can report.
    count = re.search(r"\((\d+) pixels\)", str(err))
    if count is None:
        return f"image too large to decode safely ({err})"
    return _too_big(int(count.group(1)), max_pixels)


def _too_big(pixels: int, max_pixels: int, dims: str = "") -> str:
    limit = f"the {_amount(max_pixels, adjective=True)}" if pixels > max_pixels else "Pillow's"
    return f"image is {dims}{_amount(pixels)}, over {limit} limit"


def _amount(pixels: int, adjective: bool = False) -> str:
    """2_500_000_000 -> "2.5 gigapixels" (or "2.5-gigapixel" before a noun)."""
    value, unit = str(pixels), "pixel"
    for scale, name in ((1e9, "gigapixel"), (1e6, "megapixel")):
        if pixels >= scale:
            value, unit = f"{pixels / scale:.3g}", name
            break
    return f"{value}-{unit}" if adjective else f"{value} {unit}s"


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16") or image.mode == "I":
        # Pillow's own conversion clips 16-bit values at 255; scale 0..65535 onto 0..255.
        levels = np.asarray(image).astype(np.float64) / 257
        image = Image.fromarray(np.clip(levels.round(), 0, 255).astype(np.uint8))
    if image.has_transparency_data:
        # Over black, transparent areas (often undefined colour) turn into dark blotches.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return image.convert("RGB")


class ImageFiles:
    """A torch map-style dataset of image files: item i is (i, pixels) after the embedder's
    preprocessing, or (i, (file, reason)) for a file that cannot be used. The error travels as plain
    strings, which pickle across worker processes where an exception might not."""

    def __init__(self, files: Sequence[str], preprocess):
        self.files, self.preprocess = list(files), preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return i, self.preprocess(load_image(self.files[i]))
        except BadInputError as e:
            return i, (e.item, e.reason)


def _as_list(items):
    return items


def iter_pixel_batches(files: Sequence[str], batch_size: int, preprocess,
                       on_error: Callable[[BadInputError], None] | None = None, workers: int = 0,
                       device=None) -> Iterator[tuple[list[str], "torch.Tensor"]]:
    """(files, pixels [B, 3, H, W]) batch by batch, in input order, bad files reported to `on_error`
    and left out (no `on_error`: the first bad file raises, for inputs that must all load).
    With `workers` > 0, decoding and preprocessing run in that many processes (a DataLoader), ahead of
    the model; on CUDA the pixels come pinned and are copied without blocking."""
    import torch

    cuda = device is not None and torch.device(device).type == "cuda"
    # Its own generator: a DataLoader otherwise draws its workers' seed from the global RNG, and an
    # embedding pass must not change what a training run draws after it (cached or not).
    loader = torch.utils.data.DataLoader(ImageFiles(files, preprocess), batch_size=batch_size, num_workers=workers,
                                         collate_fn=_as_list, generator=torch.Generator())
    for items in loader:
        good = []
        for i, result in items:
            if isinstance(result, tuple):
                if on_error is None:
                    raise BadInputError(*result)
                on_error(BadInputError(*result))
            else:
                good.append((i, result))
        if good:
            pixels = torch.stack([px for _, px in good])
            if cuda:
                pixels = pixels.pin_memory().to(device, non_blocking=True)
            yield [files[i] for i, _ in good], pixels
