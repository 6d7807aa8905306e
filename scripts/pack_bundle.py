"""Pack a finished `unembed compare` run into the shipped bundle (unembed/bundle): the build step of
`make bundle` (scripts/bundle.sh: scenes data -> `unembed compare` at bundle size -> this script).

Packing keeps the compared models' weights in fp16, prunes the embedders' token tables to the scenes
vocabulary (`prune_vocabulary`: the same vectors for every image and every scenes caption), points
every decoder at the bundle's embedder, and records the comparison's scores in bundle.json.
It then captions up to 200 images of the compared split with each packed decoder and with the fp32
model it came from, records the share of identical captions and the CIDEr of each in bundle.json
("fp16_check"), and refuses to pack a decoder that falls below the stated bounds.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path

from unembed.bundle import BUNDLE_DIR, MANIFEST, MAX_BYTES
from unembed.errors import UnembedError
from unembed.io import load_tensors, read_json, save_tensors, write_json

# Beside config and weights; substitutes.json is what `--edits` rewrites with (unembed/decoders/edits.py).
DECODER_EXTRAS = ("tokenizer.json", "captions.json", "memory_captions.json", "substitutes.json", "edits.json")
SCORE_KEYS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "CLIPScore", "RefCLIPScore")
# Decoding options a later decoder format added, with the format that added them. upgrade_config
# keeps an older decoder writing what it wrote (the option off); but the bundle is what `make bundle`
# builds, and that sets no decoding option (scripts/bundle.json), so with the data to score them again
# `upgrade --data` gives the bundle's decoders each option's measured default instead.
ADOPTED_DEFAULTS = {"no_repeat_ngram_size": 4}
MERGED = "after `upgrade` gave it its entity counts (synonyms merged)"  # why bundle.json's scores were measured again
# fp16 weights and the pruned embedder against the fp32 originals, on this many images of the split:
CHECK_IMAGES = 200
MIN_AGREEMENT = 0.85     # the share of captions that must be identical (beam search flips on near-ties)
MAX_CIDER_CHANGE = 0.05  # |CIDEr(fp16) - CIDEr(fp32)|, CIDEr on its 0-10 scale (5 points on the 0-1000 one)


def pack(compare_dir, data_dir, out=BUNDLE_DIR, default: str | None = None) -> dict:
    """Pack a finished `unembed compare` run into a bundle directory (replaced as a whole)."""
    from unembed.data.splits import split_captions, split_dirs
    from unembed.embedders import Embedder, prune_vocabulary

    compare_dir, out = Path(compare_dir), Path(out)
    result = read_json(compare_dir / "compare.json")
    rows = [r for r in result["decoders"] if not r["error"]]
    if not rows:
        raise UnembedError(f"{compare_dir}/compare.json has no successful decoder to pack")
    splits = split_dirs(data_dir)
    vocabulary = [c for split in splits for c in split_captions(split)]
    staging = out.with_name(out.name + ".packing")
    shutil.rmtree(staging, ignore_errors=True)

    def small_embedder(path: Path, target: Path) -> str:
        pruned = prune_vocabulary(Embedder.load(path, device="cpu"), vocabulary)
        pruned.model.half()
        pruned.save(target)
        return pruned.id

    shared_id = small_embedder(Path(result["embedder"]), staging / "embedder")
    for row in rows:
        source, target = Path(row["path"]), staging / row["name"]
        if (source / "embedder" / "config.json").is_file():  # CoCa: the decoder's weights are its own embedder
            _copy_decoder(source, target, "embedder", small_embedder(source / "embedder", target / "embedder"))
        else:
            _copy_decoder(source, target, "../embedder", shared_id)
    best = max(rows, key=lambda r: r["metrics"].get("CIDEr") or 0)["name"]
    info = {"format": "unembed-bundle", "default": default or best, "decoders": [r["name"] for r in rows],
            "embedder": "embedder", "made_by": "make bundle", "data": "scenes world (unembed data scenes --seed 0)",
            "split": result["split"], "n_images": result["n_images"],
            "scores": {r["name"]: {**{k: r["metrics"].get(k) for k in SCORE_KEYS},
                                   "captions_per_second": r.get("captions_per_second"),
                                   "train_minutes": r.get("train_minutes")} for r in rows}}
    info["fp16_check"] = fp16_check(rows, staging, Path(data_dir) / result["split"])
    write_json(staging / MANIFEST, info)
    size = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
    if size > MAX_BYTES:
        raise UnembedError(f"the bundle is {size / 2 ** 20:.1f} MB, over the {MAX_BYTES / 2 ** 20:.0f} MB limit; "
                           f"train smaller models (scripts/bundle.json); left in {staging}")
    for code in out.glob("*.py"):  # the bundle directory is also a package: its loader stays
        shutil.copyfile(code, staging / code.name)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return dict(info, bytes=size)


def fp16_check(rows: list[dict], staging: Path, split_dir: Path) -> dict:
    """Captions of each packed decoder against its fp32 original on the split's first CHECK_IMAGES
    images: agreement and both CIDErs. Raises when a decoder is outside the bounds."""
    from unembed.data.splits import load_split
    from unembed.eval.metrics import coco_caption_metrics
    from unembed.pipeline import caption

    paths, references, ids = load_split(split_dir)
    paths, ids = [str(p) for p in paths[:CHECK_IMAGES]], [str(i) for i in ids[:CHECK_IMAGES]]
    references = dict(zip(ids, references))

    def cider(captions):
        return coco_caption_metrics(dict(zip(ids, captions)), references, spice=False, meteor=False)["CIDEr"]

    report, failures = {}, []
    for row in rows:
        fp32 = caption(paths, row["path"], device="cpu")
        fp16 = caption(paths, str(staging / row["name"]), device="cpu")
        agreement = sum(a == b for a, b in zip(fp32, fp16)) / len(paths)
        c32, c16 = cider(fp32), cider(fp16)
        report[row["name"]] = {"images": len(paths), "agreement": round(agreement, 4), "CIDEr_fp32": round(c32, 4),
                               "CIDEr_fp16": round(c16, 4), "CIDEr_change": round(c16 - c32, 4)}
        if agreement < MIN_AGREEMENT or abs(c16 - c32) > MAX_CIDER_CHANGE:
            failures.append(f"{row['name']} (agreement {agreement:.1%}, CIDEr {c32:.3f} -> {c16:.3f})")
    if failures:
        raise UnembedError(f"fp16 changes the captions of {', '.join(failures)} beyond the bounds (agreement >= "
                           f"{MIN_AGREEMENT:.0%}, CIDEr change <= {MAX_CIDER_CHANGE}); left in {staging}")
    return {"bounds": {"min_agreement": MIN_AGREEMENT, "max_CIDEr_change": MAX_CIDER_CHANGE}, "decoders": report}


def _copy_decoder(source: Path, target: Path, embedder_spec: str, embedder_id: str) -> None:
    """The decoder's files with fp16 weights, its config pointing at the bundle's embedder."""
    target.mkdir(parents=True, exist_ok=True)
    for name in DECODER_EXTRAS:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    tensors, metadata = load_tensors(source / "model.safetensors")
    if tensors:
        save_tensors(target / "model.safetensors",
                     {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, metadata)
    else:  # CoCa's holds none; safetensors writes an empty file with metadata as invalid JSON
        shutil.copyfile(source / "model.safetensors", target / "model.safetensors")
    saved = read_json(source / "config.json")
    saved["config"].update(embedder_spec=embedder_spec, embedder_id=embedder_id)
    refuse_machine_paths(saved, source / "config.json")
    write_json(target / "config.json", saved)


def refuse_machine_paths(value, where: Path, key: str = "") -> None:
    """A shipped config names no folder of the machine that built it: such a folder exists nowhere
    else, and a loader that followed it would fail (or worse, find something else) on every install."""
    if isinstance(value, dict):
        for k, v in value.items():
            refuse_machine_paths(v, where, f"{key}.{k}" if key else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            refuse_machine_paths(v, where, f"{key}[{i}]")
    elif isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
        raise UnembedError(f"{where}: {key} names the absolute path {value!r}; a bundle must not depend on the "
                           "machine that built it")


def upgrade(bundle: Path = BUNDLE_DIR, data_dir=None) -> list[str]:  # each decoder's name, and what it gained
    """Bring the bundle's decoder configs to this unembed's format without retraining: each config
    is read as a loader reads it (upgrade_config: where the LM's weights are, from the weights file)
    and written back with what the current format records; weights and other files stay as they are.
    With `data_dir` (the data the bundle was trained on), a decoder trained on captions that lacks the
    substitutes training now writes gets them, from the same captions (`substitutes`), and one without
    the edit margin training now chooses gets it, chosen on the same val split (`choose_edit_margin`);
    an entity-aware one without the counts of its entities in those captions (which name its synonym
    groups) gets them; and one saved before a decoding option existed gets its default (ADOPTED_DEFAULTS).
    A decoder that now writes other captions gets its margin chosen again and bundle.json's scores
    measured again."""
    from unembed.data.splits import split_captions
    from unembed.decoders import decoder_class, prefix_kinds
    from unembed.decoders.base import FORMAT_VERSION, read_decoder_config
    from unembed.decoders.edits import FILE, MARGIN_FILE, substitutes
    from unembed.entities import EntityVocabulary, entity_counts
    from unembed.lm import record_lm

    captions = split_captions(Path(data_dir) / "train") if data_dir else None
    table = substitutes(captions) if data_dir else None
    done, info = [], read_json(bundle / MANIFEST)
    for name in info["decoders"]:
        path = bundle / name
        saved = read_decoder_config(path)
        added, rescore = [], []  # what it gained; why it writes other captions now
        cls = decoder_class(saved["kind"])
        version = saved.get("format_version", 1)
        config = cls.config_class(**cls.upgrade_config(saved["config"], version, path))
        if hasattr(config, "lm_weights"):
            record_lm(config)
        if captions and hasattr(config, "has_entity_counts") and not config.has_entity_counts:
            config.entity_counts = entity_counts(EntityVocabulary(config.entities, config.entity_vocabulary), captions)[0]
            added.append("entity counts")
            rescore.append(MERGED)
        written = FORMAT_VERSION
        fields = {f.name: f for f in dataclasses.fields(config)}
        for option, since in ADOPTED_DEFAULTS.items():
            if version >= since or option not in fields:
                continue
            field = fields[option]
            default = field.default_factory() if field.default is dataclasses.MISSING else field.default
            if getattr(config, option) != default:
                if not captions:  # nothing to score it with: it stays before `since`, to be given it with --data
                    written = min(written, since - 1)
                    continue
                setattr(config, option, default)
                added.append(f"{option} {default}")
                rescore.append(f"after `upgrade` gave it {option} {default}, the default since format {since}")
        if rescore:
            (path / MARGIN_FILE).unlink(missing_ok=True)  # chosen on what it wrote before: chosen again below
            if name in info.get("scores", {}):  # noted first: an upgrade stopped before scoring scores it next time
                pending = info.get("unscored", {}).get(name, [])
                info.setdefault("unscored", {})[name] = list(dict.fromkeys(pending + rescore))
                write_json(bundle / MANIFEST, info)
        saved.update(format_version=written, config=config.to_dict())
        refuse_machine_paths(saved, path / "config.json")
        write_json(path / "config.json", saved)  # first: the margin below is chosen on what it decodes
        if table and saved["kind"] in prefix_kinds():
            if not (path / FILE).is_file():
                write_json(path / FILE, table)
                added.append(FILE)
            if not (path / MARGIN_FILE).is_file():
                record = _margin_chosen_on_val(path, Path(data_dir))
                if isinstance(record, str):  # why none could be chosen: the substitutes still count
                    added.append(f"no {MARGIN_FILE}: {record}")
                else:
                    write_json(path / MARGIN_FILE, record)
                    added.append(f"{MARGIN_FILE}, margin {record['margin']}")
        # it writes other captions now; also when an earlier upgrade stopped before scoring them
        reasons = info.get("rescored", {}).get(name, [])
        reasons = [reasons] if isinstance(reasons, str) else reasons  # one reason, as bundles kept it before
        rescore = list(info.get("unscored", {}).get(name, rescore))
        if version < 4 and getattr(config, "has_entity_counts", False) and config.entity_merge and not reasons:
            rescore.append(MERGED)  # counted by an upgrade of a bundle from before `unscored` (format 4) was kept
        if data_dir and rescore and name in info.get("scores", {}):
            info["scores"][name].update(_rescored(path, Path(data_dir), info))
            info.setdefault("rescored", {})[name] = reasons + [r for r in dict.fromkeys(rescore) if r not in reasons]
            info.get("unscored", {}).pop(name, None)
            if not info.get("unscored", True):
                del info["unscored"]
            write_json(bundle / MANIFEST, info)
            added.append(f"{info['split']} CIDEr now {info['scores'][name]['CIDEr']:.4f}")
        done.append(f"{name} (added {'; '.join(added)})" if added else name)
    return done


def _rescored(path: Path, data_dir: Path, info: dict) -> dict:
    """The scores pack records for the decoder at `path` (SCORE_KEYS; its speed stays the compare run's,
    measured in a fresh process), measured again on the bundle's split with the bundle's embedder."""
    import tempfile

    from unembed.compare import caption_job
    from unembed.data.splits import load_split
    from unembed.decoders import load_decoder
    from unembed.eval.scoring import score_decoders
    from unembed.pipeline import embed_split

    split_dir, n = data_dir / info["split"], info["n_images"]
    _, references, ids = (part[:n] for part in load_split(split_dir))
    if len(ids) < n:
        raise UnembedError(f"{split_dir} has {len(ids)} images; {path.name}'s scores in {MANIFEST} were measured on {n}")
    with tempfile.TemporaryDirectory() as tmp:
        done = caption_job(str(path), str(split_dir), None, n, 32, "cpu", str(Path(tmp) / "captions.jsonl"))
    embedder = load_decoder(path, device="cpu").embedder_for_rerank()
    rows = {path.name: {}}
    score_decoders(rows, {path.name: done["captions"]}, embedder, embed_split(embedder, split_dir).vectors[:n],
                   dict(zip(ids, references)), ids, spice=False, log=lambda _: None)
    return {k: rows[path.name]["metrics"].get(k) for k in SCORE_KEYS}


def _margin_chosen_on_val(path: Path, data_dir: Path) -> dict | str:
    """edits.json for the decoder at `path`, as training writes it (its margin chosen on data_dir/val),
    or why there is none."""
    from unembed.decoders import load_decoder
    from unembed.training.prefix import choose_edit_margin, validation_set

    decoder = load_decoder(path, device="cpu")
    validation = validation_set(decoder.embedder_for_rerank(), data_dir)
    return f"{data_dir} has no val split of images" if validation is None else choose_edit_margin(decoder, validation)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/pack_bundle.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="pack a finished `unembed compare` run into a bundle")
    p.add_argument("compare", help="the compare run's --out directory")
    p.add_argument("--data", required=True, help="the dataset it ran on (its captions give the vocabulary)")
    p.add_argument("--out", default=str(BUNDLE_DIR))
    p.add_argument("--default", help="the decoder `unembed caption` uses (default: best CIDEr)")
    u = sub.add_parser("upgrade", help="rewrite a bundle's decoder configs in the current format (no retraining)")
    u.add_argument("--out", default=str(BUNDLE_DIR), help="the bundle directory")
    u.add_argument("--data", help="the data it was trained on: adds the substitutes `--edits` needs, and the edit "
                                  "margin chosen on its val split, where missing; gives its decoders decoding "
                                  "defaults added since they were packed and scores those again in bundle.json")
    args = parser.parse_args(argv)
    try:
        if args.command == "upgrade":
            print(f"upgraded {', '.join(upgrade(Path(args.out), args.data))} in {args.out}")
            return 0
        info = pack(args.compare, args.data, args.out, args.default)
    except UnembedError as e:
        print(f"unembed: {e}", file=sys.stderr)
        return 2
    print(f"packed {', '.join(info['decoders'])} (default {info['default']}) into {args.out}: "
          f"{info['bytes'] / 2 ** 20:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
