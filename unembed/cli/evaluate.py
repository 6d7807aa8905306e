"""`unembed eval`, `compare`, `gap` and `demo`: scoring captions, comparing decoders, measuring the
modality gap, and showing the bundled decoders side by side."""
from __future__ import annotations

from pathlib import Path

from unembed.cli.common import (EXIT_OK, EXIT_PARTIAL, add_dtype_option, add_generation_options, add_workers_option,
                                err, exit_code, json_arg, log)


def cmd_eval(args) -> int:
    if args.invert:
        return cmd_invert(args)
    if not (args.results and args.refs):
        from unembed.errors import BadInputError

        raise BadInputError("eval", "needs --results FILE and --refs FILE (or --invert --data DIR to score inversion)")
    from unembed.data.ids import IdIndex
    from unembed.eval.metrics import coco_caption_metrics, format_table, load_references, load_results
    from unembed.io import write_json

    references = load_references(args.refs)
    # raw file names (COCO_val2014_000000391895, scenes' 000012) find their ids through the refs' images[]
    predictions = IdIndex.from_file(args.refs).rename(load_results(args.results), args.results)
    partial = _report_coverage(predictions, references, args.allow_partial)
    scores = coco_caption_metrics(predictions, references, spice=not args.no_spice, meteor=not args.no_meteor)
    if args.embedder:
        from unembed.embedders import load_embedder
        from unembed.eval.scoring import clip_scores_for_refs

        scores.update(clip_scores_for_refs(load_embedder(args.embedder, args.device), args.refs, predictions, references,
                                           args.workers))
    name = args.name or Path(args.results).stem
    from unembed.eval.diversity import diversity, same_caption_warning

    training = None
    if args.train_captions:
        from unembed.data.captions import load_captions

        training = [c for path in args.train_captions for c in load_captions(path)]
    scores["diversity"] = diversity([predictions[i] for i in sorted(predictions, key=str) if i in references], training)
    from unembed.data.splits import image_domains
    from unembed.eval.scoring import domain_scores

    by_domain = domain_scores(predictions, references, image_domains(args.refs), spice=not args.no_spice,
                              meteor=not args.no_meteor)
    if by_domain:
        scores["domains"] = by_domain
    print(format_table({name: scores, **{f"{name} {d}": s for d, s in by_domain.items()}}))
    for metric, reason in scores.get("unavailable", {}).items():
        log(f"{metric} unavailable: {reason}")
    log(_diversity_line(scores["diversity"]))
    if same_caption_warning(name, scores["diversity"]):
        log(same_caption_warning(name, scores["diversity"]))
    if args.out:
        write_json(args.out, {"results": str(args.results), "refs": str(args.refs), "scores": scores})
    return EXIT_PARTIAL if partial else EXIT_OK


def cmd_invert(args) -> int:
    """Decode the text embeddings of a split's held-out captions and score how well they come back."""
    from unembed.cli.caption import _decoder_dir
    from unembed.cli.common import generation_args
    from unembed.decoders import decoder_class, load_decoder, read_decoder_config, resolve_embedder_spec
    from unembed.embedders import load_embedder
    from unembed.errors import BadInputError
    from unembed.eval.inversion import format_inversion, held_out_captions, invert
    from unembed.io import write_json

    if not args.data:
        raise BadInputError("eval --invert", "needs --data DIR (its --split's captions are inverted)")
    split_dir = Path(args.data) / args.split
    if not (split_dir / "captions.json").is_file():
        raise BadInputError(str(split_dir), "no captions.json: not a split of a data directory")
    decoder_dir = _decoder_dir(args.decoder)
    saved = read_decoder_config(decoder_dir)
    generation = generation_args(args)
    decoder_class(saved["kind"]).check_generation(generation)  # before any model loads
    embedder = load_embedder(args.embedder or resolve_embedder_spec(saved["config"], decoder_dir), args.device)
    decoder = load_decoder(decoder_dir, device=str(embedder.device), embedder=embedder)
    captions = held_out_captions(split_dir, args.max_captions)
    scores = invert(decoder, embedder, captions, args.batch_size, **generation)
    name = args.name or Path(decoder_dir).name
    print(format_inversion(name, scores))
    for miss in scores["misses"][:3]:
        log(f"miss: {miss['target']!r} -> {miss['decoded']!r}")
    if args.out:
        write_json(args.out, {"decoder": str(decoder_dir), "data": str(split_dir), "inversion": scores})
    return EXIT_OK


def _diversity_line(d: dict) -> str:
    novel = "" if d["novel_share"] is None else f", {d['novel_share']:.0%} not in the training captions"
    if d["unique_share"] is None:
        return "diversity: no captions scored"
    return (f"diversity: {d['unique_share']:.0%} unique captions, {d['vocabulary']} distinct words, "
            f"{d['mean_words']:.1f} words per caption{novel}")


def _report_coverage(predictions: dict, references: dict, allow_partial: bool) -> bool:
    """One line of how the predictions met the references; whether the scores cover less than both,
    which is a failure unless --allow-partial (the scores would silently describe a subset)."""
    from unembed.data.ids import coverage

    matched, unreferenced, unpredicted = coverage(predictions, references)
    line = (f"{matched} of {len(predictions)} predictions matched references; {len(unreferenced)} predictions have "
            f"no references{f' (e.g. image {unreferenced[0]!r})' if unreferenced else ''}; {len(unpredicted)} of "
            f"{len(references)} reference images have no prediction"
            f"{f' (e.g. image {unpredicted[0]!r})' if unpredicted else ''}")
    if not matched:
        from unembed.errors import UnembedError

        raise UnembedError(f"{line}: nothing to score")
    if not (unreferenced or unpredicted) or allow_partial:
        log(line)
        return False
    err(f"{line}; scored the {matched} matched (--allow-partial accepts this)")
    return True


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
    log(f"wrote {len(images)} scenes images to {out}; the bundle knows only the scenes world")
    return EXIT_OK


