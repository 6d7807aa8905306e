"""Caption metrics: the COCO caption evaluation, CLIPScore, and their input files.

`coco_caption_metrics` runs pycocoevalcap the way the COCO caption server does (PTB tokenizer on
both sides, then BLEU-1..4, METEOR, ROUGE-L, CIDEr and SPICE) and returns its raw fractions. A
metric that cannot run is reported as None with a reason under "unavailable", never as 0.
`clip_score` / `ref_clip_score` follow Hessel et al. 2021. `format_table` prints a Markdown table
in the x100 convention of papers. pycocoevalcap, torch and evaluate are imported only when used.
"""
from __future__ import annotations

import atexit

import json
import math
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Hashable, Mapping, Sequence

from unembed.errors import BadInputError, MismatchError, UnembedError
from unembed.io import read_json

COCO_METRIC_PATH = str(Path(__file__).with_name("coco_caption"))
CLIPSCORE_PROMPT = "A photo depicts "
TABLE_COLUMNS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE", "CLIPScore", "RefCLIPScore")
# SPICE parses with Stanford CoreNLP 3.6.0, which pycocoevalcap downloads (~400 MB) on first use.
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


# ---- COCO caption evaluation -------------------------------------------------------------

def coco_caption_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    spice: bool = True,
    meteor: bool = True,
) -> dict:
    """Score predicted captions against reference captions with pycocoevalcap.

    Only predicted images are scored; predicted ids with no reference are listed under "skipped".
    Returns {"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr", ["SPICE"], "per_image":
    {"CIDEr": {id: value}}, "unavailable": {metric: reason}, "skipped": [ids]}. CIDEr takes its
    idf from the scored images' references, so it needs many images (one image always scores 0).
    """
    _need_java()
    res, gts, skipped = _pair(predictions, references)
    package_dir = _pycocoevalcap_dir()
    _check_writable(package_dir / "tokenizer")
    res, gts = _tokenize(res), _tokenize(gts)

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=1 (its default) prints totals
    cider, cider_per_image = Cider().compute_score(gts, res)
    result = {f"BLEU-{n}": float(b) for n, b in enumerate(bleu, start=1)}
    if meteor:  # its JVM costs ~10 s, too much for validation during training
        result["METEOR"] = _meteor_score(gts, res)
    result["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    result["CIDEr"] = float(cider)
    result["unavailable"] = {}
    if spice:
        result["SPICE"], reason = _spice_score(gts, res, package_dir / "spice")
        if reason:
            result["unavailable"]["SPICE"] = reason
    # Cider scores images in the order of gts.keys()
    result["per_image"] = {"CIDEr": {i: float(s) for i, s in zip(gts, cider_per_image)}}
    result["skipped"] = skipped
    return result


def _need_java() -> None:
    if shutil.which("java") is None:
        raise UnembedError("pycocoevalcap needs Java (java not found on PATH); install a Java runtime, e.g. apt-get install default-jre")


def cider_of_each(prediction_sets: Mapping[Hashable, Mapping[Hashable, str]],
                  references: Mapping[Hashable, Sequence[str]]) -> dict:
    """CIDEr of each of several prediction sets for the same images ({set: CIDEr}), as
    coco_caption_metrics scores each alone, with two PTB tokenizer runs in all instead of two a set
    (each run starts a JVM): the references once, every set's captions together."""
    return {k: corpus for k, (corpus, _) in cider_by_image_of_each(prediction_sets, references).items()}


def cider_by_image_of_each(prediction_sets: Mapping[Hashable, Mapping[Hashable, str]],
                           references: Mapping[Hashable, Sequence[str]]) -> dict:
    """{set: (its CIDEr, {image id: that image's CIDEr})} as cider_of_each scores the sets. The corpus
    CIDEr is the mean of the images' (their document frequencies are the references', the same for every
    set), so two sets' per-image scores are paired differences of it."""
    _need_java()
    sets = list(prediction_sets)
    paired = [_pair(prediction_sets[k], references)[:2] for k in sets]
    _check_writable(_pycocoevalcap_dir() / "tokenizer")
    gts = _tokenize({i: refs for _, g in paired for i, refs in g.items()})
    res = _tokenize({(n, i): caption for n, (r, _) in enumerate(paired) for i, caption in r.items()})
    from pycocoevalcap.cider.cider import Cider

    out = {}
    for n, (k, (r, g)) in enumerate(zip(sets, paired)):
        corpus, by_image = Cider().compute_score({i: gts[i] for i in g}, {i: res[(n, i)] for i in r})
        out[k] = (float(corpus), {i: float(v) for i, v in zip(g, by_image)})  # in gts' order, as Cider scores
    return out


def _pair(predictions, references) -> tuple[dict, dict, list]:
    """Keep the predicted images that have references, in pycocoevalcap's {id: [{"caption"}]} form."""
    res, gts, skipped = {}, {}, []
    for image_id, caption in predictions.items():
        refs = references.get(image_id)
        if not refs:
            skipped.append(image_id)
            continue
        if isinstance(refs, str):  # a bare string would be read as a list of one-letter captions
            raise BadInputError(f"references of image {image_id!r}", "must be a list of captions, got one string")
        res[image_id] = [{"caption": _one_line(caption, f"prediction for image {image_id!r}")}]
        gts[image_id] = [{"caption": _one_line(r, f"a reference of image {image_id!r}")} for r in refs]
    if not res:
        example = f" (e.g. predicted id {next(iter(predictions))!r}, reference id {next(iter(references))!r})" if predictions and references else ""
        raise UnembedError(f"none of the {len(predictions)} predicted images has reference captions{example}")
    return res, gts, skipped


def _one_line(caption, what: str) -> str:
    if not isinstance(caption, str):
        raise BadInputError(what, f"caption must be a string, got {type(caption).__name__}")
    # The PTB tokenizer (Java) also breaks lines at \r, \f, \u2028 and friends, while pycocoevalcap
    # splits its output on \n only: one such character shifts every later caption onto the wrong
    # image. METEOR's line protocol has the same weakness. Tokens are unchanged by this.
    return " ".join(caption.split())


def _pycocoevalcap_dir() -> Path:
    try:
        from pycocoevalcap.tokenizer import ptbtokenizer
    except ImportError:
        raise UnembedError("COCO caption metrics need pycocoevalcap (pip install pycocoevalcap)") from None
    return Path(ptbtokenizer.__file__).parent.parent


def _check_writable(directory: Path) -> None:
    # PTBTokenizer writes its input to a temporary file inside its own package folder.
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise UnembedError(
            f"pycocoevalcap's PTB tokenizer writes temporary files into {directory}, which is not writable "
            f"({e.strerror or e}); install pycocoevalcap in a writable virtual environment"
        ) from None


def _tokenize(captions: dict) -> dict:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenized = PTBTokenizer().tokenize(captions)
    # pycocoevalcap ignores the tokenizer's exit status; a short output would silently drop images.
    if tokenized.keys() != captions.keys() or any(len(tokenized[i]) != len(c) for i, c in captions.items()):
        raise UnembedError("the PTB tokenizer (Java) returned fewer lines than captions; see its messages above")
    return tokenized


_METEOR = None  # one METEOR JVM per process, reused: starting one costs 6-10 s, a score milliseconds


def _meteor_score(gts: dict, res: dict) -> float:
    """Corpus METEOR from this process's METEOR JVM (started on first use, stopped at exit or when
    it fails; every call scores independently, so reuse changes no score).

    Empty hypotheses (empty or punctuation-only captions) are passed on unchanged, as the COCO
    evaluation does: METEOR 1.5 scores them 0 without hanging (checked). Hangs came from line breaks
    inside captions, which _one_line removes.
    """
    global _METEOR
    from pycocoevalcap.meteor.meteor import Meteor

    if _METEOR is None or _METEOR.meteor_p.poll() is not None:
        _METEOR = Meteor()
        atexit.register(_stop_meteor, _METEOR)
    meteor = _METEOR
    try:
        return float(meteor.compute_score(gts, res)[0])
    except (ValueError, OSError):  # the JVM died: an empty readline or a broken pipe
        _stop_meteor(meteor)
        _METEOR = None
        message = meteor.meteor_p.stderr.read().decode(errors="replace").strip()
        raise UnembedError(f"METEOR's Java process failed: {message.splitlines()[0] if message else 'no message'}") from None


def _stop_meteor(meteor) -> None:
    # Meteor only stops its JVM in __del__, which waits for its lock: if compute_score raised while
    # holding the lock, __del__ would deadlock at garbage collection, so release it here.
    if meteor.meteor_p.poll() is not None and meteor.meteor_p.stdin.closed:
        return
    if meteor.lock.locked():
        meteor.lock.release()
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()
    try:
        meteor.meteor_p.stdin.close()
    except BrokenPipeError:  # unflushed input to a process that is gone
        pass


def _spice_score(gts: dict, res: dict, spice_dir: Path) -> tuple[float | None, str | None]:
    """(mean SPICE F-score, None), or (None, reason) when SPICE cannot run here.

    Runs spice-1.0.jar like pycocoevalcap's Spice but never lets it download CoreNLP and omits
    "-cache": its LMDB parse cache fails on Java >= 16, and without it SPICE just parses afresh.
    """
    lib = spice_dir / "lib"
    if not all((lib / jar).is_file() for jar in CORENLP_JARS):
        return None, f"Stanford CoreNLP 3.6.0 jars missing in {lib}; SPICE downloads them on first use, which needs network"
    with tempfile.TemporaryDirectory() as tmp:
        in_file, out_file = Path(tmp, "in.json"), Path(tmp, "out.json")
        # positions as ids: any hashable image id works, and only the mean is needed
        records = [{"image_id": n, "test": res[i][0], "refs": gts[i]} for n, i in enumerate(gts)]
        in_file.write_text(json.dumps(records), encoding="utf-8")
        cmd = ["java", "-jar", "-Xmx8G", "spice-1.0.jar", str(in_file), "-out", str(out_file), "-subset", "-silent"]
        done = subprocess.run(cmd, cwd=spice_dir, capture_output=True, text=True, errors="replace")
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            return None, f"SPICE failed: {lines[0] if lines else f'exit status {done.returncode}'}"
        results = json.loads(out_file.read_text(encoding="utf-8"))
    # like pycocoevalcap: an undefined F-score (None) becomes NaN and so does the mean
    f_scores = [math.nan if r["scores"]["All"]["f"] is None else float(r["scores"]["All"]["f"]) for r in results]
    return sum(f_scores) / len(f_scores), None


# ---- Markdown table ----------------------------------------------------------------------

def format_table(rows: Mapping[str, Mapping[str, float | None]]) -> str:
    """One row per system; the TABLE_COLUMNS any row has, x100 with one decimal; None -> n/a."""
    columns = [c for c in TABLE_COLUMNS if any(c in metrics for metrics in rows.values())]
    lines = ["| System | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, metrics in rows.items():
        cells = ["n/a" if metrics.get(c) is None else f"{100 * metrics[c]:.1f}" for c in columns]
        name = name.replace("|", r"\|")  # a bar would end the cell
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- CLIPScore -----------------------------------------------------------------------------

def clip_score(image_vecs, caption_vecs, w: float = 2.5):
    """Per-item CLIP-S = w * max(cos(image, caption), 0); caption vectors embed CLIPSCORE_PROMPT + caption."""
    images, captions = _unit_rows(image_vecs), _unit_rows(caption_vecs).to(image_vecs.device)
    if images.shape != captions.shape:
        raise MismatchError(f"{images.shape[0]} image vectors of size {images.shape[-1]} vs {captions.shape[0]} caption vectors of size {captions.shape[-1]}")
    return w * (images * captions).sum(-1).clamp(min=0)


def ref_clip_score(image_vecs, caption_vecs, reference_vecs: list, w: float = 2.5):
    """Per-item RefCLIP-S: harmonic mean of CLIP-S and max(max_r cos(caption, reference_r), 0)."""
    import torch

    clip_s = clip_score(image_vecs, caption_vecs, w)
    if len(reference_vecs) != len(clip_s):
        raise MismatchError(f"{len(clip_s)} captions but reference vectors for {len(reference_vecs)} images")
    captions = _unit_rows(caption_vecs).to(clip_s.device)
    ref_s = torch.stack([(_unit_rows(r).to(clip_s.device) @ c).max() for c, r in zip(captions, reference_vecs)]).clamp(min=0)
    total = clip_s + ref_s
    # both parts 0 -> 0, where the paper's formula would divide 0 by 0
    return torch.where(total > 0, 2 * clip_s * ref_s / total.clamp(min=1e-12), torch.zeros_like(total))


def _unit_rows(vecs):
    import torch.nn.functional as F

    return F.normalize(vecs.float(), dim=-1)


def clip_scores(embedder, image_vecs, captions: list[str], references: list[list[str]] | None = None,
                image_ids: Sequence[Hashable] | None = None) -> dict:
    """{"CLIPScore": mean, ["RefCLIPScore": mean], "per_image": {metric: {id: value}}}.

    `embedder.embed_texts(list[str])` gives [N, D] text vectors; captions get CLIPSCORE_PROMPT and so
    do references, as in the paper's code (its extract_all_captions prefixes every text it embeds).
    Ids default to positions.
    """
    ids = list(range(len(captions))) if image_ids is None else list(image_ids)
    if len(ids) != len(captions):
        raise MismatchError(f"{len(ids)} image ids for {len(captions)} captions")
    caption_vecs = embedder.embed_texts([CLIPSCORE_PROMPT + c for c in captions])
    per_image = {"CLIPScore": clip_score(image_vecs, caption_vecs)}
    if references is not None:
        if len(references) != len(captions) or not all(references):
            raise MismatchError(f"RefCLIPScore needs at least one reference for each of the {len(captions)} captions")
        flat = [CLIPSCORE_PROMPT + r for refs in references for r in refs]
        ref_vecs = embedder.embed_texts(flat).split([len(refs) for refs in references])
        per_image["RefCLIPScore"] = ref_clip_score(image_vecs, caption_vecs, list(ref_vecs))
    result = {name: float(scores.mean()) for name, scores in per_image.items()}
    result["per_image"] = {name: dict(zip(ids, scores.tolist())) for name, scores in per_image.items()}
    return result


# ---- input files -------------------------------------------------------------------------

def load_results(path) -> dict:
    """{image_id: caption} from COCO results JSON ([{"image_id", "caption"}, ...]) or, for a
    .jsonl file, JSON Lines records with "image_id" (or "id") and "caption"."""
    if Path(path).suffix == ".jsonl":
        records = _read_json_lines(path)
    else:
        data = read_json(path)
        if not isinstance(data, list):
            raise BadInputError(path, 'expected a list of {"image_id", "caption"} records (COCO results format); JSON Lines files need the .jsonl suffix')
        records = [(f"record {n}", r) for n, r in enumerate(data)]
    captions, where_seen = {}, {}
    for where, record in records:
        image_id = _record_id(path, where, record, ("image_id", "id"))
        if image_id in captions:
            raise BadInputError(path, f"{where}: duplicate image_id {image_id!r} (first in {where_seen[image_id]})")
        captions[image_id], where_seen[image_id] = _record_caption(path, where, record), where
    if not captions:
        raise BadInputError(path, "has no captions")
    return captions


def load_references(path) -> dict:
    """{image_id: [captions]} from a COCO caption annotation file ({"images", "annotations"})."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise BadInputError(path, 'expected a COCO caption annotation file: an object with an "annotations" list')
    references = {}
    for n, ann in enumerate(data["annotations"]):
        where = f"annotation {n}"
        image_id, caption = _record_id(path, where, ann, ("image_id",)), _record_caption(path, where, ann)
        if not caption.strip():
            raise BadInputError(path, f"{where}: empty reference caption")
        references.setdefault(image_id, []).append(caption)
    if not references:
        raise BadInputError(path, "has no annotations (no reference captions)")
    uncaptioned = [img.get("id") for img in data.get("images", []) if isinstance(img, dict) and img.get("id") not in references]
    if uncaptioned:
        raise BadInputError(path, f"{len(uncaptioned)} images have no captions, e.g. image {uncaptioned[0]!r}")
    return references


def _read_json_lines(path) -> list[tuple[str, object]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(path, f"cannot read as UTF-8 text ({e})") from None
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise BadInputError(path, f"line {n}: malformed JSON ({e.msg})") from None
    return records


def _record_id(path, where: str, record, keys: tuple[str, ...]):
    if not isinstance(record, dict):
        raise BadInputError(path, f"{where}: expected an object, got {type(record).__name__}")
    image_id = next((record[k] for k in keys if k in record), None)
    if not isinstance(image_id, (int, str)) or isinstance(image_id, bool):
        raise BadInputError(path, f"{where}: missing or invalid {' or '.join(repr(k) for k in keys)} (an integer or string)")
    return image_id


def _record_caption(path, where: str, record) -> str:
    caption = record.get("caption")
    if not isinstance(caption, str):
        raise BadInputError(path, f"{where}: missing or non-string 'caption'")
    return caption


def load_coco_caption_metric(**kwargs):
    """evaluate.load(COCO_METRIC_PATH), importing evaluate through unembed's torchvision fix."""
    from unembed.compat import import_torchvision

    import_torchvision()  # evaluate imports transformers, which imports torchvision
    import evaluate

    return evaluate.load(COCO_METRIC_PATH, **kwargs)
