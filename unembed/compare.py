"""`unembed compare`: which decoder should I use on my embedder and my data?

For each decoder: train it on DATA/train (or take an existing decoder directory), caption the same
DATA/<split> images, score every decoder with the same metrics, and time it. One embedding pass of
the split serves every decoder built for the compare's embedder and the CLIPScores of all of them
(CoCa, its own embedder, decodes from its own pass of image tokens). Each training and each
captioning runs in a fresh process (forked from a server that has imported only torch,
transformers and open_clip), so its peak memory is its own and a decoder that fails is one
failed row, not a failed comparison. Writes into OUT:
    models/<name>/                 trained decoders (a complete one is reused when the run restarts)
    captions/<name>.jsonl          every decoder's captions
    compare.json, compare.md       the table (and everything the report shows)
    quality_vs_speed.png, report.html, gap.json, gap.png, images/
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

from unembed.errors import BadInputError, UnembedError

LM_OPTIONS = ("lm", "lm_config", "tokenizer", "max_caption_tokens", "simctg_margin")
THUMBNAIL = 256


@dataclasses.dataclass
class Entry:
    """One decoder of the comparison: a kind to train, or an existing directory."""

    name: str
    kind: str
    path: Path
    given: bool  # an existing decoder directory, not trained here
    variant_of: str = ""  # NAME=@OTHER: OTHER's model, decoded with NAME's own decoding options


def parse_decoders(spec: str, models_dir: Path) -> list[Entry]:
    """'retrieval,clipcap,mine=path/to/dir,nouns=viecap' -> entries; a bare directory is taken as it
    is, NAME=KIND trains another decoder of KIND under NAME (its --config options keyed by NAME),
    NAME=@OTHER decodes an earlier entry's model with NAME's own decoding options (a variant: rerank,
    beams...), and 'bundle' is every decoder of the shipped bundle, as they are."""
    from unembed.bundle import bundled_decoder, manifest
    from unembed.decoders import list_decoders, read_decoder_config

    entries = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "bundle" and not Path(item).is_dir():
            entries += [Entry(n, read_decoder_config(bundled_decoder(n))["kind"], bundled_decoder(n), True)
                        for n in manifest()["decoders"]]
            continue
        name, _, path = item.partition("=")
        if path.startswith("@"):
            other = next((e for e in entries if e.name == path[1:]), None)
            if other is None:
                raise BadInputError(item, f"is a variant of {path[1:]!r}, which no earlier entry names")
            entries.append(dataclasses.replace(other, name=name, given=True, variant_of=other.name))
            continue
        if not path and Path(name).is_dir():
            name, path = Path(name).name, name
        if path in list_decoders() and not Path(path).is_dir():
            entries.append(Entry(name, trained_here(item, path), models_dir / name, False))
        elif path:
            entries.append(Entry(name, read_decoder_config(path)["kind"], Path(path), True))
        elif name in list_decoders():
            entries.append(Entry(name, trained_here(item, name), models_dir / name, False))
        else:
            raise BadInputError(item, f"is neither a decoder kind ({', '.join(list_decoders())}) nor a decoder directory")
    if len({e.name for e in entries}) < len(entries):
        raise BadInputError(spec, "names a decoder twice")
    return entries


def trained_here(item: str, kind: str) -> str:
    """`kind`, if compare trains it (train_job): not one made over other saved decoders."""
    from unembed.decoders import decoder_class

    how = decoder_class(kind).made_from_others
    if how:
        raise BadInputError(item, f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} decoder is made from other decoders "
                                  f"({how}), not trained by compare: give its directory (NAME=DIR)")
    return kind


def recipe(name: str, kind: str, overrides: dict, max_steps: int | None) -> dict:
    """Scenes-sized training options: the decoder's own `compare_recipe` (keys are TrainConfig fields
    or the method's options), then `--config` overrides per decoder name, then --max-steps."""
    from unembed.decoders import decoder_class

    options = {**(decoder_class(kind).compare_recipe if kind != "embedder" else {}),
               **training_options(overrides.get(name, {}))}
    if max_steps:
        options["max_steps"] = max_steps
    return options


def training_options(options: dict) -> dict:
    """A decoder's --config options without its decoding options (unembed/generation.py)."""
    from unembed.generation import GENERATION_OPTIONS

    return {k: v for k, v in options.items() if k not in GENERATION_OPTIONS}


def decoding_options(entry: Entry, overrides: dict, entries: list[Entry]) -> dict:
    """A decoder's decoding options from --config (rerank, num_beams...), checked against its kind and,
    for edits, against whether the model will have the substitutes they need."""
    from unembed.decoders import decoder_class
    from unembed.decoders.edits import no_substitutes
    from unembed.generation import GENERATION_OPTIONS

    given = {k: v for k, v in overrides.get(entry.name, {}).items() if k in GENERATION_OPTIONS}
    try:
        options = decoder_class(entry.kind).check_generation(given)
        if options.get("edits") and not _will_have_substitutes(entry, entries):
            raise no_substitutes(f"{entry.name} (a {entry.kind} decoder)")
        return options
    except BadInputError as e:
        raise BadInputError(f"--config {entry.name}", str(e)) from None