# --- compare / gap ------------------------------------------------------------------------------

def cmd_compare(args) -> int:
    from unembed.compare import compare
    from unembed.eval.report import markdown_table

    result = compare(args.data, args.decoders, args.out, embedder=args.embedder, split=args.split,
                     config=json_arg(args.config) if args.config else None, max_steps=args.max_steps,
                     max_images=args.max_images, batch_size=args.batch_size, device=args.device,
                     spice=not args.no_spice, gap=not args.no_gap, meteor=not args.no_meteor, workers=args.workers,
                     dtype=args.dtype, log=log)
    print(markdown_table(result))
    failed = [row for row in result["decoders"] if row["error"]]
    for row in failed:
        err(f"{row['name']} failed: {row['error']}")
    log(f"compared {len(result['decoders'])} decoders on {result['n_images']} {result['split']} images in "
         f"{result['seconds'] / 60:.1f} min; report: {Path(args.out) / 'report.html'}")
    return exit_code(len(result["decoders"]) - len(failed), len(failed))


def cmd_gap(args) -> int:
    from unembed.embedders import load_embedder
    from unembed.eval.gap import format_gap, gap_report

    result = gap_report(load_embedder(args.embedder, args.device), args.data, split=args.split, out_dir=args.out,
                        max_pairs=args.max_pairs)
    print(format_gap(result))
    log(f"wrote {Path(args.out) / 'gap.json'} and {Path(args.out) / 'gap.png'}")
    return EXIT_OK


def register(sub) -> None:
    p = sub.add_parser("eval", help="score captions with COCO metrics (and CLIPScore with --embedder); with --invert, "
                       "score how well a decoder inverts text embeddings")
    p.add_argument("--results", help="COCO results JSON or caption JSON Lines")
    p.add_argument("--refs", help="COCO caption annotation file")
    p.add_argument("--embedder", help="also compute CLIPScore / RefCLIPScore with this embedder (--invert: the "
                   "embedder to invert; default the decoder's)")
    inversion = p.add_argument_group("inversion (--invert): decode the text embeddings of held-out captions")
    inversion.add_argument("--invert", action="store_true", help="score exact match, BLEU-4, cosine and embedder "
                           "calls per caption of --decoder on --data's --split captions")
    inversion.add_argument("--decoder", help="decoder directory or name (default: the bundle's)")
    inversion.add_argument("--data", help="a data directory; its --split's first caption per image is inverted")
    inversion.add_argument("--split", default="test", help="the split whose captions are inverted")
    inversion.add_argument("--max-captions", type=int, default=1000, help="invert at most this many captions")
    inversion.add_argument("--batch-size", type=int, default=64, help="text embeddings decoded at once")
    add_generation_options(p)
    p.add_argument("--name", help="row name in the table")
    p.add_argument("--train-captions", nargs="+", help="the captions the decoder was trained on (a caption corpus: "
                   "text, JSON Lines, COCO captions.json such as DATA/train/captions.json): adds the share of "
                   "captions that are not among them (novel captions)")
    p.add_argument("--no-spice", action="store_true")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (its Java process takes 6-10 s to start)")
    p.add_argument("--out", help="write the scores as JSON here")
    p.add_argument("--allow-partial", action="store_true", help="predictions without references, or reference "
                   "images without a prediction, are not a failure (exit 0; the counts are still printed)")
    p.add_argument("--device", default="auto")
    add_workers_option(p)
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
    p.add_argument("--decoders", default="retrieval,clipcap,capdec,decap,viecap,iterative,coca",
                   help="comma-separated decoder kinds to train, NAME=DIR for existing decoder directories, or "
                        "NAME=KIND for another decoder of KIND (its --config options keyed by NAME), NAME=@OTHER for an "
                        "earlier entry's model decoded with NAME's --config decoding options (e.g. rerank), or bundle: "
                        "every shipped decoder as it is (with --embedder bundle)")
    p.add_argument("--embedder", help="embedder spec (default: train a scenes CLIP on DATA into OUT/models/embedder)")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--config", help="JSON (or a JSON file) of training and decoding options per decoder name, e.g. "
                   "'{\"clipcap\": {\"max_steps\": 1000}, \"capdec8\": {\"rerank\": 8}}'")
    p.add_argument("--max-steps", type=int, help="training steps for every model (overrides the recipes)")
    p.add_argument("--max-images", type=int, help="caption only the first N images of the split")
    p.add_argument("--batch-size", type=int, default=64, help="captioning batch size")
    p.add_argument("--no-spice", action="store_true")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (its Java process takes 6-10 s to start)")
    p.add_argument("--no-gap", action="store_true", help="skip the modality-gap diagnostic")
    p.add_argument("--device", default="auto")
    add_workers_option(p)
    add_dtype_option(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("gap", help="measure the modality gap of an embedder on a dataset, and what bridges close it")
    p.add_argument("--embedder", required=True)
    p.add_argument("--data", required=True, help="a COCO-style directory (train/ captions feed the projection memory)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default="gap", help="folder for gap.json and gap.png (default ./gap)")
    p.add_argument("--max-pairs", type=int, default=1000)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_gap)
