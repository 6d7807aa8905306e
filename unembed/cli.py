"""The `unembed` command line. argparse lives here and only here; each command is a thin call
into the library, and library errors become one stderr line and an exit code:

    0  everything succeeded
    1  some inputs failed (each named on stderr); the others were processed and written
    2  nothing could be done: bad usage, a model that cannot load, mismatched embedder, bad data
  130  interrupted (what was already written is kept)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_PARTIAL, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 130


def _err(message: str) -> None:
    print(f"unembed: {message}", file=sys.stderr, flush=True)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _ErrorCounter:
    def __init__(self):
        self.count = 0

    def __call__(self, error) -> None:
        self.count += 1
        _err(f"skipped {error}")


# --- data ---------------------------------------------------------------------------------------

def cmd_data_scenes(args) -> int:
    from unembed.data.scenes import write_scenes

    t0 = time.time()
    counts = write_scenes(args.out, n=args.n, seed=args.seed, n_eval=args.n_eval, image_size=args.image_size,
                          text_only=args.text_only)
    _log(f"wrote scenes to {args.out} in {time.time() - t0:.1f}s: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return EXIT_OK


# --- train --------------------------------------------------------------------------------------

def _train_config(args, defaults: dict):
    from unembed.training.loop import TrainConfig

    return TrainConfig(**{**defaults, **_given(args, ("epochs", "batch_size", "lr", "seed", "device", "max_steps",
                                                        "mixed_precision", "warmup_steps", "checkpoint_every",
                                                        "validate_every"))})


def _json_arg(value: str) -> dict:
    """A JSON object given inline or as a file path."""
    from unembed.errors import BadInputError

    try:
        parsed = json.loads(Path(value).read_text() if Path(value).is_file() else value)
    except json.JSONDecodeError as e:
        raise BadInputError(value, f"is neither a JSON object nor a JSON file ({e.msg})") from None
    if not isinstance(parsed, dict):
        raise BadInputError(value, "must be a JSON object")
    return parsed


def _given(args, names) -> dict:
    """The options among `names` that were given on the command line."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _arch_arg(value: str | None, make_config):
    """An architecture config from --arch JSON, or None for the method's default."""
    from unembed.errors import BadInputError

    if not value:
        return None
    try:
        return make_config(**_json_arg(value))
    except TypeError as e:
        raise BadInputError("--arch", str(e)) from None


def cmd_train_clip(args) -> int:
    from unembed.training.clip import CLIP_DEFAULTS, train_clip

    from unembed.embedders import scenes_config

    arch = _arch_arg(args.arch, scenes_config)
    report = train_clip(args.data, args.out, _train_config(args, CLIP_DEFAULTS), arch=arch, resume=args.resume)
    print(json.dumps(report, indent=2))
    return EXIT_OK


def cmd_train_retrieval(args) -> int:
    from unembed.data.captions import load_captions
    from unembed.decoders.retrieval import RetrievalDecoder
    from unembed.embedders import load_embedder

    embedder = load_embedder(args.embedder, args.device)
    captions = [c for path in args.captions for c in load_captions(path)]
    t0 = time.time()
    decoder = RetrievalDecoder.build(embedder, captions)
    decoder.save(args.out)
    _log(f"retrieval decoder with {decoder.config.memory_size} distinct captions saved to {args.out} "
         f"({time.time() - t0:.1f}s)")
    return EXIT_OK


def cmd_train_prefix(args) -> int:
    from unembed.embedders import load_embedder
    from unembed.training.prefix import PREFIX_DEFAULTS, train_prefix

    options = _given(args, PREFIX_OPTIONS)
    if args.lm_config:
        options["lm_config"] = _json_arg(args.lm_config)
    embedder = load_embedder(args.embedder, args.device)
    report = train_prefix(args.what, embedder, args.out, _train_config(args, PREFIX_DEFAULTS[args.what]),
                          data_dir=args.data, caption_files=getattr(args, "captions", None) or (), resume=args.resume, **options)
    print(json.dumps(report, indent=2))
    return EXIT_OK


def cmd_train_lm(args) -> int:
    from unembed.data.captions import caption_corpus
    from unembed.training.lm import LM_DEFAULTS, train_lm

    captions, validation = caption_corpus(args.captions or (), args.data)
    options = _given(args, ("tokenizer", "max_caption_tokens", "simctg_margin"))
    report = train_lm(captions, args.out, _train_config(args, LM_DEFAULTS), lm=args.lm,
                      lm_config=_json_arg(args.lm_config) if args.lm_config else None,
                      validation_captions=validation, resume=args.resume, **options)
    print(json.dumps(report, indent=2))
    return EXIT_OK


