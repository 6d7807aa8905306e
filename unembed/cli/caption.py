"""`unembed caption` and `unembed embed`: images (or precomputed vectors) in, captions or vectors
out, streamed batch by batch; several processes split the inputs and merge their outputs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from unembed.cli.common import (EXIT_FAILED, ErrorCounter, add_dtype_option, add_generation_options, add_workers_option,
                                err, exit_code, generation_args, log)


def my_inputs(paths, world, errors) -> list[str]:
    """This process's block of the input files; paths that name no file are reported once, by the main process."""
    from unembed.data.images import expand_inputs

    files, bad = expand_inputs(paths)
    if world.is_main:
        for e in bad:
            errors(e)
    return world.block(files)


def _any_input(paths) -> bool:
    """Whether the arguments name at least one image; when none does, each bad one is reported (by the
    first process only) and the run ends before torch or a model loads."""
    import os

    from unembed.data.images import expand_inputs

    files, bad = expand_inputs(paths)
    if not files and os.environ.get("RANK", "0") == "0":
        for e in bad:
            err(f"skipped {e}")
        err("no image to caption")
    return bool(files)


def cmd_embed(args) -> int:
    from unembed.distributed import world
    from unembed.embedders import Embedded, load_embedder
    from unembed.data.images import iter_pixel_batches
    from unembed.pipeline import inference_precision

    w = world(args.device)
    embedder = load_embedder(args.embedder, w.device)
    errors = ErrorCounter()
    batches = iter_pixel_batches(my_inputs(args.paths, w, errors), args.batch_size, embedder.preprocess, errors,
                                 args.workers, embedder.device)
    with inference_precision(args.dtype, embedder.device):
        parts = [embedder.embed_pixels(pixels, paths, with_tokens=args.tokens) for paths, pixels in batches]
    out = args.out if w.size == 1 else w.part_path(args.out)
    if parts:
        Embedded.concat(parts).save(out)
    if w.size > 1:
        w.merge_parts(args.out, lambda files: Embedded.concat([Embedded.load(f) for f in files]).save(args.out))
    done, failed = w.total(sum(len(p) for p in parts)), w.total(errors.count)
    if w.is_main:
        log(f"embedded {done} images ({embedder.dim}-d) into {args.out}" if done else "no image could be embedded")
    return exit_code(done, failed)


class _ResultWriter:
    """Streams the records as they come, flushed per batch, so an interruption keeps every finished
    batch: JSON Lines, or COCO results as one JSON array (streamed too; to a file it is written
    beside it and moved into place at the end). A record that cannot be written is one failed
    item; the others are written."""

    def __init__(self, out: str | None, fmt: str, on_error=lambda error: None):
        from unembed.io import atomic_path

        self.fmt, self.out, self.on_error, self.count = fmt, out, on_error, 0
        self.atomic = None
        if out is None:
            self.stream = sys.stdout
        elif fmt == "coco":  # a half-written array is not JSON: write beside it, move into place at the end
            self.atomic = atomic_path(out)
            self.stream = open(self.atomic.__enter__(), "w", encoding="utf-8")
        else:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            self.stream = open(out, "w", encoding="utf-8")
        if fmt == "coco":
            self.stream.write("[")

    def write(self, records: list[dict]) -> None:
        from unembed.errors import BadInputError

        for r in records:
            if self.fmt == "coco":
                r = {"image_id": r["image_id"], "caption": r["caption"]}
            try:
                line = json.dumps(r, ensure_ascii=False)
                line.encode("utf-8")  # a lone surrogate cannot be written: find out before writing
            except (TypeError, ValueError, UnicodeEncodeError) as e:
                self.on_error(BadInputError(r.get("file", r.get("image_id")), f"its record cannot be written ({e})"))
                continue
            self.stream.write(("," if self.count else "") + "\n" + line if self.fmt == "coco" else line + "\n")
            self.count += 1
        self.stream.flush()

    def close(self) -> None:
        if self.fmt == "coco":
            self.stream.write("\n]\n")
        if self.stream is not sys.stdout:
            self.stream.close()
        if self.atomic is not None:
            self.atomic.__exit__(None, None, None)


def _decoder_dir(decoder: str | None) -> str:
    """A decoder directory; no --decoder, or the name of a bundled decoder, means the shipped bundle."""
    from unembed.decoders import find_decoder

    path, bundled = find_decoder(decoder)
    if bundled:
        log(f"using the bundled {path.name} decoder; it knows only the scenes world (give --decoder DIR for yours)")
    return str(path)


def _load_decoder_and_embedder(args):
    """(decoder, embedder or None for --embeddings, the device both run on)."""
    from unembed.decoders import decoder_class, load_decoder, read_decoder_config, resolve_embedder_spec
    from unembed.embedders import load_embedder, resolve_device

    args.decoder = _decoder_dir(args.decoder)
    saved = read_decoder_config(args.decoder)
    decoder_class(saved["kind"]).check_generation(generation_args(args))  # before any model loads
    spec = args.embedder or resolve_embedder_spec(saved["config"], args.decoder)
    device = str(resolve_device(args.device))  # --embeddings are decoded where --device says too
    embedder = load_embedder(spec, device) if not args.embeddings else None
    decoder = load_decoder(args.decoder, device=device, embedder=embedder)
    decoder.check_options(generation_args(args))  # what its own files decide (edits need substitutes.json)
    return decoder, embedder, device