def _will_have_substitutes(entry: Entry, entries: list[Entry]) -> bool:
    """Whether the model an entry decodes will have its substitutes table (what `edits` rewrites with):
    trained here, when its kind learns one from its captions; given, when its directory holds one."""
    from unembed.decoders import decoder_class, prefix_kinds
    from unembed.decoders.edits import FILE

    model = next(e for e in entries if e.name == entry.variant_of) if entry.variant_of else entry
    if "edits" in decoder_class(model.kind).generation_options:  # the corrector: edits are its own option
        return True
    return (model.path / FILE).is_file() if model.given else model.kind in prefix_kinds()


# --- work done in fresh processes -----------------------------------------------------------------

def _peak_memory_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is in KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _fresh_process_context():
    """A fork server that has imported only the heavy libraries (unembed/preload.py): each job forks
    from it, a fresh process with nothing of this one (no CUDA, no threads) and no imports to repeat."""
    if "forkserver" not in get_all_start_methods():  # Windows
        return get_context("spawn")
    context = get_context("forkserver")
    context.set_forkserver_preload(["unembed.preload"])
    return context


def _in_fresh_process(function, *args) -> dict:
    """Run function(*args) in a new process; its exceptions come back as {"error": line}."""
    with ProcessPoolExecutor(max_workers=1, mp_context=_fresh_process_context()) as pool:
        return pool.submit(_guarded, function, *args).result()


def _guarded(function, *args) -> dict:
    try:
        return function(*args)
    except UnembedError as e:
        return {"error": str(e)}
    except Exception as e:  # a failed decoder is one row of the table; the others still run
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def _train_config(options: dict, device: str):
    from unembed.training.loop import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in options.items() if k in fields}, device=device)
    return config, {k: v for k, v in options.items() if k not in fields}


def train_job(kind: str, out_dir: str, data_dir: str, embedder_spec: str, options: dict, device: str) -> dict:
    """Train one decoder (or, kind "embedder", the scenes CLIP) into out_dir."""
    from unembed.data.splits import split_captions

    t0 = time.perf_counter()
    config, options = _train_config(options, device)
    data = Path(data_dir)
    if kind == "embedder":
        from unembed.embedders import scenes_config
        from unembed.training.clip import train_clip

        train_clip(data, out_dir, config, arch=scenes_config(**options.get("arch", {})), progress=False)
    elif kind == "coca":
        from unembed.training.coca import scenes_coca_config, train_coca

        train_coca(data, out_dir, config, arch=scenes_coca_config(**options.pop("arch", {})), progress=False, **options)
    else:
        from unembed.embedders import load_embedder

        embedder = load_embedder(embedder_spec, device)
        if kind == "retrieval":
            from unembed.decoders.retrieval import RetrievalDecoder

            RetrievalDecoder.build(embedder, split_captions(data / "train"), **options).save(out_dir)
        elif kind == "iterative":
            _train_iterative(embedder, data, Path(out_dir), config, options)
        else:
            from unembed.training.prefix import train_prefix

            train_prefix(kind, embedder, out_dir, config, data_dir=data, progress=False, **options)
    return {"train_minutes": round((time.perf_counter() - t0) / 60, 4), "train_peak_memory_mb": _peak_memory_mb()}


def _train_iterative(embedder, data: Path, out_dir: Path, config, options: dict) -> None:
    """Train the LM on DATA's captions (unless the recipe names an existing one), then package it."""
    from unembed.data.captions import caption_corpus
    from unembed.decoders.iterative import IterativeDecoder
    from unembed.training.lm import train_lm

    lm_options = {k: options.pop(k) for k in LM_OPTIONS if k in options}
    lm = lm_options.get("lm", "scratch")
    if lm == "scratch":
        lm = str(out_dir.with_name(out_dir.name + "-lm"))  # the trained LM's directory
        captions, validation = caption_corpus((), data)
        train_lm(captions, lm, config, validation_captions=validation, progress=False, **lm_options)
    IterativeDecoder.build(embedder, lm=lm, **options).save(out_dir)


