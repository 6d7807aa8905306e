"""`unembed train` (an embedder, an LM, or a decoder) and `unembed build` (decoders that are made,
not trained: retrieval's caption memory, iterative's LM + embedder package).

Every registered prefix-LM decoder (clipcap, capdec, decap, and any kind registered later) gets its
`unembed train KIND` command from its own declaration: `summary`, `cli_options` (the config fields,
with their help), `train_defaults` and `text_only` (which adds --captions)."""
from __future__ import annotations

import json
import time

from unembed.cli.common import (EXIT_OK, add_config_options, add_out_option, add_train_flags, add_workers_option,
                                arch_arg, check_out, config_options, given, json_arg, log, option_flag, train_config)

ITERATIVE_OPTIONS = ("tokenizer", "k", "alpha", "beta", "num_beams", "max_length", "prompt", "stop", "logit_scale",
                     "save_full_lm")
RENAMED = {"retrieval": "build retrieval", "iterative": "build iterative"}  # old `train X` spellings, kept


def cmd_train_clip(args) -> int:
    from unembed.embedders import scenes_config
    from unembed.training.clip import CLIP_DEFAULTS, train_clip

    check_out(args, "embedder")
    arch = arch_arg(args.arch, scenes_config)
    report = train_clip(args.data, args.out, train_config(args, CLIP_DEFAULTS), arch=arch, resume=args.resume)
    print(json.dumps(report, indent=2))
    return EXIT_OK


def cmd_train_prefix(args) -> int:
    from unembed.data.recombine import check_recombine, inline_classes
    from unembed.decoders import decoder_class
    from unembed.decoders.prefix import TEXT_OPTIONS
    from unembed.embedders import load_embedder
    from unembed.errors import BadInputError
    from unembed.training.prefix import check_sources, train_prefix

    cls = decoder_class(args.what)
    _refuse_other_kinds_options(args)
    check_out(args)
    images = validation_images(args)
    check_sources(args.what, args.data, getattr(args, "captions", None) or ())  # before the embedder loads
    options = config_options(args, cls.config_class, cls.cli_options)
    if args.init and options:  # the decoder being trained further has its settings
        raise BadInputError(option_flag(cls.config_class, next(iter(options))),
                            f"is set by the decoder {args.init} that --init trains further; drop it")
    if set(TEXT_OPTIONS) & set(options):  # refused before the embedder loads
        classes = check_recombine(options.get("recombine", ""), options.get("recombine_rate"))
        options["recombine"] = inline_classes(classes)  # its files read once, here
    config = train_config(args, cls.train_defaults)  # its bad values refused before the embedder loads
    embedder = load_embedder(args.embedder, args.device)
    report = train_prefix(args.what, embedder, args.out, config, data_dir=args.data,
                          caption_files=getattr(args, "captions", None) or (), resume=args.resume, init=args.init,
                          validation_images=images, **options)
    print(json.dumps(report, indent=2))
    return EXIT_OK


def cmd_train_corrector(args) -> int:
    from unembed.cli.caption import _decoder_dir
    from unembed.decoders import read_decoder_config, resolve_embedder_spec
    from unembed.decoders.corrector import CorrectorDecoder
    from unembed.embedders import load_embedder
    from unembed.training.corrector import train_corrector
    from unembed.training.prefix import check_sources

    check_out(args)
    images = validation_images(args)
    check_sources("corrector", args.data, args.captions or ())  # before any model loads
    base = _decoder_dir(args.base)
    spec = args.embedder or resolve_embedder_spec(read_decoder_config(base)["config"], base)
    options = config_options(args, CorrectorDecoder.config_class, CorrectorDecoder.cli_options)
    report = train_corrector(base, load_embedder(spec, args.device), args.out,
                             train_config(args, CorrectorDecoder.train_defaults), data_dir=args.data,
                             caption_files=args.captions or (), resume=args.resume, max_captions=args.max_captions,
                             validation_images=images, **options)
    print(json.dumps(report, indent=2))
    return EXIT_OK


def add_validation_images_option(t) -> None:
    from unembed.training.prefix import VALIDATION_IMAGES

    t.add_argument("--val-images", type=int, default=VALIDATION_IMAGES, metavar="N",
                   help=f"val images read for val CIDEr at each validation, which --keep-best chooses by (default "
                   f"{VALIDATION_IMAGES}: more choose more surely, each validation taking longer)")


