"""Captions per second of the prefix-LM core (clipcap / capdec / decap share it) at real size:
GPT-2 124M architecture, a 512-d (ViT-B-32-sized) embedding, MLP mapper with 10 prefix tokens,
random weights (speed does not depend on weight values).

Measured side by side in one run: unembed's decode (transformers generate: KV cache, batched beam
search) and a naive greedy loop that re-runs the whole sequence for every new token, one image at a
time, as the reference repos' notebooks do. Every caption is forced to the same length (min = max
new tokens), so the numbers compare equal work.

The roofline, in the same run: this machine's own fp32 GEMM rate (a 2048 x 2048 product) and the
FLOP/s greedy decoding reaches at the largest batch (2 x the LM's matrix parameters, blocks and
output head, per token; attention over the short context adds under 2% and is not counted), as a
fraction of it. Variants of transformers' cached decoding are timed there too (SDPA, the default;
eager attention; a static cache), each checked to give the same tokens.

    python benchmarks/prefix_speed.py --out benchmarks/results/prefix_speed_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from unembed.decoders import create_decoder

GPT2_124M = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


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


@torch.no_grad()
def unembed_generate(decoder, vectors: torch.Tensor, length: int, beams: int) -> torch.Tensor:
    prefix = decoder.prefix(vectors)
    mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
    return decoder.lm.generate(inputs_embeds=prefix, attention_mask=mask, max_new_tokens=length, min_new_tokens=length,
                               num_beams=beams, do_sample=False, pad_token_id=decoder.tokenizer.eos_id,
                               eos_token_id=decoder.tokenizer.eos_id)


def gemm_flops(n: int = 2048, repeats: int = 10, device: str = "cpu") -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    seconds = timed(lambda: a @ b if device == "cpu" else (a @ b, torch.cuda.synchronize()), repeats)
    return 2 * n ** 3 / seconds


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
    parser.add_argument("--naive-images", type=int, default=4, help="images timed with the naive loop")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="compute precision (autocast)")
    args = parser.parse_args()
    from unembed.pipeline import inference_precision

    with inference_precision(args.dtype, args.device):
        run(args)


def run(args) -> None:
    torch.manual_seed(0)
    decoder = create_decoder("clipcap", embed_dim=512, lm="scratch", tokenizer="clip-bpe", lm_config=dict(GPT2_124M),
                             mapper="mlp", prefix_length=10).to(args.device).eval()
    results = {"device": args.device, "dtype": args.dtype, "cpu": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "caption_tokens": args.length,
               "lm": "GPT-2 124M architecture (random weights)", "embed_dim": 512, "runs": []}
    vectors = torch.nn.functional.normalize(torch.randn(max(map(int, args.batches.split(","))), 512), dim=-1)
    vectors = vectors.to(args.device)

    check = vectors[:2]
    cached = unembed_generate(decoder, check, args.length, 1).tolist()
    assert cached == naive_greedy(decoder, check, args.length), "cached and naive greedy decoding differ"
    results["greedy_matches_naive"] = True

    naive_s = timed(lambda: naive_greedy(decoder, vectors[:args.naive_images], args.length), 1) / args.naive_images
    results["naive_greedy_captions_per_s"] = round(1 / naive_s, 3)
    for batch in map(int, args.batches.split(",")):
        for beams in (1, 5):
            seconds = timed(lambda: unembed_generate(decoder, vectors[:batch], args.length, beams), 2 if batch > 1 else 3)
            run = {"batch": batch, "decoding": "greedy" if beams == 1 else f"beam {beams}",
                   "captions_per_s": round(batch / seconds, 2)}
            if beams == 1:
                run["speedup_vs_naive_greedy"] = round(naive_s * batch / seconds, 1)
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    batch = max(map(int, args.batches.split(",")))
    flops_per_caption = 2 * matrix_parameters(decoder) * (args.length + decoder.config.prefix_length)
    gemm = gemm_flops(device=args.device)
    results["gemm_fp32_gflops"] = round(gemm / 1e9, 1)
    reference = unembed_generate(decoder, vectors[:batch], args.length, 1)
    variants = {"sdpa (default)": {}, "eager attention": {"attn_implementation": "eager"},
                "static cache": {"cache_implementation": "static"}}
    results["roofline"] = []
    for name, change in variants.items():
        attention = change.pop("attn_implementation", None)
        if attention:
            decoder.lm.config._attn_implementation = attention
        extra = dict(change)
        run_once = (lambda: decoder.lm.generate(
            inputs_embeds=decoder.prefix(vectors[:batch]), attention_mask=torch.ones(batch, decoder.config.prefix_length,
                                                                                     dtype=torch.long, device=args.device),
            max_new_tokens=args.length, min_new_tokens=args.length, num_beams=1, do_sample=False,
            pad_token_id=decoder.tokenizer.eos_id, eos_token_id=decoder.tokenizer.eos_id, **extra))
        with torch.no_grad():
            same = torch.equal(run_once(), reference)
            seconds = timed(run_once, 2)
        if attention:
            decoder.lm.config._attn_implementation = "sdpa"
        rate = batch / seconds
        row = {"variant": name, "batch": batch, "captions_per_s": round(rate, 2), "same_tokens": same,
               "decoding_gflops": round(rate * flops_per_caption / 1e9, 1),
               "fraction_of_gemm": round(rate * flops_per_caption / gemm, 3)}
        results["roofline"].append(row)
        print(json.dumps(row), flush=True)
    from unembed.io import write_json

    write_json(args.out, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
