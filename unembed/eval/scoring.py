"""Scoring a set of captions against references: COCO metrics and CLIPScore together, for one
decoder's results (`unembed eval`) or several side by side (`unembed compare`)."""
from __future__ import annotations

from pathlib import Path

import torch

from unembed.errors import BadInputError
from unembed.eval.metrics import clip_scores, coco_caption_metrics


def score_decoders(rows: dict, captions: dict, embedder, image_vecs, references: dict, ids: list, spice: bool, log,
                   meteor: bool = True, training: dict | None = None) -> dict:
    """COCO metrics, CLIPScore (the compare's embedder, on the shared image vectors) and diversity
    (against each decoder's training captions, `training` {name: captions}, where known) into each
    decoder's row; returns each decoder's captions and per-image CIDEr, by image id."""
    from unembed.eval.diversity import diversity, same_caption_warning

    per_image = {}
    for name, predicted in captions.items():
        if predicted is None:
            continue
        log(f"scoring {name}")
        metrics = coco_caption_metrics(predicted, references, spice=spice, meteor=meteor)
        ordered = [predicted.get(i, "") for i in ids]
        clip = clip_scores(embedder, image_vecs, ordered, [references[i] for i in ids], ids)
        per_image[name] = {"caption": predicted, "cider": metrics.pop("per_image")["CIDEr"]}
        metrics.update({k: v for k, v in clip.items() if k != "per_image"})
        rows[name]["unavailable"] = metrics.pop("unavailable")
        metrics.pop("skipped")
        rows[name]["metrics"] = metrics
        rows[name]["diversity"] = diversity(ordered, (training or {}).get(name))
        warning = same_caption_warning(name, rows[name]["diversity"])
        if warning:
            log(warning)
    return per_image


def clip_scores_for_refs(embedder, refs, predictions: dict, references: dict, workers: int = 0) -> dict:
    """CLIPScore / RefCLIPScore of `predictions` {image_id: caption}; the images are found through the
    refs file's images[].file_name (relative to the refs file)."""
    from unembed.io import read_json
    from unembed.data.images import iter_pixel_batches

    coco = read_json(refs)
    files = {im["id"]: Path(refs).parent / im["file_name"] for im in coco.get("images", []) if "file_name" in im}
    ids = [i for i in predictions if i in files and i in references]
    if not ids:
        raise BadInputError(refs, "its images[] give no file_name for the scored image ids, so CLIPScore cannot run")
    # no on_error: every scored image must load, or the scores would silently cover fewer
    image_vecs = torch.cat([embedder.embed_pixels(pixels, [str(p) for p in paths]).vectors for paths, pixels in
                            iter_pixel_batches([files[i] for i in ids], 64, embedder.preprocess, workers=workers,
                                               device=embedder.device)])
    result = clip_scores(embedder, image_vecs, [predictions[i] for i in ids], [references[i] for i in ids])
    result.pop("per_image", None)
    return result


def domain_scores(predictions: dict, references: dict, domains: dict, spice: bool = False,
                  meteor: bool = True) -> dict:
    """COCO metrics per domain (NoCaps: in-domain, near-domain, out-domain) and overall, for the
    predicted images whose references carry a domain: {domain: scores}."""
    found = {}
    for image, domain in domains.items():
        if image in predictions and image in references:
            found.setdefault(domain, []).append(image)
    scores = {}
    for domain in sorted(found):
        ids = found[domain]
        metrics = coco_caption_metrics({i: predictions[i] for i in ids}, {i: references[i] for i in ids}, spice=spice,
                                       meteor=meteor)
        scores[domain] = {k: v for k, v in metrics.items() if k not in ("per_image", "unavailable", "skipped")}
    if scores:
        ids = [i for part in found.values() for i in part]
        metrics = coco_caption_metrics({i: predictions[i] for i in ids}, {i: references[i] for i in ids}, spice=spice,
                                       meteor=meteor)
        scores["overall"] = {k: v for k, v in metrics.items() if k not in ("per_image", "unavailable", "skipped")}
    return scores
