"""`unembed import`: a published ClipCap, CapDec or DeCap checkpoint as an ordinary decoder."""
from __future__ import annotations

from unembed.cli.common import EXIT_OK, add_out_option, log


def cmd_import(args) -> int:
    from unembed.decoders.published import import_published

    memory = None
    if args.memory:
        from unembed.data.captions import load_captions

        memory = list(dict.fromkeys(c for path in args.memory for c in load_captions(path)))
    config = import_published(args.kind, args.file, args.out, embedder=args.embedder, lm=args.lm,
                              prefix_length=args.prefix_length, mapper=args.mapper, heads=args.heads,
                              memory_captions=memory, log=log, overwrite=args.overwrite)
    lm = config["lm"] if config["lm"] != "scratch" else f"a {config['lm_config']['n_layer']}-layer GPT-2"
    log(f"imported {args.file} as a {args.kind} decoder into {args.out}: {config['mapper']} mapper, "
        f"{config['prefix_length']}-token prefix, LM {lm}, embedder {config['embedder_spec']}")
    return EXIT_OK


def register(sub) -> None:
    p = sub.add_parser("import", help="turn a published ClipCap, CapDec or DeCap checkpoint (.pt) into a decoder; "
                       "the file is read with torch.load(weights_only=True) and only tensors are accepted")
    p.add_argument("kind", choices=["clipcap", "capdec", "decap"])
    p.add_argument("file", help="the checkpoint as the project released it")
    add_out_option(p, "the decoder directory to write: new, empty, or a decoder (with --overwrite)")
    p.add_argument("--embedder", help="the embedder it was trained on (default ViT-B-32:openai)")
    p.add_argument("--lm", help="clipcap/capdec: the LM it was built on, for its config and tokenizer (default gpt2)")
    p.add_argument("--prefix-length", type=int, help="check the prefix length the file's shapes give")
    p.add_argument("--mapper", choices=["mlp", "transformer"], help="check the mapper kind the file holds")
    p.add_argument("--heads", type=int, help="attention heads of its LM (default: the LM's config; decap: 4)")
    p.add_argument("--memory", nargs="+", help="decap: caption corpora for the projection memory (embedded with "
                   "--embedder)")
    p.set_defaults(func=cmd_import)