def caption_job(decoder_dir: str, split_dir: str, shared_pass: str | None, max_images: int, batch_size: int,
                device: str, out_file: str, workers: int = 0, dtype: str = "fp32", generation: dict | None = None) -> dict:
    """Caption the split with one decoder, from the shared pass when the decoder was built for its
    embedder, else from the decoder's own embedder's pass (CoCa's image tokens)."""
    from unembed.data.ids import IdIndex
    from unembed.data.splits import split_file
    from unembed.pipeline import embed_split
    from unembed.decoders import load_decoder
    from unembed.embedders import Embedded, same_embedder
    from unembed.io import atomic_path
    from unembed.pipeline import caption_embeddings, inference_precision

    decoder = load_decoder(decoder_dir, device=device)
    t0 = time.perf_counter()
    embedded = Embedded.load(shared_pass) if shared_pass else None
    if embedded is None or decoder.needs_tokens or not same_embedder(embedded.embedder_id, decoder.config.embedder_id):
        from unembed.embedders import load_embedder
        from unembed.decoders import resolve_embedder_spec

        embedder = decoder.embedder if decoder.needs_embedder else load_embedder(
            resolve_embedder_spec(decoder.config.to_dict(), decoder_dir), device)
        embedded = embed_split(embedder, split_dir, with_tokens=decoder.needs_tokens, workers=workers)
    embedded = embedded.select(range(min(max_images, len(embedded))))
    embed_seconds = time.perf_counter() - t0
    ids = IdIndex.from_file(split_file(split_dir))  # the split's own ids, not the embeddings' text of them
    t0 = time.perf_counter()
    with inference_precision(dtype, device):  # decoding only: split embeddings are cached, and stay fp32
        records = [r for batch in caption_embeddings(embedded, decoder, batch_size, ids, **(generation or {}))
                   for r in batch]
        seconds = time.perf_counter() - t0
    with atomic_path(out_file) as tmp:
        Path(tmp).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    peak = _peak_memory_mb()
    if str(device).startswith("cuda"):
        import torch

        peak = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return {"captions": {r["image_id"]: r["caption"] for r in records}, "decode_seconds": round(seconds, 3),
            "embed_seconds": round(embed_seconds, 3), "captions_per_second": round(len(records) / max(seconds, 1e-9), 2),
            "peak_memory_mb": peak}


# --- the comparison -------------------------------------------------------------------------------

