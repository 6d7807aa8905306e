"""Captions per second of the prefix-LM core (clipcap / capdec / decap share it) at real size:
GPT-2 124M architecture, a 512-d (ViT-B-32-sized) embedding, MLP mapper with 10 prefix tokens,
random weights (speed does not depend on weight values).

Side by side in one run, greedy and beam 5, batch 1 and 64, each from the same unit vectors:
- unembed: the decoder's public path, `decoder.decode(Embedded, num_beams, max_length)` (mapper,
  transformers' generate with its KV cache, captions as text);
- the reference a user would write with transformers alone: the same mapper, then the same LM's own
  `lm.generate(inputs_embeds=prefix, attention_mask=ones, ...)` with its default (dynamic) KV cache,
  and the rows decoded to text with the same tokenizer;
- a naive greedy loop that re-runs the whole sequence for every new token, one image at a time, as
  the reference repos' notebooks do (a second reference row, greedy only: those notebooks' loop).
Every caption is forced to the same length (min = max new tokens; `decode` has no min-length option,
so the LM's generation defaults carry min_new_tokens, which its `generate` reads), so the rows
compare equal work. Every timed call is checked, warm-up included: unembed's token ids (recorded from
the LM's `generate` inside `decode`, which returns text only) equal the reference's, item for item,
and so do the texts; the naive loop's tokens equal the reference's greedy tokens for its images. The
two sides take turns, call by call, who goes first alternating, so that load from other jobs falls on
both.

The roofline, in the same run: this machine's own fp32 GEMM rate (a 2048 x 2048 product) and the
FLOP/s greedy decoding reaches at the largest batch (2 x the LM's matrix parameters, blocks and
output head, per token; attention over the short context adds under 2% and is not counted), as a
fraction of it. Variants of transformers' cached decoding are timed there too (SDPA, the default;
eager attention; a static cache), each asserted to give the same tokens on every timed call.

The 1-minute load average is recorded at the start and the end: other jobs on a shared machine slow
both sides, and the JSON says so when it is above 1.5.

    python benchmarks/prefix_speed.py --out benchmarks/results/prefix_speed_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from unembed.decoders import create_decoder
from unembed.embedders import Embedded
from machine_load import load_average, load_record

GPT2_124M = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024}


class TokenRecorder:
    """Wraps `lm.generate` on the instance to keep the token ids of its last call: `decode` returns
    text only, and these are the ids it decoded them from. Nothing else changes."""

    def __init__(self, lm):
        self.generate, self.last = lm.generate, None
        lm.generate = self

    def __call__(self, *args, **kwargs):
        self.last = self.generate(*args, **kwargs)
        return self.last


def embedded_of(decoder, vectors: torch.Tensor) -> Embedded:
    """Unit vectors as an embedding pass hands them to `decode`."""
    return Embedded(vectors, [str(i) for i in range(len(vectors))], decoder.config.embedder_id,
                    decoder.config.embedder_spec, "image", normalized=True)


def unembed_decode(decoder, recorder: TokenRecorder, embedded: Embedded, length: int, beams: int):
    texts = decoder.decode(embedded, num_beams=beams, max_length=length)
    return recorder.last, texts


@torch.no_grad()
def transformers_generate(decoder, recorder: TokenRecorder, vectors: torch.Tensor, length: int, beams: int,
                          **extra):
    """transformers' own generate on the same LM, fed the mapper's prefix (the call a user writes)."""
    prefix = decoder.prefix(vectors)
    mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
    eos = decoder.tokenizer.eos_id
    tokens = recorder.generate(inputs_embeds=prefix, attention_mask=mask, max_new_tokens=length,
                               min_new_tokens=length, num_beams=beams, do_sample=False, pad_token_id=eos,
                               eos_token_id=eos, **extra)
    return tokens, [decoder.tokenizer.decode(row) for row in tokens.tolist()]


@torch.no_grad()
def naive_greedy(decoder, vectors: torch.Tensor, length: int) -> list[list[int]]:
    """One image at a time; each step runs the LM over the prefix and every token so far (no cache)."""
    out = []
    embed = decoder.lm.get_input_embeddings()
    for v in vectors:
        sequence = decoder.prefix(v[None])
        tokens = []
        for _ in range(length):
            next_id = decoder.lm(inputs_embeds=sequence).logits[0, -1].argmax().item()
            tokens.append(next_id)
            sequence = torch.cat([sequence, embed(torch.tensor([[next_id]], device=sequence.device))], dim=1)
        out.append(tokens)
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def clock(fn, device: str):
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def gemm_flops(n: int = 2048, repeats: int = 10, device: str = "cpu") -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm-up
    seconds, _ = clock(lambda: [a @ b for _ in range(repeats)], device)
    return 2 * n ** 3 * repeats / seconds


def matrix_parameters(decoder) -> int:
    """Parameters that take part in a matrix product for each generated token: the blocks and the head."""
    lm = decoder.lm
    blocks = sum(p.numel() for n, p in lm.named_parameters() if ".h." in n and p.ndim == 2)
    return blocks + lm.get_output_embeddings().weight.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/prefix_speed.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--length", type=int, default=20, help="tokens per caption")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--repeats", default="", help="timed calls per side for each batch (default 4 at batch 1, "
                        "else 2), after one checked warm-up call")
    parser.add_argument("--naive-images", type=int, default=4, help="images timed with the naive loop")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="compute precision (autocast)")
    args = parser.parse_args()
    from unembed.pipeline import inference_precision

    with inference_precision(args.dtype, args.device):
        run(args)


def run(args) -> None:
    load_start = load_average()
    torch.manual_seed(0)
    decoder = create_decoder("clipcap", embed_dim=512, lm="scratch", tokenizer="clip-bpe", lm_config=dict(GPT2_124M),
                             mapper="mlp", prefix_length=10).to(args.device).eval()
    recorder = TokenRecorder(decoder.lm)
    decoder.lm.generation_config.min_new_tokens = args.length  # decode's calls, as the reference's: equal length
    batches = [int(b) for b in args.batches.split(",")]
    repeats = ([int(r) for r in args.repeats.split(",")] if args.repeats
               else [4 if b == 1 else 2 for b in batches])
    if len(repeats) != len(batches):
        raise SystemExit("--repeats needs one count per --batches entry")
    results = {"device": args.device, "dtype": args.dtype, "cpu": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "transformers": __import__("transformers").__version__, "caption_tokens": args.length,
               "lm": "GPT-2 124M architecture (random weights)", "embed_dim": 512, "prefix_tokens": 10,
               "unembed": "decoder.decode(Embedded, num_beams, max_length): mapper + transformers generate "
                          "(dynamic KV cache) + text",
               "reference": "the same mapper, then lm.generate(inputs_embeds=prefix, attention_mask=ones, "
                            "max_new_tokens=min_new_tokens=L, num_beams, do_sample=False), default KV cache; "
                            "rows decoded with the same tokenizer",
               "naive": "greedy, one image at a time, the LM over the whole sequence for every token (no cache)",
               "checked": "every timed call, warm-up included: unembed's token ids (from the LM's generate inside "
                          "decode) equal the reference's for every item, and the texts too; the naive loop's "
                          "tokens equal the reference greedy tokens of its images",
               "timing": "one checked warm-up call per side, then the sides take turns call by call, who goes "
                         "first alternating; captions/s = batch / mean seconds per call; best_call: batch / the "
                         "fastest call's seconds (less hurt by other jobs' bursts)",
               "runs": []}
    vectors = torch.nn.functional.normalize(torch.randn(max(batches), 512), dim=-1).to(args.device)
    strict = args.device == "cpu"

    def check(ok: bool, message: str) -> bool:
        """On the CPU a mismatch stops the run; on a GPU (its minutes are few) it is recorded in the
        result, which then says which calls differed."""
        if not ok:
            if strict:
                raise AssertionError(message)
            results.setdefault("mismatches", []).append(message)
        return ok

    def checked_pair(batch: int, beams: int) -> tuple[torch.Tensor, list[float], list[float]]:
        images = vectors[:batch]
        embedded = embedded_of(decoder, images)
        theirs_s, ours_s, reference, same = [], [], None, True
        for call in range(1 + repeats[batches.index(batch)]):
            theirs = lambda: clock(lambda: transformers_generate(decoder, recorder, images, args.length, beams),
                                   args.device)
            ours = lambda: clock(lambda: unembed_decode(decoder, recorder, embedded, args.length, beams),
                                 args.device)
            if call % 2:  # who goes first alternates
                (t_ours, (our_tokens, our_texts)), (t_ref, (tokens, texts)) = ours(), theirs()
            else:
                (t_ref, (tokens, texts)), (t_ours, (our_tokens, our_texts)) = theirs(), ours()
            assert tokens.shape == (batch, args.length), f"the reference made {tuple(tokens.shape)} tokens"
            if reference is None:
                reference = tokens
            check(torch.equal(tokens, reference), f"the reference's tokens changed between calls (batch {batch}, "
                                                  f"{beams} beams, call {call})")
            same &= check(torch.equal(our_tokens, tokens), f"unembed's and transformers' tokens differ (batch {batch}, "
                                                           f"{beams} beams, call {call})")
            same &= check(our_texts == texts, f"unembed's and transformers' texts differ (batch {batch}, {beams} "
                                              f"beams, call {call})")
            if call:  # the first call of each side is the warm-up
                theirs_s.append(t_ref)
                ours_s.append(t_ours)
        return reference, theirs_s, ours_s, same

    greedy_reference = {}
    for batch in batches:
        for beams in (1, 5):
            reference, theirs_s, ours_s, same = checked_pair(batch, beams)
            if beams == 1:
                greedy_reference[batch] = reference
            theirs, ours = batch * len(theirs_s) / sum(theirs_s), batch * len(ours_s) / sum(ours_s)
            row = {"batch": batch, "decoding": "greedy" if beams == 1 else f"beam {beams}",
                   "unembed_captions_per_s": round(ours, 2), "transformers_generate_captions_per_s": round(theirs, 2),
                   "ratio_unembed_over_generate": round(ours / theirs, 2),
                   "unembed_best_call_captions_per_s": round(batch / min(ours_s), 2),
                   "transformers_generate_best_call_captions_per_s": round(batch / min(theirs_s), 2),
                   "ratio_best_calls": round(min(theirs_s) / min(ours_s), 2),
                   "unembed_seconds": [round(s, 3) for s in ours_s],
                   "transformers_generate_seconds": [round(s, 3) for s in theirs_s],
                   "items_checked_per_call": batch, "calls_checked_per_side": len(ours_s) + 1,
                   "same_tokens_and_text": same}
            results["runs"].append(row)
            print(json.dumps(row), flush=True)

    # The naive loop, greedy only, on the first images of the largest batch.
    largest = max(batches)
    naive_images = min(args.naive_images, largest)
    naive_greedy(decoder, vectors[:1], 2)  # warm-up
    naive_s, naive = clock(lambda: naive_greedy(decoder, vectors[:naive_images], args.length), args.device)
    expected = greedy_reference[largest][:naive_images].tolist()
    matching = sum(a == b for a, b in zip(naive, expected))
    naive_row = {"images": naive_images, "captions_per_s": round(naive_images / naive_s, 3),
                 "seconds": round(naive_s, 2), "items_checked": naive_images, "same_tokens": matching == naive_images,
                 "checked_against": f"the reference's greedy tokens at batch {largest}"}
    if args.dtype == "fp32" and strict:
        assert matching == naive_images, f"the naive loop's tokens differ from the cached ones on " \
                                         f"{naive_images - matching} of {naive_images} images"
    else:  # recomputing the whole sequence rounds differently from the cache in reduced precision
        naive_row["same_tokens_share"] = round(matching / naive_images, 3)
        naive_row["why_not_asserted"] = (f"{args.dtype} on {args.device}: the naive loop recomputes every position, "
                                         "the cache reuses them; other kernels round the two differently, so tokens "
                                         "may part")
    results["naive_greedy"] = naive_row
    naive_rate = naive_images / naive_s
    for row in results["runs"]:
        if row["decoding"] == "greedy":
            row["naive_greedy_captions_per_s"] = naive_row["captions_per_s"]
            row["ratio_unembed_over_naive"] = round(row["unembed_captions_per_s"] / naive_rate, 1)
            row["ratio_generate_over_naive"] = round(row["transformers_generate_captions_per_s"] / naive_rate, 1)
    print(json.dumps(naive_row), flush=True)

    # The roofline at the largest batch, greedy.
    batch = largest
    flops_per_caption = 2 * matrix_parameters(decoder) * (args.length + decoder.config.prefix_length)
    gemm = gemm_flops(device=args.device)
    results[f"gemm_{args.dtype}_gflops"] = round(gemm / 1e9, 1)  # under the run's autocast: its own ceiling
    results["flops_per_caption"] = flops_per_caption
    unembed_row = next(r for r in results["runs"] if r["batch"] == batch and r["decoding"] == "greedy")
    for key in ("unembed", "transformers_generate"):
        side = f"{key}_captions_per_s"
        rate = unembed_row[side]
        unembed_row[f"{key}_gflops"] = round(rate * flops_per_caption / 1e9, 1)
        unembed_row[f"{key}_fraction_of_gemm"] = round(rate * flops_per_caption / gemm, 3)
    variants = {"sdpa (default)": {}, "eager attention": {"attn_implementation": "eager"},
                "static cache": {"cache_implementation": "static"}}
    results["roofline"] = []
    for name, change in variants.items():
        change = dict(change)
        attention = change.pop("attn_implementation", None)
        if attention:
            decoder.lm.config._attn_implementation = attention
        seconds, same = [], True
        for call in range(1 + 2):
            t, (tokens, _) = clock(lambda: transformers_generate(decoder, recorder, vectors[:batch], args.length, 1,
                                                                 **change), args.device)
            same &= check(torch.equal(tokens, greedy_reference[batch]),
                          f"{name}: tokens differ from the default's (call {call})")
            if call:
                seconds.append(t)
        if attention:
            decoder.lm.config._attn_implementation = "sdpa"
        rate = batch * len(seconds) / sum(seconds)
        row = {"variant": name, "batch": batch, "captions_per_s": round(rate, 2), "same_tokens": same,
               "calls_checked": len(seconds) + 1, "decoding_gflops": round(rate * flops_per_caption / 1e9, 1),
               "fraction_of_gemm": round(rate * flops_per_caption / gemm, 3)}
        results["roofline"].append(row)
        print(json.dumps(row), flush=True)
    results.update(load_record(load_start, load_average()))
    from unembed.io import write_json

    write_json(args.out, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
