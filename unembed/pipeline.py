"""The embed-then-decode pipeline over image files: load safely, embed a batch once, decode it.

Bad items never stop a run: each becomes a `BadInputError` reported through `on_error`, and the
rest go on. Results come back batch by batch so callers can stream them to disk.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from unembed.data.ids import file_id
from unembed.data.images import display_path, expand_inputs, iter_pixel_batches
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


def caption_images(paths: Sequence[str], decoder, embedder, batch_size: int = 32,
                   on_error: Callable[[BadInputError], None] = lambda e: None, workers: int = 0, ids=None,
                   **generation) -> Iterator[list[dict]]:
    """Yield, per batch, records {file, image_id, caption, decoder, batch_seconds, batch_size} (the time
    and size of the batch the item was embedded and decoded in) for image files, folders
    and globs (`ids`: an IdIndex that names the images, see image_id)."""
    files, errors = expand_inputs(paths)
    for e in errors:
        on_error(e)
    for batch_paths, pixels in iter_pixel_batches(files, batch_size, embedder.preprocess, on_error, workers,
                                                  embedder.device):
        t0 = time.perf_counter()
        embedded = embedder.embed_pixels(pixels, [display_path(p) for p in batch_paths], with_tokens=decoder.needs_tokens)
        captions = decoder.decode(embedded, **generation)
        took = round(time.perf_counter() - t0, 4)  # the batch's: its items were embedded and decoded together
        yield [{"file": display_path(p), "image_id": image_id(p, ids), "caption": c, "decoder": decoder.kind,
                "batch_seconds": took, "batch_size": len(batch_paths)} for p, c in zip(batch_paths, captions)]


def caption_embeddings(embedded, decoder, batch_size: int = 256, ids=None, **generation) -> Iterator[list[dict]]:
    """Yield, per batch, records {image_id, caption, decoder, batch_seconds, batch_size} for precomputed embeddings."""
    batches = ((embedded.select(slice(s, s + batch_size)), None) for s in range(0, len(embedded), batch_size))
    return caption_batches(batches, decoder, ids, **generation)


def caption_batches(batches, decoder, ids=None, **generation) -> Iterator[list[dict]]:
    """Records for (Embedded, per-row metadata or None) batches, e.g. from `data.vectors`; a row's
    metadata (clip-retrieval's key, url, caption...) comes along as "metadata"; `ids` as in image_id."""
    for part, metadata in batches:
        t0 = time.perf_counter()
        captions = decoder.decode(part, **generation)
        took = round(time.perf_counter() - t0, 4)
        records = [{"image_id": image_id(i, ids), "caption": c, "decoder": decoder.kind, "batch_seconds": took,
                    "batch_size": len(part)} for i, c in zip(part.ids, captions)]
        for record, row in zip(records, metadata or ()):
            record["metadata"] = row
        yield records


def caption(images: Sequence[str], decoder=None, embedder=None, batch_size: int = 32, device: str = "auto",
            **generation) -> list[str]:
    """Library one-liner: captions for image files, by a decoder object or a decoder name (a directory,
    hf-hub:ORG/NAME, a bundled decoder's name such as "clipcap"; None: the bundle's default).
    Raises on the first bad image, unlike the CLI which reports and goes on."""
    from unembed.decoders import decoder_path, load_decoder, read_decoder_config, resolve_embedder_spec
    from unembed.embedders import load_embedder

    if decoder is None or isinstance(decoder, (str, os.PathLike)):
        decoder = decoder_path(decoder)
        if embedder is None:
            embedder = load_embedder(resolve_embedder_spec(read_decoder_config(decoder)["config"], decoder), device)
        decoder = load_decoder(decoder, device=str(embedder.device), embedder=embedder)
    elif embedder is None:
        embedder = load_embedder(decoder.config.embedder_spec, device)

    decoder.check_options(generation)  # a bad option is refused before any image is read

    def fail(e):
        raise e

    return [r["caption"] for batch in caption_images(images, decoder, embedder, batch_size, fail, **generation)
            for r in batch]


def embed_split(embedder, split_dir, with_tokens: bool = False, batch_size: int = 128, workers: int = 0):
    """The split's image embeddings (ids = image ids as strings), from the cache when it was made
    from this very split (its fingerprint, kept in the cache, matches), else computed afresh, the
    images decoded in `workers` processes (data.images.iter_pixel_batches)."""
    from unembed.data.splits import load_split, split_cache, split_fingerprint
    from unembed.data.vectors import Embedded

    split_dir = Path(split_dir)
    cache = split_cache(split_dir, embedder.id, with_tokens)
    paths, _, ids = load_split(split_dir)
    fingerprint = split_fingerprint(split_dir)
    if cache.is_file():
        cached = Embedded.load(cache)
        # A cache from before embeddings were kept raw holds unit vectors: made again, not trusted.
        if (cached.meta.get("split_fingerprint") == fingerprint and cached.ids == [str(i) for i in ids]
                and not cached.normalized):
            return cached
    id_of = {str(p): str(i) for p, i in zip(paths, ids)}
    # no on_error: a split is scored whole, so an image it names must load
    parts = [embedder.embed_pixels(pixels, [id_of[str(p)] for p in files], with_tokens)
             for files, pixels in iter_pixel_batches(paths, batch_size, embedder.preprocess, workers=workers,
                                                     device=embedder.device)]
    embedded = Embedded.concat(parts)
    embedded.meta["split_fingerprint"] = fingerprint
    embedded.save(cache)
    return embedded
