"""Text-embedding inversion as a measured task: how well a decoder turns a caption's own embedding back
into that caption (what text-only decoders are trained to do, and what vec2text measures).

For each held-out caption: embed it with the decoder's embedder, decode the text embedding, and compare
    exact match   the decoded caption equals the caption (case, spacing and a final period aside);
    BLEU-4        pycocoevalcap's BLEU over lower-cased word tokens, the caption as the one reference;
    cosine        between the decoded caption's embedding and the target, the embedder's own verdict;
    embedder calls per caption: texts the embedder embedded while decoding (rerank candidates, a
                  corrector's hypotheses, MAGIC's per-token candidates); the target's own embedding
                  and the cosine's are not counted.
"""
from __future__ import annotations

import re
import time

import torch.nn.functional as F

from unembed.data.vectors import Embedded


def normalised(caption: str) -> str:
    return " ".join(caption.lower().strip().rstrip(".").split())


def words(caption: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", caption.lower()))


def bleu4(decoded: list[str], targets: list[str]) -> float:
    from pycocoevalcap.bleu.bleu import Bleu

    if not decoded:
        return 0.0
    gts = {i: [words(t)] for i, t in enumerate(targets)}
    res = {i: [words(d) or "empty"] for i, d in enumerate(decoded)}
    score, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return float(score[3])


def text_targets(embedder, captions: list[str]) -> Embedded:
    """The captions' own unit text embeddings, ids "0".."N-1": what an inverter decodes."""
    targets = F.normalize(embedder.embed_texts(captions).float(), dim=-1)
    return Embedded(targets, [str(i) for i in range(len(captions))], embedder.id, embedder.spec, "text")


def exact_matches(decoded: list[str], captions: list[str]) -> list[bool]:
    return [normalised(d) == normalised(c) for d, c in zip(decoded, captions)]


def invert(decoder, embedder, captions: list[str], batch_size: int = 64, **generation) -> dict:
    """Inversion scores of `decoder` over `captions` (see the module docstring), with examples."""
    decoder.check_options(generation)  # before the captions are embedded
    embedded = text_targets(embedder, captions)
    targets = embedded.vectors
    calls_before, start = embedder.texts_embedded, time.perf_counter()
    decoded = [c for s in range(0, len(captions), batch_size)
               for c in decoder.decode(embedded.select(slice(s, s + batch_size)), **generation)]
    seconds, calls = time.perf_counter() - start, embedder.texts_embedded - calls_before
    achieved = F.normalize(embedder.embed_texts(decoded).float(), dim=-1) if decoded else targets
    cosines = (achieved * targets).sum(-1)
    exact = exact_matches(decoded, captions)
    n = max(1, len(captions))
    misses = [{"target": c, "decoded": d} for c, d, ok in zip(captions, decoded, exact) if not ok][:5]
    return {"captions": len(captions), "exact_match": round(sum(exact) / n, 4), "BLEU-4": round(bleu4(decoded, captions), 4),
            "cosine": round(float(cosines.mean()) if len(cosines) else 0.0, 4),
            "embedder_calls_per_caption": round(calls / n, 2), "seconds_per_caption": round(seconds / n, 4),
            "generation": generation, "misses": misses}


def held_out_captions(split_dir, limit: int = 1000) -> list[str]:
    """The first caption of each image of a split (in Karpathy / COCO form), up to `limit`: captions no
    decoder trained on, one per image so that near-duplicates of one image do not dominate."""
    from unembed.data.splits import load_split

    _, per_image, _ = load_split(split_dir)
    return [caps[0] for caps in per_image if caps][:limit]


def format_inversion(name: str, scores: dict) -> str:
    return ("| decoder | captions | exact match | BLEU-4 | cosine | embedder calls / caption |\n"
            "|---|---:|---:|---:|---:|---:|\n"
            f"| {name} | {scores['captions']} | {100 * scores['exact_match']:.1f}% | {100 * scores['BLEU-4']:.1f} | "
            f"{scores['cosine']:.3f} | {scores['embedder_calls_per_caption']:g} |")

