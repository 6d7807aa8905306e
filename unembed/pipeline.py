"""The embed-then-decode pipeline over image files: load safely, embed a batch once, decode it.

Bad items never stop a run: each becomes a `BadInputError` reported through `on_error`, and the
rest go on. Results come back batch by batch so callers can stream them to disk.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Iterator, Sequence

from unembed.data.ids import file_id
from unembed.data.images import display_path, expand_inputs, load_image
from unembed.errors import BadInputError


def image_id(path: str, ids=None) -> int | str:
    """The id an image (or an embedding row) gets in results: its file stem spelled exactly, an
    all-digit key included (data/ids.py); with `ids` (the IdIndex of a captions file), the id that
    file gives it, e.g. scenes' 000123.png is image 123 of its captions.json."""
    name = display_path(file_id(path))  # bytes that are not UTF-8 become \xNN, as in "file"
    return name if ids is None else ids.resolve(name)


DTYPES = ("fp32", "bf16", "fp16")


def inference_precision(dtype: str, device):
    """A context in which embedders and decoders compute in `dtype`: torch.autocast, so matrix products
    run in bf16 or fp16 while the weights, softmaxes and norms stay fp32 (works for every decoder kind
    and on CPU too). "fp32" changes nothing."""
    import contextlib

    import torch

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} ({' | '.join(DTYPES)})")
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


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


def caption_images(paths: Sequence[str], decoder, embedder, batch_size: int = 32,
                   on_error: Callable[[BadInputError], None] = lambda e: None, workers: int = 0, ids=None,
                   **generation) -> Iterator[list[dict]]:
    """Yield, per batch, records {file, image_id, caption, decoder, seconds} for image files, folders
    and globs (`ids`: an IdIndex that names the images, see image_id)."""
    files, errors = expand_inputs(paths)
    for e in errors:
        on_error(e)
    for batch_paths, pixels in iter_pixel_batches(files, batch_size, embedder.preprocess, on_error, workers,
                                                  embedder.device):
        t0 = time.perf_counter()
        embedded = embedder.embed_pixels(pixels, [display_path(p) for p in batch_paths], with_tokens=decoder.needs_tokens)
        captions = decoder.decode(embedded, **generation)
        per_item = (time.perf_counter() - t0) / len(batch_paths)
        yield [{"file": display_path(p), "image_id": image_id(p, ids), "caption": c, "decoder": decoder.kind,
                "seconds": round(per_item, 4)} for p, c in zip(batch_paths, captions)]


def caption_embeddings(embedded, decoder, batch_size: int = 256, ids=None, **generation) -> Iterator[list[dict]]:
    """Yield, per batch, records {image_id, caption, decoder, seconds} for precomputed embeddings."""
    batches = ((embedded.select(slice(s, s + batch_size)), None) for s in range(0, len(embedded), batch_size))
    return caption_batches(batches, decoder, ids, **generation)


def caption_batches(batches, decoder, ids=None, **generation) -> Iterator[list[dict]]:
    """Records for (Embedded, per-row metadata or None) batches, e.g. from `data.vectors`; a row's
    metadata (clip-retrieval's key, url, caption...) comes along as "metadata"; `ids` as in image_id."""
    for part, metadata in batches:
        t0 = time.perf_counter()
        captions = decoder.decode(part, **generation)
        per_item = (time.perf_counter() - t0) / len(part)
        records = [{"image_id": image_id(i, ids), "caption": c, "decoder": decoder.kind, "seconds": round(per_item, 4)}
                   for i, c in zip(part.ids, captions)]
        for record, row in zip(records, metadata or ()):
            record["metadata"] = row
        yield records


def caption(images: Sequence[str], decoder, embedder=None, batch_size: int = 32, device: str = "auto",
            **generation) -> list[str]:
    """Library one-liner: captions for image files (a decoder object or a decoder directory).
    Raises on the first bad image, unlike the CLI which reports and goes on."""
    from unembed.decoders import load_decoder, read_decoder_config, resolve_embedder_spec
    from unembed.embedders import load_embedder

    if isinstance(decoder, (str, os.PathLike)):
        if embedder is None:
            embedder = load_embedder(resolve_embedder_spec(read_decoder_config(decoder)["config"], decoder), device)
        decoder = load_decoder(decoder, device=str(embedder.device), embedder=embedder)
    elif embedder is None:
        embedder = load_embedder(decoder.config.embedder_spec, device)

    def fail(e):
        raise e

    return [r["caption"] for batch in caption_images(images, decoder, embedder, batch_size, fail, **generation)
            for r in batch]
