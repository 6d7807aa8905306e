"""CoCa captioning speed: unembed's cached decoder against open_clip's own `CoCa.generate`, on the same
model and the same images: the coca_ViT-B-32 architecture with random weights (open_clip.create_model,
no download; speed does not depend on weight values), greedy decoding, fp32.

Equal work: every caption has exactly --length tokens on both sides, the end token being suppressed
until then. open_clip: generate(generation_type="top_k", top_k=1, seq_len=L+2, min_seq_len=L+1), where
top_k=1 makes its sampler greedy, its min-length processor blocks the end token for the first L tokens
and it forces the end token at position L+1 (one more forward pass, whose logits it discards: that is
how its loop ends). unembed: generate(num_beams=1, max_length=L, min_length=L).

Like with like, from preprocessed pixels [B, 3, 224, 224]:
- embed + decode: open_clip's generate (it encodes the images itself, as its API requires) against
  unembed's embedding pass (`Embedder.embed_pixels(..., with_tokens=True)`, what `unembed caption`
  runs) then its cached decoder;
- decode only: open_clip's generate with the image encoding already done (its `_encode_image` is
  answered, for the call, with the latent and tokens computed before the clock starts: what remains
  is its decoding loop) against unembed's decoder on an `Embedded` made before the clock starts;
- the image encoding alone, for reference.
Every timed call is checked, warm-up included: each of the four gives the same token ids on every
image of the batch (open_clip's rows also start with the start token and end with the forced end
token). The five (the encoding too) take turns call by call, who goes first rotating, so that load
from other jobs falls on all of them. Ratios are open_clip's seconds over unembed's, reported as they
come (below 1x means unembed is slower).

The 1-minute load average is recorded at the start and the end; the JSON says so when it is above 1.5.

    python benchmarks/coca_speed.py --device cpu --length 16 --batches 1,32 --repeats 2,1 --threads 1
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from unembed.compat import import_open_clip
from unembed.decoders.coca import CoCaDecoder
from unembed.embedders import Embedded, Embedder
from unembed.training.coca import init_decoder_projection
from machine_load import load_average, load_record


def clock(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, result


def embed(embedder: Embedder, pixels: torch.Tensor) -> Embedded:
    """unembed's embedding pass over preprocessed pixels, with CoCa's image tokens."""
    return embedder.embed_pixels(pixels, [str(i) for i in range(len(pixels))], with_tokens=True)


def open_clip_generate(model, pixels: torch.Tensor, length: int) -> torch.Tensor:
    return model.generate(pixels, generation_type="top_k", top_k=1, seq_len=length + 2, min_seq_len=length + 1)


def open_clip_decode(model, pixels: torch.Tensor, encoded: tuple, length: int) -> torch.Tensor:
    """open_clip's generate with the image encoding done beforehand: it calls `_encode_image` once and
    then decodes; for this call that method hands back `encoded` (latent, tokens) of these pixels."""
    model._encode_image = lambda images, normalize=True: encoded
    try:
        return open_clip_generate(model, pixels, length)
    finally:
        del model._encode_image


def open_clip_ids(rows: torch.Tensor, length: int, start: int, end: int) -> list[list[int]]:
    """Caption ids of open_clip's rows [start, y1 .. yL, end], checking the frame."""
    assert rows.shape[1] == length + 2, f"open_clip made rows of {rows.shape[1]} ids, not {length + 2}"
    assert bool((rows[:, 0] == start).all() and (rows[:, -1] == end).all()), "open_clip's rows are not framed"
    return [row[1:length + 1].tolist() for row in rows]


