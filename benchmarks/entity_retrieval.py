"""IFCap's entity filter against ViECap's zero-shot detection, on the scenes world: issue 14's retrieval ablation.

IFCap (Lee et al., EMNLP 2024; boreng0817/IFCap, src/entity_filtering.py and src/validation.py) finds an
image's entities by retrieval instead of zero-shot classification: the image embedding retrieves its
L nearest training captions (by cosine, in the embedder's text space), the nouns of those captions are
counted, and the nouns counted at least tau times form the hard prompt, most frequent first. COCO's
setting is L = 9, tau = 5 (Flickr30k's: L = 7, tau = 3).

This script swaps that filter in for the zero-shot detection of the viecap models that
`benchmarks/entity_scenes.py` trained (same weights, same hard-prompt format, so the entity source is
the only difference) and scores both, side by side in one run, on the test and the compositional
splits: CIDEr and CLIPScore, how many of the 1,000 compositional captions name a held-out pair, and
entity precision and recall against the references. The memory is every distinct training caption.

What is not built: IFCap's training side (noisy text features retrieve k = 5 neighbour captions whose
embeddings a fusion module attends to). The entity filter is what issue 14 names as the entity step,
and it needs no retraining, so it is measured on the very models of the zero-shot rows.

    python benchmarks/entity_retrieval.py --work bench-run/entity   # after benchmarks/entity_scenes.py
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

MODELS = ("viecap", "phrases", "phrases_nomask")
SETTINGS = ((9, 5), (9, 3), (7, 3))  # (L retrieved captions, tau least frequency): COCO's, and looser


def caption_memory(embedder, captions: list[str], cache: Path) -> torch.Tensor:
    """Unit text embeddings of the distinct training captions, cached under the embedder's id."""
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved["embedder_id"] == embedder.id and saved["count"] == len(captions):
            return saved["vectors"]
    vectors = torch.cat([F.normalize(embedder.embed_texts(captions[s:s + 2048]).float(), dim=-1)
                         for s in range(0, len(captions), 2048)])
    torch.save({"embedder_id": embedder.id, "count": len(captions), "vectors": vectors}, cache)
    return vectors


def retrieved_entities(image_vectors: torch.Tensor, memory: torch.Tensor, memory_entities: list[list[str]],
                       retrieve: int, least: int) -> list[list[str]]:
    """IFCap's filter: the entities named at least `least` times among each image's `retrieve` nearest
    memory captions, most frequent first (ties by first appearance)."""
    found = []
    for start in range(0, len(image_vectors), 256):
        sims = F.normalize(image_vectors[start:start + 256].float(), dim=-1) @ memory.T
        for row in sims.topk(retrieve, dim=-1).indices.tolist():
            counts = Counter(e for i in row for e in memory_entities[i])
            found.append([e for e, n in counts.most_common() if n >= least])
    return found


def scored(decoder, embedded, references: dict, embedder, in_image: dict | None) -> dict:
    from entity_scenes import heldout_counts
    from unembed.eval.metrics import clip_scores, coco_caption_metrics

    captions = dict(zip(embedded.ids, decoder.decode(embedded)))
    ids = list(embedded.ids)
    metrics = coco_caption_metrics(captions, references, spice=False, meteor=False)
    clip = clip_scores(embedder, embedded.vectors, [captions[i] for i in ids], [references[i] for i in ids], ids)
    row = {"CIDEr": round(metrics["CIDEr"], 4), "CLIPScore": round(clip["CLIPScore"], 4), "example": captions[ids[0]]}
    if in_image is not None:
        row.update(heldout_counts(captions, in_image))
    return row


def main() -> None:
    from entity_scenes import pairs_in_images
    from unembed.data.splits import load_split, split_captions
    from unembed.pipeline import embed_split
    from unembed.decoders import load_decoder
    from unembed.embedders import load_embedder
    from unembed.entities import detection_scores

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench-run/entity", help="the --work of benchmarks/entity_scenes.py")
    parser.add_argument("--out", default="benchmarks/results/entity_retrieval.json")
    parser.add_argument("--embedder", default=str(Path(__file__).resolve().parents[1] / "unembed" / "bundle" / "embedder"))
    args = parser.parse_args()
    work = Path(args.work)
    data = work / "scenes"
    embedder = load_embedder(args.embedder, "cpu")
    memory_captions = sorted(set(split_captions(data / "train")))
    memory = caption_memory(embedder, memory_captions, work / "caption_memory.pt")
    result = {"embedder_id": embedder.id, "memory_captions": len(memory_captions), "settings": SETTINGS,
              "models": {}}
    splits = {}
    for split in ("test", "compositional"):
        _, refs, image_ids = load_split(data / split)
        splits[split] = (embed_split(embedder, data / split), {str(i): r for i, r in zip(image_ids, refs)},
                         pairs_in_images(data / split) if split == "compositional" else None)
    for name in MODELS:
        decoder = load_decoder(work / "test" / "models" / name)
        vocabulary = decoder.vocabulary
        memory_entities = [vocabulary.caption_entities(c) for c in memory_captions]
        zero_shot = decoder.detect
        rows = {}
        for split, (embedded, references, in_image) in splits.items():
            ordered_refs = [references[i] for i in embedded.ids]
            sources = {"zero-shot": zero_shot(embedded.vectors)}
            for retrieve, least in SETTINGS:
                sources[f"retrieval L={retrieve} tau={least}"] = retrieved_entities(
                    embedded.vectors, memory, memory_entities, retrieve, least)
            for source, found in sources.items():
                by_id = dict(zip(embedded.ids, found))
                decoder.text_prompts = lambda batch, vectors, options=None, _f=by_id: [decoder.prompt_ids(_f[i]) for i in batch.ids]
                row = scored(decoder, embedded, references, embedder, in_image)
                row["detection"] = detection_scores(found, ordered_refs, vocabulary)
                rows.setdefault(source, {})[split] = row
                print(name, split, source, json.dumps(row), flush=True)
        result["models"][name] = rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def table(result: dict) -> str:
    from entity_scenes import detection_cell, heldout_cell

    lines = ["| model | entity source | test CIDEr | comp. CIDEr | comp. CLIPScore | names a held-out pair (in the image) "
             "| detection P / R (test) | detection P / R (comp.) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, rows in result["models"].items():
        for source, row in rows.items():
            t, c = row["test"], row["compositional"]
            lines.append(f"| {name} | {source} | {100 * t['CIDEr']:.1f} | {100 * c['CIDEr']:.1f} | "
                         f"{100 * c['CLIPScore']:.1f} | {heldout_cell(c)} | {detection_cell(t['detection'])} | "
                         f"{detection_cell(c['detection'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