def validation_images(args) -> int:
    from unembed.errors import BadInputError

    if args.val_images < 1:
        raise BadInputError("--val-images", f"must be at least 1 (got {args.val_images})")
    return args.val_images


def _refuse_other_kinds_options(args) -> None:
    """An option another kind takes would do nothing here (ClipCap never calls the bridge that
    --noise-variance sets) or worse (--projection-size saves a memory without its captions): refused."""
    from unembed.errors import BadInputError

    for name, (flag, kinds) in args.other_kinds_options.items():
        if getattr(args, name, None) is not None:
            verb = "takes" if len(kinds) == 1 else "take"
            raise BadInputError(flag, f"does nothing for {args.what}: only {', '.join(kinds)} {verb} it")


def cmd_train_lm(args) -> int:
    from unembed.data.captions import caption_corpus
    from unembed.training.lm import LM_DEFAULTS, train_lm

    captions, validation = caption_corpus(args.captions or (), args.data)
    options = given(args, ("tokenizer", "max_caption_tokens", "simctg_margin"))
    report = train_lm(captions, args.out, train_config(args, LM_DEFAULTS), lm=args.lm,
                      lm_config=json_arg(args.lm_config) if args.lm_config else None,
                      validation_captions=validation, resume=args.resume, **options)
    print(json.dumps(report, indent=2))
    return EXIT_OK


def cmd_train_coca(args) -> int:
    from unembed.errors import BadInputError
    from unembed.training.coca import COCA_DEFAULTS, COCA_FINETUNE_DEFAULTS, scenes_coca_config, train_coca

    if args.arch and args.init:
        raise BadInputError("--arch", "sets a new architecture; --init fine-tunes an existing one, so give one of them")
    check_out(args)
    arch = arch_arg(args.arch, scenes_coca_config)
    defaults = COCA_FINETUNE_DEFAULTS if args.init else COCA_DEFAULTS
    report = train_coca(args.data, args.out, train_config(args, defaults), arch=arch, init=args.init,
                        contrastive_weight=args.contrastive_weight, caption_weight=args.caption_weight,
                        resume=args.resume)
    print(json.dumps(report, indent=2))
    return EXIT_OK


def cmd_build_retrieval(args) -> int:
    from unembed.data.captions import load_captions
    from unembed.decoders.retrieval import RetrievalDecoder
    from unembed.embedders import load_embedder

    check_out(args)
    _note_renamed(args)
    embedder = load_embedder(args.embedder, args.device)
    captions = [c for path in args.captions for c in load_captions(path)]
    t0 = time.time()
    decoder = RetrievalDecoder.build(embedder, captions)
    decoder.save(args.out)
    log(f"retrieval decoder with {decoder.config.memory_size} distinct captions saved to {args.out} "
        f"({time.time() - t0:.1f}s)")
    return EXIT_OK


def cmd_build_iterative(args) -> int:
    from unembed.decoders.iterative import IterativeDecoder
    from unembed.embedders import load_embedder

    check_out(args)
    _note_renamed(args)
    options = given(args, ITERATIVE_OPTIONS)
    decoder = IterativeDecoder.build(load_embedder(args.embedder, args.device), lm=args.lm, **options)
    decoder.save(args.out)
    log(f"iterative decoder (LM {args.lm}, k={decoder.config.k}, alpha={decoder.config.alpha}, "
        f"beta={decoder.config.beta}) saved to {args.out}")
    return EXIT_OK


def cmd_build_coca(args) -> int:
    from unembed.decoders.coca import CoCaDecoder
    from unembed.embedders import load_embedder

    check_out(args)
    decoder = CoCaDecoder.for_embedder(load_embedder(args.embedder, args.device))
    decoder.save(args.out)
    log(f"coca decoder over {args.embedder} saved to {args.out} (it decodes with that model's own towers)")
    return EXIT_OK