def _merge_caption_parts(out: str, fmt: str):
    """Concatenate the processes' JSON Lines parts into OUT as JSON Lines or COCO results, streamed
    line by line (memory stays flat) into a file moved into place at the end."""
    from unembed.io import atomic_path

    def merge(parts: list[str]) -> None:
        with atomic_path(out) as tmp:
            writer = _ResultWriter(str(tmp), fmt)
            for part in parts:
                with open(part, encoding="utf-8") as lines:
                    for line in lines:
                        if line.strip():
                            writer.write([json.loads(line)])
            writer.close()

    return merge


def cmd_caption(args) -> int:
    if not args.paths and not args.embeddings:
        err("give image files/folders/globs, or --embeddings FILE.safetensors")
        return EXIT_FAILED
    if not args.embeddings and not _any_input(args.paths):
        return EXIT_FAILED  # reported before torch or any model loads
    from tqdm.auto import tqdm

    from unembed.distributed import world
    from unembed.pipeline import caption_batches, caption_images, inference_precision

    w = world(args.device)
    if w.size > 1 and not args.out:
        err("with several processes, give --out FILE (their outputs are merged into it)")
        return EXIT_FAILED
    args.device = w.device
    source = _embeddings(args.embeddings, w) if args.embeddings else None
    decoder, embedder, device = _load_decoder_and_embedder(args)
    ids = _id_index(args.refs)
    generation = generation_args(args)
    errors = ErrorCounter()
    writer = (_ResultWriter(w.part_path(args.out), "jsonl", errors) if w.size > 1
              else _ResultWriter(args.out, args.format, errors))
    done = 0
    try:
        if args.embeddings:
            rows = w.block(range(len(source)))
            batches = caption_batches(source.batches(args.batch_size, rows), decoder, ids, **generation)
            total = len(rows)
        else:
            files = my_inputs(args.paths, w, errors)
            batches = caption_images(files, decoder, embedder, args.batch_size, errors, args.workers, ids,
                                     **generation)
            total = len(files)
        with tqdm(total=total, unit="img", desc="caption", disable=None if w.is_main else True, file=sys.stderr) as bar, \
                inference_precision(args.dtype, device):
            for records in batches:
                writer.write(records)
                done += len(records)
                bar.update(len(records))
    finally:
        writer.close()
    if w.size > 1:
        w.merge_parts(args.out, _merge_caption_parts(args.out, args.format))
    done, failed = w.total(done), w.total(errors.count)
    if w.is_main:
        log(f"captioned {done} item(s)" + (f"; {failed} failed" if failed else "")
             + (f"; wrote {args.out}" if args.out else ""))
    return exit_code(done, failed)


def _id_index(refs):
    """With --refs, the records' ids are that captions file's (data/ids.py); else the names as they are."""
    if not refs:
        return None
    from unembed.data.ids import IdIndex

    return IdIndex.from_file(refs)


def _embeddings(path, w):
    """The --embeddings source, read a batch at a time; vectors without an embedder id get a warning."""
    from unembed.data.vectors import open_embeddings

    source = open_embeddings(path)
    if not source.embedder_id and w.is_main:
        log(f"note: {path} names no embedder, so only its width ({source.dim}) can be checked against the decoder's")
    return source


def register(sub) -> None:
    p = sub.add_parser("caption", help="caption images (files, folders, globs) or precomputed embeddings")
    p.add_argument("paths", nargs="*", help="image files, folders or glob patterns")
    p.add_argument("--decoder", help="a decoder directory, or the name of a bundled decoder (default: the "
                   "bundle's default, which knows only the scenes world)")
    p.add_argument("--embedder", help="embedder spec (default: the one the decoder was built for)")
    p.add_argument("--embeddings", help="caption precomputed vectors instead of images: a file from `unembed embed`, "
                   "a safetensors file of one [N, D] tensor, a .npy file, or a clip-retrieval folder "
                   "(img_emb/*.npy + metadata/*.parquet)")
    p.add_argument("--batch-size", type=int, default=32)
    add_generation_options(p)
    p.add_argument("--device", default="auto")
    add_workers_option(p)
    add_dtype_option(p)
    p.add_argument("--out", help="output file (default: stdout)")
    p.add_argument("--format", choices=["jsonl", "coco"], default="jsonl")
    p.add_argument("--refs", help="a COCO captions file (e.g. DATA/SPLIT/captions.json): records get the image ids its "
                   "images[].file_name give the files (raw COCO names such as COCO_val2014_000000391895.jpg "
                   "included); without it an image's id is its file stem, spelled exactly")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("embed", help="embed images once into a .safetensors file for reuse")
    p.add_argument("paths", nargs="+")
    p.add_argument("--embedder", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tokens", action="store_true", help="also store image token embeddings (CoCa)")
    p.add_argument("--device", default="auto")
    add_workers_option(p)
    add_dtype_option(p)
    p.set_defaults(func=cmd_embed)