def cmd_train_coca(args) -> int:
    from unembed.errors import BadInputError
    from unembed.training.coca import COCA_DEFAULTS, COCA_FINETUNE_DEFAULTS, scenes_coca_config, train_coca

    if args.arch and args.init:
        raise BadInputError("--arch", "sets a new architecture; --init fine-tunes an existing one, so give one of them")
    arch = _arch_arg(args.arch, scenes_coca_config)
    defaults = COCA_FINETUNE_DEFAULTS if args.init else COCA_DEFAULTS
    report = train_coca(args.data, args.out, _train_config(args, defaults), arch=arch, init=args.init,
                        contrastive_weight=args.contrastive_weight, caption_weight=args.caption_weight,
                        resume=args.resume)
    print(json.dumps(report, indent=2))
    return EXIT_OK


ITERATIVE_OPTIONS = ("tokenizer", "k", "alpha", "beta", "num_beams", "max_length", "prompt", "stop", "logit_scale")


def cmd_train_iterative(args) -> int:
    from unembed.decoders.iterative import IterativeDecoder
    from unembed.embedders import load_embedder

    options = _given(args, ITERATIVE_OPTIONS)
    decoder = IterativeDecoder.build(load_embedder(args.embedder, args.device), lm=args.lm, **options)
    decoder.save(args.out)
    _log(f"iterative decoder (LM {args.lm}, k={decoder.config.k}, alpha={decoder.config.alpha}, "
         f"beta={decoder.config.beta}) saved to {args.out}")
    return EXIT_OK


PREFIX_OPTIONS = ("lm", "tokenizer", "lm_mode", "lora_r", "mapper", "prefix_length", "mapper_length", "mapper_layers",
                  "noise_variance", "noise_kind", "mean_shift", "projection_size", "projection_tau", "label_smoothing")


# --- embed / caption ----------------------------------------------------------------------------

def _my_inputs(paths, world, errors) -> list[str]:
    """This process's block of the input files; paths that name no file are reported once, by the main process."""
    from unembed.data.images import expand_inputs

    files, bad = expand_inputs(paths)
    if world.is_main:
        for e in bad:
            errors(e)
    return world.block(files)


def _exit_code(done: int, failed: int) -> int:
    if done == 0:
        return EXIT_FAILED
    return EXIT_PARTIAL if failed else EXIT_OK


def cmd_embed(args) -> int:
    from unembed.distributed import world
    from unembed.embedders import Embedded, load_embedder
    from unembed.pipeline import iter_image_batches

    w = world(args.device)
    embedder = load_embedder(args.embedder, w.device)
    errors = _ErrorCounter()
    parts = [embedder.embed(images, paths, with_tokens=args.tokens, batch_size=args.batch_size)
             for paths, images in iter_image_batches(_my_inputs(args.paths, w, errors), args.batch_size, errors)]
    out = args.out if w.size == 1 else w.part_path(args.out)
    if parts:
        Embedded.concat(parts).save(out)
    if w.size > 1:
        w.merge_parts(args.out, lambda files: Embedded.concat([Embedded.load(f) for f in files]).save(args.out))
    done, failed = w.total(sum(len(p) for p in parts)), w.total(errors.count)
    if w.is_main:
        _log(f"embedded {done} images ({embedder.dim}-d) into {args.out}" if done else "no image could be embedded")
    return _exit_code(done, failed)