def cmd_build_ensemble(args) -> int:
    from unembed.decoders import find_decoder, load_decoder, read_decoder_config, resolve_embedder_spec
    from unembed.decoders.ensemble import EnsembleDecoder, check_member_count
    from unembed.embedders import load_embedder
    from unembed.errors import BadInputError

    check_out(args)
    check_member_count(len(args.member))
    paths = [find_decoder(name)[0] for name in args.member]  # every name read before a model loads
    seen = set()
    for name, path in zip(args.member, paths):
        if path.resolve() in seen:
            raise BadInputError(name, "is given twice: an ensemble of a decoder with itself pools the same candidates")
        seen.add(path.resolve())
    first = read_decoder_config(paths[0])
    embedder = load_embedder(args.embedder or resolve_embedder_spec(first["config"], paths[0]), args.device)
    decoder = EnsembleDecoder.build([load_decoder(path, device=args.device, embedder=embedder) for path in paths],
                                    embedder_spec=args.embedder)
    decoder.save(args.out, replace=args.overwrite)  # --overwrite: nothing of the decoder it replaces stays
    log(f"ensemble of {len(paths)} decoders ({', '.join(decoder.config.member_kinds)}) saved to {args.out}")
    return EXIT_OK


def _note_renamed(args) -> None:
    if args.command == "train":
        log(f"note: `unembed train {args.what}` is now `unembed {RENAMED[args.what]}` (it trains nothing); "
            "the old spelling keeps working")


# --- the parsers ----------------------------------------------------------------------------------

def _add_retrieval(p) -> None:
    p.add_argument("--captions", required=True, nargs="+", help="text, JSON, JSONL or COCO annotation files")
    p.add_argument("--embedder", required=True)
    add_out_option(p)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_build_retrieval)


def _add_iterative(p) -> None:
    p.add_argument("--embedder", required=True)
    p.add_argument("--lm", required=True, help="a directory from `unembed train lm` or an HF causal LM id")
    add_out_option(p)
    p.add_argument("--tokenizer", help="default: the LM's own")
    p.add_argument("--k", type=int, help="candidates re-ranked per token (default 45)")
    p.add_argument("--alpha", type=float, help="degeneration penalty weight (default 0.1)")
    p.add_argument("--beta", type=float, help="embedder score weight (default 2.0)")
    p.add_argument("--num-beams", type=int)
    p.add_argument("--max-length", type=int, help="new tokens (default 16)")
    p.add_argument("--prompt", help="text the LM continues, e.g. 'Image of a' (not part of the caption)")
    p.add_argument("--stop", help="a caption ends at the token holding this text (default '.')")
    p.add_argument("--logit-scale", type=float, help="softmax temperature of the embedder score (default: the embedder's)")
    p.add_argument("--save-full-lm", action="store_true", default=None,
                   help="copy a hub LM into the decoder (air-gapped use) instead of referencing its id and revision")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_build_iterative)


def _add_prefix_kinds(train) -> None:
    """`unembed train KIND` for every registered prefix-LM decoder, from the decoder's declaration."""
    from unembed.decoders import decoder_class, prefix_kinds

    kinds = [decoder_class(kind) for kind in prefix_kinds()]
    takers: dict[str, list] = {}  # option -> the kinds that take it
    for cls in kinds:
        for name in cls.cli_options:
            takers.setdefault(name, []).append(cls)
    for cls in kinds:
        t = train.add_parser(cls.kind, help=cls.summary)
        t.add_argument("--embedder", required=True)
        add_out_option(t)
        t.add_argument("--data", help="a COCO-style directory with train/ (captions.json, images) and val/")
        if cls.text_only:
            t.add_argument("--captions", nargs="+", help="caption corpora (text, JSON, JSONL, COCO, datasets dir)")
        t.add_argument("--init", help=f"a saved {cls.kind} decoder (a directory or a bundled decoder's name) to "
                       "train further, keeping its settings, tokenizer and bridge: e.g. more steps at a lower --lr")
        add_train_flags(t)
        add_validation_images_option(t)
        add_config_options(t, cls.config_class, cls.cli_options)
        # every other kind's options too, unlisted, so that one given here is refused by name
        others = {name: owners for name, owners in takers.items() if cls not in owners}
        for name, owners in others.items():
            add_config_options(t, owners[0].config_class, [name], hidden=True)
        t.set_defaults(func=cmd_train_prefix, other_kinds_options={
            name: (option_flag(owners[0].config_class, name), [o.kind for o in owners])
            for name, owners in others.items()})