def unembed_generate(decoder: CoCaDecoder, embedded: Embedded, length: int) -> list[list[int]]:
    return decoder.generate(embedded, num_beams=1, max_length=length, min_length=length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="default: benchmarks/results/coca_speed_<device>.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="coca_ViT-B-32", help="an open_clip CoCa architecture (random weights)")
    parser.add_argument("--length", type=int, default=20, help="tokens per caption, on both sides")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", default="3,1", help="timed calls per batch size, after one checked warm-up "
                        "call of each at that size")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default: torch's")
    args = parser.parse_args()
    load_start = load_average()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    repeats = [int(r) for r in args.repeats.split(",")]
    if len(repeats) != len(batches):
        parser.error("--repeats needs one count per --batches entry")

    torch.manual_seed(0)
    embedder = Embedder.from_spec(args.model, device=args.device)
    init_decoder_projection(embedder.model)  # open_clip leaves it as torch.empty
    model, decoder = embedder.model, CoCaDecoder.for_embedder(embedder)
    start, end = embedder.tokenizer.sot_token_id, embedder.tokenizer.eot_token_id
    size = model.visual.image_size
    pixels = torch.randn(max(batches), 3, *size, device=args.device)

    results = {"device": args.device, "cpu": platform.processor() or platform.machine(),
               "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "open_clip": import_open_clip().__version__, "model": f"{args.model} (random weights)",
               "image_tokens": list(embed(embedder, pixels[:1]).image_tokens.shape[1:]),
               "caption_tokens": args.length, "decoding": "greedy, fp32",
               "equal_length": f"end token suppressed for {args.length} tokens on both sides "
                               f"(open_clip min_seq_len={args.length + 1}, seq_len={args.length + 2}; unembed "
                               f"min_length=max_length={args.length})",
               "embed_and_decode": "open_clip generate(pixels) | unembed Embedder.embed_pixels(with_tokens=True) "
                                   "+ CoCaDecoder.generate",
               "decode_only": "open_clip generate(pixels) with _encode_image answered by a precomputed (latent, "
                              "tokens) | unembed CoCaDecoder.generate on a precomputed Embedded",
               "checked": "every timed call, warm-up included: the four give the same token ids on every image",
               "timing": "one checked warm-up call of each at each batch size, then they take turns call by call, "
                         "who goes first rotating; "
                         "seconds are the mean per call; best_calls: ratios of the fastest calls (less hurt by other "
                         "jobs' bursts)",
               "runs": []}
    for batch, n in zip(batches, repeats):
        images = pixels[:batch]
        encoded = model._encode_image(images)
        embedded = embed(embedder, images)
        calls = {"open_clip_generate": lambda: open_clip_ids(open_clip_generate(model, images, args.length),
                                                             args.length, start, end),
                 "unembed_embed_and_decode": lambda: unembed_generate(decoder, embed(embedder, images), args.length),
                 "open_clip_decode_only": lambda: open_clip_ids(open_clip_decode(model, images, encoded, args.length),
                                                                args.length, start, end),
                 "unembed_decode_only": lambda: unembed_generate(decoder, embedded, args.length),
                 "image_encoding": lambda: embed(embedder, images)}
        seconds, reference = {name: [] for name in calls}, None
        for call in range(1 + n):
            order = list(calls)[call % len(calls):] + list(calls)[:call % len(calls)]  # who goes first rotates
            for name in order:
                t, ids = clock(calls[name], args.device)
                if name != "image_encoding":
                    reference = ids if reference is None else reference
                    assert len(ids) == batch and all(len(row) == args.length for row in ids), \
                        f"{name} made captions of other lengths"
                    mismatched = [i for i, (a, b) in enumerate(zip(ids, reference)) if a != b]
                    assert not mismatched, f"{name} differs from open_clip's generate on images {mismatched} " \
                                           f"(batch {batch}, call {call})"
                if call:  # the first call of each is the warm-up
                    seconds[name].append(t)
        mean = {name: sum(s) / len(s) for name, s in seconds.items()}
        run = {"batch": batch, "repeats": n, "items_checked_per_call": batch, "calls_checked_each": n + 1,
               "same_tokens": True,
               **{f"{name}_s": round(mean[name], 3) for name in calls},
               **{f"{name}_captions_per_s": round(batch / mean[name], 2) for name in calls if name != "image_encoding"},
               "ratio_embed_and_decode": round(mean["open_clip_generate"] / mean["unembed_embed_and_decode"], 2),
               "ratio_decode_only": round(mean["open_clip_decode_only"] / mean["unembed_decode_only"], 2),
               "ratio_embed_and_decode_best_calls": round(min(seconds["open_clip_generate"])
                                                          / min(seconds["unembed_embed_and_decode"]), 2),
               "ratio_decode_only_best_calls": round(min(seconds["open_clip_decode_only"])
                                                     / min(seconds["unembed_decode_only"]), 2),
               "seconds_per_call": {name: [round(x, 3) for x in s] for name, s in seconds.items()}}
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
    results.update(load_record(load_start, load_average()))
    from unembed.io import write_json

    write_json(args.out or f"benchmarks/results/coca_speed_{args.device.split(':')[0]}.json", results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