class _ResultWriter:
    """Streams JSON Lines (flushed per batch, so an interruption keeps every finished batch), or
    collects COCO results and writes them atomically at the end."""

    def __init__(self, out: str | None, fmt: str):
        self.fmt, self.out, self.records = fmt, out, []
        self.stream = sys.stdout if out is None or fmt == "coco" else open(out, "w", encoding="utf-8")

    def write(self, records: list[dict]) -> None:
        if self.fmt == "coco":
            self.records += [{"image_id": r["image_id"], "caption": r["caption"]} for r in records]
            return
        for r in records:
            self.stream.write(json.dumps(r, ensure_ascii=False) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.fmt == "coco":
            from unembed.io import write_json

            if self.out:
                write_json(self.out, self.records)
            else:
                print(json.dumps(self.records, indent=2, ensure_ascii=False))
        elif self.stream is not sys.stdout:
            self.stream.close()


def _decoder_dir(decoder: str | None) -> str:
    """A decoder directory; no --decoder, or the name of a bundled decoder, means the shipped bundle."""
    from unembed.bundle import bundled_decoder

    if decoder and (Path(decoder).exists() or "/" in decoder):
        return decoder
    path = bundled_decoder(decoder)
    _log(f"using the bundled {path.name} decoder; it knows only the scenes world (give --decoder DIR for yours)")
    return str(path)


def _load_decoder_and_embedder(args):
    from unembed.decoders import load_decoder, read_decoder_config
    from unembed.embedders import load_embedder
    from unembed.decoders import resolve_embedder_spec

    args.decoder = _decoder_dir(args.decoder)
    saved = read_decoder_config(args.decoder)
    spec = args.embedder or resolve_embedder_spec(saved["config"], args.decoder)
    embedder = load_embedder(spec, args.device) if not args.embeddings else None
    decoder = load_decoder(args.decoder, device=str(embedder.device) if embedder else "cpu", embedder=embedder)
    return decoder, embedder


def _merge_caption_parts(out: str, fmt: str):
    """Concatenate the processes' JSON Lines parts into OUT (atomically), as JSON Lines or COCO results."""
    from unembed.io import atomic_path, write_json

    def merge(parts: list[str]) -> None:
        lines = [line for part in parts for line in Path(part).read_text(encoding="utf-8").splitlines() if line]
        if fmt == "coco":
            write_json(out, [{"image_id": r["image_id"], "caption": r["caption"]} for r in map(json.loads, lines)])
            return
        with atomic_path(out) as tmp:
            Path(tmp).write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    return merge


def cmd_caption(args) -> int:
    from tqdm.auto import tqdm

    from unembed.distributed import world
    from unembed.pipeline import caption_embeddings, caption_images

    if not args.paths and not args.embeddings:
        _err("give image files/folders/globs, or --embeddings FILE.safetensors")
        return EXIT_FAILED
    w = world(args.device)
    if w.size > 1 and not args.out:
        _err("with several processes, give --out FILE (their outputs are merged into it)")
        return EXIT_FAILED
    args.device = w.device
    decoder, embedder = _load_decoder_and_embedder(args)
    generation = _given(args, ("max_length", "num_beams", "top_p", "seed"))
    if args.sample:
        generation["do_sample"] = True
    errors = _ErrorCounter()
    writer = _ResultWriter(w.part_path(args.out), "jsonl") if w.size > 1 else _ResultWriter(args.out, args.format)
    done = 0
    try:
        if args.embeddings:
            from unembed.embedders import Embedded

            embedded = Embedded.load(args.embeddings)
            embedded = embedded.select(w.block(range(len(embedded))))
            batches, total = caption_embeddings(embedded, decoder, args.batch_size, **generation), len(embedded)
        else:
            files = _my_inputs(args.paths, w, errors)
            batches, total = caption_images(files, decoder, embedder, args.batch_size, errors, **generation), len(files)
        with tqdm(total=total, unit="img", desc="caption", disable=None if w.is_main else True, file=sys.stderr) as bar:
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
        _log(f"captioned {done} item(s)" + (f"; {failed} failed" if failed else "")
             + (f"; wrote {args.out}" if args.out else ""))
    return _exit_code(done, failed)


# --- eval ---------------------------------------------------------------------------------------

def cmd_eval(args) -> int:
    from unembed.eval.metrics import coco_caption_metrics, format_table, load_references, load_results
    from unembed.io import write_json

    predictions = load_results(args.results)
    references = load_references(args.refs)
    scores = coco_caption_metrics(predictions, references, spice=not args.no_spice)
    if args.embedder:
        from unembed.embedders import load_embedder
        from unembed.eval.scoring import clip_scores_for_refs

        scores.update(clip_scores_for_refs(load_embedder(args.embedder, args.device), args.refs, predictions, references))
    name = args.name or Path(args.results).stem
    print(format_table({name: scores}))
    for metric, reason in scores.get("unavailable", {}).items():
        _log(f"{metric} unavailable: {reason}")
    if args.out:
        write_json(args.out, {"results": str(args.results), "refs": str(args.refs), "scores": scores})
    return EXIT_OK


def cmd_demo(args) -> int:
    """New scenes images, captioned by every bundled decoder side by side."""
    from unembed.bundle import bundle_dir, bundled_decoder, manifest
    from unembed.data.scenes import generate_split, render
    from unembed.decoders import read_decoder_config
    from unembed.embedders import load_embedder
    from unembed.pipeline import caption

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, truths = [], []
    for i, (scene, captions, seed) in enumerate(generate_split("test", args.n, args.seed)):
        path = out / f"scene-{i}.png"
        render(scene, seed=seed).save(path)
        images.append(str(path))
        truths.append(captions[0])
    info = manifest()
    names = info["decoders"]
    shared = load_embedder(str(bundle_dir() / info["embedder"]), args.device)  # loaded once for all but CoCa
    rows = {}
    for name in names:
        path = bundled_decoder(name)
        own = read_decoder_config(path)["config"]["embedder_id"] != shared.id
        rows[name] = caption(images, str(path), embedder=None if own else shared, device=args.device)
    lines = ["| image | a true caption | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for i, path in enumerate(images):
        lines.append(f"| {Path(path).name} | {truths[i]} | " + " | ".join(rows[n][i] for n in names) + " |")
    print("\n".join(lines))
    _log(f"wrote {len(images)} scenes images to {out}; the bundle knows only the scenes world")
    return EXIT_OK


# --- compare / gap ------------------------------------------------------------------------------

def cmd_compare(args) -> int:
    from unembed.compare import compare
    from unembed.eval.report import markdown_table

    result = compare(args.data, args.decoders, args.out, embedder=args.embedder, split=args.split,
                     config=_json_arg(args.config) if args.config else None, max_steps=args.max_steps,
                     max_images=args.max_images, batch_size=args.batch_size, device=args.device,
                     spice=not args.no_spice, gap=not args.no_gap, log=_log)
    print(markdown_table(result))
    failed = [row for row in result["decoders"] if row["error"]]
    for row in failed:
        _err(f"{row['name']} failed: {row['error']}")
    _log(f"compared {len(result['decoders'])} decoders on {result['n_images']} {result['split']} images in "
         f"{result['seconds'] / 60:.1f} min; report: {Path(args.out) / 'report.html'}")
    return _exit_code(len(result["decoders"]) - len(failed), len(failed))


def cmd_gap(args) -> int:
    from unembed.embedders import load_embedder
    from unembed.eval.gap import format_gap, gap_report

    result = gap_report(load_embedder(args.embedder, args.device), args.data, split=args.split, out_dir=args.out,
                        max_pairs=args.max_pairs)
    print(format_gap(result))
    _log(f"wrote {Path(args.out) / 'gap.json'} and {Path(args.out) / 'gap.png'}")
    return EXIT_OK


# --- the parser ---------------------------------------------------------------------------------

def _add_train_flags(p, resume: bool = True) -> None:
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--max-steps", type=int, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--validate-every", type=int, help="steps between validations (default: only at the end)")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")


def build_parser() -> argparse.ArgumentParser:
    from unembed import __version__

    parser = argparse.ArgumentParser(prog="unembed", description="Turn joint (CLIP-style) embeddings back into text.",
                                     epilog="exit codes: 0 ok, 1 some inputs failed, 2 failed, 130 interrupted")
    parser.add_argument("--version", action="version", version=f"unembed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("caption", help="caption images (files, folders, globs) or precomputed embeddings")
    p.add_argument("paths", nargs="*", help="image files, folders or glob patterns")
    p.add_argument("--decoder", help="a decoder directory, or the name of a bundled decoder (default: the "
                   "bundle's default, which knows only the scenes world)")
    p.add_argument("--embedder", help="embedder spec (default: the one the decoder was built for)")
    p.add_argument("--embeddings", help="caption the vectors of this .safetensors file instead of images")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, help="longest caption in tokens (generative decoders)")
    p.add_argument("--num-beams", type=int, help="beam search width (1 = greedy; default: the decoder's)")
    p.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default 0.9)")
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="output file (default: stdout)")
    p.add_argument("--format", choices=["jsonl", "coco"], default="jsonl")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("embed", help="embed images once into a .safetensors file for reuse")
    p.add_argument("paths", nargs="+")
    p.add_argument("--embedder", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tokens", action="store_true", help="also store image token embeddings (CoCa)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("eval", help="score captions with COCO metrics (and CLIPScore with --embedder)")
    p.add_argument("--results", required=True, help="COCO results JSON or caption JSON Lines")
    p.add_argument("--refs", required=True, help="COCO caption annotation file")
    p.add_argument("--embedder", help="also compute CLIPScore / RefCLIPScore with this embedder")
    p.add_argument("--name", help="row name in the table")
    p.add_argument("--no-spice", action="store_true")
    p.add_argument("--out", help="write the scores as JSON here")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="draw new scenes images and caption them with every bundled decoder")
    p.add_argument("--out", default="unembed-demo", help="folder for the images (default ./unembed-demo)")
    p.add_argument("--n", type=int, default=4, help="how many images")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("compare", help="train, caption, score and time several decoders on the same images; "
                       "writes a table, a plot and an HTML report")
    p.add_argument("--data", required=True, help="a COCO-style directory with train/ (and val/) and the split")
    p.add_argument("--decoders", default="retrieval,clipcap,capdec,decap,iterative,coca",
                   help="comma-separated decoder kinds to train, or NAME=DIR for existing decoder directories")
    p.add_argument("--embedder", help="embedder spec (default: train a scenes CLIP on DATA into OUT/models/embedder)")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--config", help="JSON (or a JSON file) of training options per decoder name, e.g. "
                   "'{\"clipcap\": {\"max_steps\": 1000}}'")
    p.add_argument("--max-steps", type=int, help="training steps for every model (overrides the recipes)")
    p.add_argument("--max-images", type=int, help="caption only the first N images of the split")
    p.add_argument("--batch-size", type=int, default=64, help="captioning batch size")
    p.add_argument("--no-spice", action="store_true")
    p.add_argument("--no-gap", action="store_true", help="skip the modality-gap diagnostic")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("gap", help="measure the modality gap of an embedder on a dataset, and what bridges close it")
    p.add_argument("--embedder", required=True)
    p.add_argument("--data", required=True, help="a COCO-style directory (train/ captions feed the projection memory)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default="gap", help="folder for gap.json and gap.png (default ./gap)")
    p.add_argument("--max-pairs", type=int, default=1000)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_gap)

    p = sub.add_parser("train", help="train an embedder or a decoder")
    train = p.add_subparsers(dest="what", required=True)
    t = train.add_parser("clip", help="train a small joint embedder from scratch (contrastive loss)")
    t.add_argument("--data", required=True, help="a scenes/COCO-style directory with train/ (and val/, test/)")
    t.add_argument("--out", required=True)
    t.add_argument("--arch", help="JSON (or a JSON file) of architecture options: image_size, embed_dim, "
                   "vision_width, text_width, text_layers, context_length")
    _add_train_flags(t)
    t.set_defaults(func=cmd_train_clip)
    t = train.add_parser("retrieval", help="build the nearest-caption baseline from a caption corpus")
    t.add_argument("--captions", required=True, nargs="+", help="text, JSON, JSONL or COCO annotation files")
    t.add_argument("--embedder", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--device", default="auto")
    t.set_defaults(func=cmd_train_retrieval)
    for kind, about in (("clipcap", "ClipCap: prefix mapper trained on (image, caption) pairs"),
                        ("capdec", "CapDec: text-only training with noise-injected text embeddings"),
                        ("decap", "DeCap: text-only decoder + projection onto a text-embedding memory")):
        t = train.add_parser(kind, help=about)
        t.add_argument("--embedder", required=True)
        t.add_argument("--out", required=True)
        t.add_argument("--data", help="a COCO-style directory with train/ (captions.json, images) and val/")
        if kind != "clipcap":
            t.add_argument("--captions", nargs="+", help="caption corpora (text, JSON, JSONL, COCO, datasets dir)")
        _add_train_flags(t)
        t.add_argument("--lm", help="'scratch' or a Hugging Face causal LM id (default: gpt2; decap: scratch)")
        t.add_argument("--lm-config", help="JSON (or a JSON file) overriding the scratch LM's config, e.g. "
                       "'{\"n_layer\": 4, \"n_embd\": 256}'")
        t.add_argument("--tokenizer", help="'clip-bpe', 'corpus:N' (a BPE of at most N tokens learned from the "
                       "training captions) or an HF tokenizer id (default: the LM's own; scratch LMs: clip-bpe)")
        t.add_argument("--lm-mode", choices=["frozen", "lora", "full"])
        t.add_argument("--lora-r", type=int)
        t.add_argument("--mapper", choices=["linear", "mlp", "transformer"])
        t.add_argument("--prefix-length", type=int)
        t.add_argument("--mapper-length", type=int)
        t.add_argument("--mapper-layers", type=int)
        t.add_argument("--noise-variance", type=float, help="CapDec noise variance per dimension (0 = none)")
        t.add_argument("--noise-kind", choices=["gaussian", "uniform"])
        t.add_argument("--mean-shift", action="store_true", default=None,
                       help="subtract each modality's mean embedding (needs some images in --data)")
        t.add_argument("--projection-size", type=int, help="DeCap memory size (0 = no projection)")
        t.add_argument("--projection-tau", type=float)
        t.add_argument("--label-smoothing", type=float)
        t.set_defaults(func=cmd_train_prefix)

    t = train.add_parser("coca", help="CoCa: contrastive + captioning from scratch, or caption fine-tuning (--init)")
    t.add_argument("--data", required=True, help="a scenes/COCO-style directory with train/ (and val/, test/)")
    t.add_argument("--out", required=True, help="written as a CoCa decoder, with the model in OUT/embedder/")
    t.add_argument("--init", help="fine-tune this open_clip CoCa (spec or directory) with the caption loss only")
    t.add_argument("--contrastive-weight", type=float, help="default 1 from scratch, 0 with --init")
    t.add_argument("--caption-weight", type=float, help="default 2 from scratch, 1 with --init")
    t.add_argument("--arch", help="JSON (or a JSON file) of architecture options: image_size, embed_dim, patch_size, "
                   "vision_width, vision_layers, text_layers, decoder_layers, image_tokens, context_length")
    _add_train_flags(t)
    t.set_defaults(func=cmd_train_coca)
    t = train.add_parser("lm", help="train a small causal LM on caption text (the iterative decoder's LM)")
    t.add_argument("--out", required=True)
    t.add_argument("--captions", nargs="+", help="caption corpora (text, JSON, JSONL, COCO, datasets dir)")
    t.add_argument("--data", help="a COCO-style directory: train/ captions (and val/ for validation)")
    t.add_argument("--lm", default="scratch", help="'scratch' (GPT-2 architecture) or an HF causal LM to fine-tune")
    t.add_argument("--lm-config", help="JSON (or a JSON file) overriding the scratch LM's config")
    t.add_argument("--tokenizer", help="'corpus:N' (default corpus:4000 from scratch), 'clip-bpe' or an HF id")
    t.add_argument("--max-caption-tokens", type=int)
    t.add_argument("--simctg-margin", type=float, help="SimCTG contrastive margin (MAGIC's LM training; 0 = off)")
    _add_train_flags(t)
    t.set_defaults(func=cmd_train_lm)
    t = train.add_parser("iterative", help="package an LM and an embedder as a training-free MAGIC decoder")
    t.add_argument("--embedder", required=True)
    t.add_argument("--lm", required=True, help="a directory from `unembed train lm` or an HF causal LM id")
    t.add_argument("--out", required=True)
    t.add_argument("--tokenizer", help="default: the LM's own")
    t.add_argument("--k", type=int, help="candidates re-ranked per token (default 45)")
    t.add_argument("--alpha", type=float, help="degeneration penalty weight (default 0.1)")
    t.add_argument("--beta", type=float, help="embedder score weight (default 2.0)")
    t.add_argument("--num-beams", type=int)
    t.add_argument("--max-length", type=int, help="new tokens (default 16)")
    t.add_argument("--prompt", help="text the LM continues, e.g. 'Image of a' (not part of the caption)")
    t.add_argument("--stop", help="a caption ends at the token holding this text (default '.')")
    t.add_argument("--logit-scale", type=float, help="softmax temperature of the embedder score (default: the embedder's)")
    t.add_argument("--device", default="auto")
    t.set_defaults(func=cmd_train_iterative)

    p = sub.add_parser("data", help="make datasets")
    data = p.add_subparsers(dest="what", required=True)
    d = data.add_parser("scenes", help="the procedural scenes world (offline stand-in for COCO)")
    d.add_argument("--out", required=True)
    d.add_argument("--n", type=int, default=20000, help="training images")
    d.add_argument("--n-eval", type=int, help="images in each of val, test, compositional (default n/20)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--image-size", type=int, default=64)
    d.add_argument("--text-only", action="store_true", help="captions and scene descriptions only, no images")
    d.set_defaults(func=cmd_data_scenes)
    return parser


def main(argv: list[str] | None = None) -> int:
    from unembed.errors import UnembedError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _err("interrupted; output written so far is kept")
        return EXIT_INTERRUPTED
    except UnembedError as e:
        _err(str(e))
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
