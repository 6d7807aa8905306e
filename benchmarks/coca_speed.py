"""CoCa captioning speed: unembed's cached decoder against open_clip's own `CoCa.generate`, on the same
model and the same images: the coca_ViT-B-32 architecture with random weights (open_clip.create_model,
no download; speed does not depend on weight values), greedy decoding, fp32.

Equal work: every caption has exactly --length tokens on both sides, the end token being suppressed
until then. open_clip: generate(generation_type="top_k", top_k=1, seq_len=L+2, min_seq_len=L+1), where
top_k=1 makes its sampler greedy, its min-length processor blocks the end token for the first L tokens
and it forces the end token at position L+1 (one more forward pass, whose logits it discards: that is
how its loop ends). unembed: generate(num_beams=1, max_length=L, min_length=L). Both token sequences
are checked equal before timing.

Timed from preprocessed pixels [B, 3, 224, 224]: open_clip's generate (it encodes the images itself,
as its API requires); unembed "embed + decode" (model._encode_image once, then the cached decoder) and
"decode only" (image tokens already embedded: `unembed embed` once, caption many times).

    python benchmarks/coca_speed.py --device cpu --length 16 --batches 1,32 --repeats 2,1 --threads 1
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from unembed.compat import import_open_clip
from unembed.decoders.coca import CoCaDecoder
from unembed.embedders import Embedded, Embedder
from unembed.training.coca import init_decoder_projection


def timed(fn, repeats: int, device: str) -> float:
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


@torch.no_grad()
def embed_pixels(embedder: Embedder, pixels: torch.Tensor) -> Embedded:
    """What `Embedder.embed(..., with_tokens=True)` computes, from already-preprocessed pixels."""
    latent, tokens = embedder.model._encode_image(pixels)
    return Embedded(F.normalize(latent, dim=-1), [str(i) for i in range(len(pixels))], embedder.id, embedder.spec,
                    "image", tokens)


def open_clip_generate(model, pixels: torch.Tensor, length: int) -> torch.Tensor:
    return model.generate(pixels, generation_type="top_k", top_k=1, seq_len=length + 2, min_seq_len=length + 1)


def unembed_generate(decoder: CoCaDecoder, embedded: Embedded, length: int) -> list[list[int]]:
    return decoder.generate(embedded, num_beams=1, max_length=length, min_length=length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="default: benchmarks/results/coca_speed_<device>.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="coca_ViT-B-32", help="an open_clip CoCa architecture (random weights)")
    parser.add_argument("--length", type=int, default=20, help="tokens per caption, on both sides")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", default="3,1", help="timed runs per batch size (after one warm-up at batch 1)")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default: torch's")
    args = parser.parse_args()
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
    size = model.visual.image_size
    pixels = torch.randn(max(batches), 3, *size, device=args.device)

    check = pixels[:2]
    theirs = [row[1:args.length + 1].tolist() for row in open_clip_generate(model, check, args.length)]
    assert unembed_generate(decoder, embed_pixels(embedder, check), args.length) == theirs, \
        "unembed and open_clip greedy captions differ"
    unembed_generate(decoder, embed_pixels(embedder, pixels[:1]), args.length)  # warm-up

    results = {"device": args.device, "cpu": platform.processor() or platform.machine(),
               "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "open_clip": import_open_clip().__version__, "model": f"{args.model} (random weights)",
               "image_tokens": list(embed_pixels(embedder, pixels[:1]).image_tokens.shape[1:]),
               "caption_tokens": args.length, "decoding": "greedy, fp32",
               "equal_length": f"end token suppressed for {args.length} tokens on both sides "
                               f"(open_clip min_seq_len={args.length + 1}, seq_len={args.length + 2}; unembed "
                               f"min_length=max_length={args.length})",
               "tokens_match_open_clip": True, "runs": []}
    for batch, n in zip(batches, repeats):
        images = pixels[:batch]
        embedded = embed_pixels(embedder, images)
        open_clip_s = timed(lambda: open_clip_generate(model, images, args.length), n, args.device)
        embed_decode_s = timed(lambda: unembed_generate(decoder, embed_pixels(embedder, images), args.length), n,
                               args.device)
        decode_s = timed(lambda: unembed_generate(decoder, embedded, args.length), n, args.device)
        encode_s = timed(lambda: embed_pixels(embedder, images), n, args.device)
        run = {"batch": batch, "repeats": n, "open_clip_generate_s": round(open_clip_s, 3),
               "unembed_embed_and_decode_s": round(embed_decode_s, 3), "unembed_decode_only_s": round(decode_s, 3),
               "image_encoding_s": round(encode_s, 3),
               "open_clip_captions_per_s": round(batch / open_clip_s, 2),
               "unembed_embed_and_decode_captions_per_s": round(batch / embed_decode_s, 2),
               "unembed_decode_only_captions_per_s": round(batch / decode_s, 2),
               "speedup_embed_and_decode": round(open_clip_s / embed_decode_s, 1),
               "speedup_decode_only": round(open_clip_s / decode_s, 1)}
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
    from unembed.io import write_json

    write_json(args.out or f"benchmarks/results/coca_speed_{args.device.split(':')[0]}.json", results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