def register(sub, decoders: bool = True) -> None:
    """`decoders=False` leaves out the per-decoder commands, which import every decoder module (torch):
    only `unembed train` (and the top-level help) needs them."""
    p = sub.add_parser("train", help="train an embedder or a decoder")
    train = p.add_subparsers(dest="what", required=True)
    t = train.add_parser("clip", help="train a small joint embedder from scratch (contrastive loss)")
    t.add_argument("--data", required=True, help="a scenes/COCO-style directory with train/ (and val/, test/)")
    add_out_option(t, "the embedder directory to write")
    t.add_argument("--arch", help="JSON (or a JSON file) of architecture options: image_size, embed_dim, "
                   "vision_width, text_width, text_layers, context_length")
    add_train_flags(t)
    add_workers_option(t)  # training images are read and augmented in N worker processes
    t.set_defaults(func=cmd_train_clip)
    if decoders:
        _add_prefix_kinds(train)

    if decoders:
        from unembed.decoders.corrector import CorrectorDecoder

        t = train.add_parser("corrector", help=CorrectorDecoder.summary)
        t.add_argument("--base", required=True, help="the text-only decoder it corrects (capdec, decap, viecap): a "
                       "directory or a bundled decoder's name")
        add_out_option(t)
        t.add_argument("--data", help="a COCO-style directory: train/ captions (and val/ images for validation)")
        t.add_argument("--captions", nargs="+", help="caption corpora (text, JSON, JSONL, COCO, datasets dir)")
        t.add_argument("--embedder", help="default: the base decoder's")
        t.add_argument("--max-captions", type=int, default=0, help="train on a seeded sample of this many distinct "
                       "captions (each costs the base one decode before training; default: all)")
        add_train_flags(t)
        add_validation_images_option(t)
        add_config_options(t, CorrectorDecoder.config_class, CorrectorDecoder.cli_options)
        t.set_defaults(func=cmd_train_corrector)

    t = train.add_parser("coca", help="CoCa: contrastive + captioning from scratch, or caption fine-tuning (--init)")
    t.add_argument("--data", required=True, help="a scenes/COCO-style directory with train/ (and val/, test/)")
    add_out_option(t, "written as a CoCa decoder, with the model in OUT/embedder/")
    t.add_argument("--init", help="fine-tune this open_clip CoCa (spec or directory) with the caption loss only")
    t.add_argument("--contrastive-weight", type=float, help="default 1 from scratch, 0 with --init")
    t.add_argument("--caption-weight", type=float, help="default 2 from scratch, 1 with --init")
    t.add_argument("--arch", help="JSON (or a JSON file) of architecture options: image_size, embed_dim, patch_size, "
                   "vision_width, vision_layers, text_layers, decoder_layers, image_tokens, context_length")
    add_train_flags(t)
    add_workers_option(t)
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
    add_train_flags(t)
    t.set_defaults(func=cmd_train_lm)
    # The old spellings of `unembed build retrieval|iterative` (no help line: not advertised).
    _add_retrieval(train.add_parser("retrieval"))
    _add_iterative(train.add_parser("iterative"))

    p = sub.add_parser("build", help="make a decoder that needs no training: retrieval's caption memory, or "
                       "iterative's LM + embedder package")
    build = p.add_subparsers(dest="what", required=True)
    _add_retrieval(build.add_parser("retrieval", help="the nearest-caption baseline from a caption corpus"))
    _add_iterative(build.add_parser("iterative", help="package an LM and an embedder as a training-free MAGIC decoder"))
    p = build.add_parser("ensemble", help="several decoders of one embedder as one: each writes candidates, the "
                         "embedder picks (with --rerank N, N from each)")
    p.add_argument("--member", required=True, action="append", metavar="DECODER",
                   help="a decoder directory or name; give it once per member, at least twice")
    p.add_argument("--embedder", help="default: the one the first member was built for")
    add_out_option(p)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_build_ensemble)
    p = build.add_parser("coca", help="a decoder over a pretrained open_clip CoCa, e.g. "
                         "coca_ViT-B-32:mscoco_finetuned_laion2b_s13b_b90k")
    p.add_argument("--embedder", required=True, help="the CoCa: an open_clip spec, hf-hub:ORG/NAME or a directory")
    add_out_option(p)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_build_coca)