def compare(data_dir, decoders: str, out_dir, embedder: str | None = None, split: str = "test",
            config: dict | None = None, max_steps: int | None = None, max_images: int | None = None,
            batch_size: int = 64, device: str = "auto", spice: bool = True, gap: bool = True, meteor: bool = True,
            workers: int = 0, dtype: str = "fp32", log=lambda message: None) -> dict:
    """Run the comparison and write its files into out_dir; returns the result (compare.json)."""
    from unembed.data.splits import has_split, image_domains, load_split, split_captions, split_file
    from unembed.eval.scoring import domain_scores, score_decoders
    from unembed.embedders import resolve_device

    start = time.perf_counter()
    data, out = Path(data_dir), Path(out_dir)
    split_dir = data / split
    if not has_split(data, split):
        raise BadInputError(split_dir, "has no captions.json to compare on")
    overrides = config or {}
    entries = parse_decoders(decoders, out / "models")
    generation = {e.name: decoding_options(e, overrides, entries) for e in entries}  # refused before anything trains
    device = str(resolve_device(device))
    embedder_spec, embedder_minutes = _embedder(embedder, data, out, overrides, max_steps, device, log)
    rows = {e.name: {"name": e.name, "kind": e.kind, "path": str(e.path), "metrics": {}, "train_minutes": None,
                     "error": None} for e in entries}
    for e in entries:
        if not e.given:
            rows[e.name].update(_train(e, data, embedder_spec, recipe(e.name, e.kind, overrides, max_steps), device, log))
        elif e.variant_of:
            rows[e.name].update(error=rows[e.variant_of]["error"], train_minutes=rows[e.variant_of]["train_minutes"])
        if generation[e.name]:
            rows[e.name]["generation"] = generation[e.name]

    shared = _shared_pass(embedder_spec, split_dir, device, log, workers)
    n_images = min(max_images or len(shared["embedded"]), len(shared["embedded"]))
    captions = {}
    for e in entries:
        if rows[e.name]["error"]:
            continue
        log(f"captioning {n_images} {split} images with {e.name}")
        done = _in_fresh_process(caption_job, str(e.path), str(split_dir), shared["path"], n_images, batch_size,
                                 device, str(out / "captions" / f"{e.name}.jsonl"), workers, dtype, generation[e.name])
        captions[e.name] = done.pop("captions", None)
        rows[e.name].update(done)
    paths, references, ids = (part[:n_images] for part in load_split(split_dir))
    references = dict(zip(ids, references))
    # the novel-caption share, for the decoders trained here on DATA/train (a given decoder's data is unknown)
    train_captions = split_captions(data / "train") if has_split(data, "train") else None
    trained_here = {e.name for e in entries if not e.given}
    training = {e.name: train_captions for e in entries if e.name in trained_here or e.variant_of in trained_here}
    per_image = score_decoders(rows, captions, shared["embedder"], shared["embedded"].vectors[:n_images], references, ids,
                               spice, log, meteor, training)
    domains = image_domains(split_file(split_dir))
    for name, predicted in captions.items():
        if domains and predicted is not None:  # NoCaps: in-, near- and out-of-domain scores
            rows[name]["domains"] = domain_scores(predicted, references, domains, meteor=meteor)
    result = {"decoders": list(rows.values()), "n_images": n_images, "data": str(data), "split": split,
              "embedder": embedder_spec, "embedder_train_minutes": embedder_minutes,
              "embed_seconds": shared["seconds"], "device": _device_name(device),
              "images": _image_records(per_image, paths, ids, references, out)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    _write_json(result, out)  # the numbers are safe before the diagnostic and the report run
    if gap:
        result["gap"] = _gap(shared["embedder"], data, split, out, log)
    result["seconds"] = round(time.perf_counter() - start, 1)
    _write_json(result, out)
    from unembed.eval.report import write_report

    write_report(result, out)
    return result


def _embedder(spec, data: Path, out: Path, overrides: dict, max_steps, device: str, log) -> tuple[str, float | None]:
    if spec:
        return spec, None
    entry = Entry("embedder", "embedder", out / "models" / "embedder", False)
    done = _train(entry, data, "", recipe("embedder", "embedder", overrides, max_steps), device, log)
    if "error" in done:
        raise UnembedError(f"training the embedder failed: {done['error']}")
    return str(entry.path), done["train_minutes"]


def _train(entry: Entry, data: Path, embedder_spec: str, options: dict, device: str, log) -> dict:
    """Train in a fresh process, or reuse what an earlier run of the same command trained."""
    from unembed.io import write_json

    from unembed.data.splits import split_fingerprint

    record = entry.path / "compare_train.json"
    made_from = {"recipe": options, "embedder": embedder_spec, "data": split_fingerprint(data / "train")}
    if (entry.path / "config.json").is_file() and record.is_file():
        earlier = json.loads(record.read_text())
        if earlier.get("made_from") == json.loads(json.dumps(made_from)):
            log(f"{entry.name}: reusing {entry.path}")
            return earlier["result"]
        log(f"{entry.name}: retraining: {entry.path} was trained with another recipe, embedder or data")
    log(f"training {entry.name} into {entry.path}")
    done = _in_fresh_process(train_job, entry.kind, str(entry.path), str(data), embedder_spec, options, device)
    if "error" in done:
        log(f"{entry.name}: training failed: {done['error']}")
    else:
        write_json(record, {"made_from": made_from, "result": done})
    return done


def _shared_pass(embedder_spec: str, split_dir: Path, device: str, log, workers: int = 0) -> dict:
    """The one embedding pass of the split (cached beside it), and the embedder for CLIPScore."""
    from unembed.data.splits import split_cache
    from unembed.pipeline import embed_split
    from unembed.embedders import load_embedder

    embedder = load_embedder(embedder_spec, device)
    log(f"embedding {split_dir} with {embedder_spec}")
    t0 = time.perf_counter()
    embedded = embed_split(embedder, split_dir, workers=workers)
    return {"embedder": embedder, "embedded": embedded, "seconds": round(time.perf_counter() - t0, 2),
            "path": str(split_cache(split_dir, embedder.id))}


def _image_records(per_image: dict, paths: list, ids: list, references: dict, out: Path) -> list[dict]:
    """Per-image rows for the report, with thumbnails copied beside it (the report moves with OUT)."""
    return [{"id": image, "file": _thumbnail(path, out / "images"), "references": references[image],
             "captions": {n: d["caption"].get(image, "") for n, d in per_image.items()},
             "cider": {n: d["cider"].get(image, 0.0) for n, d in per_image.items()}}
            for path, image in zip(paths, ids)]


def _thumbnail(path: Path, folder: Path) -> str:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    with Image.open(path) as im:
        if max(im.size) <= THUMBNAIL:
            shutil.copyfile(path, target)
        else:
            target = target.with_suffix(".jpg")
            im.convert("RGB").resize(_fit(im.size)).save(target, quality=85)
    return f"images/{target.name}"


def _fit(size: tuple[int, int]) -> tuple[int, int]:
    scale = THUMBNAIL / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _gap(embedder, data: Path, split: str, out: Path, log) -> dict | None:
    from unembed.eval.gap import gap_report

    log("measuring the modality gap")
    try:
        return gap_report(embedder, data, split=split, out_dir=out)
    except UnembedError as e:
        log(f"modality gap not measured: {e}")
        return None


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def _write_json(result: dict, out: Path) -> None:
    from unembed.io import write_json

    result["plot"] = "quality_vs_speed.png"
    write_json(out / "compare.json", result)
