"""Captions per second of the iterative decoder (MAGIC) at real size with random weights (speed does
not depend on weight values): a GPT-2 124M-architecture LM (GPT2Config()'s 12 layers x 768, with
CLIP's 49,408-token BPE because GPT-2's own tokenizer needs the hub) re-ranked by open_clip ViT-B-32's
text tower.

Measured side by side in one run: unembed's search (all candidates of all images in one LM forward
over the KV cache, and one text-tower call, per step) and a naive loop of the same method, as
reference code is written: one image at a time; at every step a full LM forward over the whole
sequence, then for every candidate another full forward (its hidden state) and one text-encoder
call. Both must give the same captions, on every image timed: the naive loop decodes as many images
as the largest batch. The stop string is off so that every caption runs to the
same length (equal work); EOS still ends one, and the mean length is recorded.

    python benchmarks/iterative_speed.py --out benchmarks/results/iterative_speed_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from unembed.decoders.iterative import IterativeDecoder
from unembed.embedders import Embedder

GPT2_124M = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024}  # transformers' GPT2Config()


@torch.no_grad()
def naive_search(decoder, targets: torch.Tensor, settings) -> list[list[int]]:
    """The same method with neither batching nor a KV cache (see the module docstring)."""
    tok, lm, embedder = decoder.tokenizer, decoder.lm, decoder.embedder
    scale, alpha, beta = decoder.logit_scale(settings), settings.alpha, settings.beta
    start = [tok.bos_id] + (tok.encode(settings.prompt) if settings.prompt else [])
    captions = []
    for target in F.normalize(targets.float(), dim=-1).cpu():
        caption = []
        for _ in range(settings.max_length):
            out = lm(input_ids=torch.tensor([start + caption], device=lm.device), output_hidden_states=True)
            probs, ids = out.logits[0, -1].float().softmax(-1).topk(settings.k)
            context = out.hidden_states[-1][0].float()
            penalties, similarities = [], []
            for v in ids.tolist():
                sequence = torch.tensor([start + caption + [v]], device=lm.device)
                hidden = lm(input_ids=sequence, output_hidden_states=True).hidden_states[-1][0, -1].float()
                penalties.append(F.cosine_similarity(hidden[None], context).max().item())
                text = tok.decode(caption + [v] if v != tok.eos_id else caption)
                similarities.append(scale * float(embedder.embed_texts([text])[0] @ target))
            score = ((1 - alpha) * probs.cpu() - alpha * torch.tensor(penalties)
                     + beta * torch.tensor(similarities).softmax(-1))
            v = ids[int(score.argmax())].item()
            if v == tok.eos_id:
                break
            caption.append(v)
            if settings.stop and settings.stop in tok.decode([v]):
                break
        captions.append(caption)
    return captions


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/iterative_speed_cpu.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--embedder", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--lm-config", default=json.dumps(GPT2_124M), help="JSON sizes of the GPT-2 LM")
    parser.add_argument("--k", type=int, default=45)
    parser.add_argument("--length", type=int, default=16, help="tokens per caption")
    parser.add_argument("--batches", default="1,4")
    args = parser.parse_args()
    torch.manual_seed(0)
    embedder = Embedder.from_spec(args.embedder, device=args.device)
    decoder = IterativeDecoder.build(embedder, lm="scratch", tokenizer="clip-bpe", lm_config=json.loads(args.lm_config),
                                     k=args.k, max_length=args.length, stop="").to(args.device).eval()
    settings = decoder.settings({})
    batches = [int(b) for b in args.batches.split(",")]
    naive_images = max(batches)  # every caption timed is checked against the naive loop's
    targets = F.normalize(torch.randn(naive_images, embedder.dim), dim=-1)
    results = {"device": args.device, "cpu": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "lm": f"GPT-2 architecture {json.loads(args.lm_config)}, random weights, "
                     f"{sum(p.numel() for p in decoder.lm.parameters()) / 1e6:.1f}M parameters",
               "embedder": f"open_clip {args.embedder}, random weights (text tower re-ranks)",
               "k": args.k, "max_tokens": args.length, "alpha": settings.alpha, "beta": settings.beta, "runs": []}

    decoder.search(targets[:1], decoder.settings({"max_length": 1}))  # warm-up
    naive_s, naive = timed(lambda: naive_search(decoder, targets, settings))
    results["naive_captions_per_s"] = round(naive_images / naive_s, 4)
    print(json.dumps({"naive_images": naive_images, "seconds": round(naive_s, 1)}), flush=True)
    for batch in batches:
        seconds, cached = timed(lambda: decoder.search(targets[:batch], settings))
        assert cached == naive[:batch], "the cached, batched search and the naive loop disagree"
        run = {"batch": batch, "captions_per_s": round(batch / seconds, 4), "captions_checked": batch,
               "speedup_vs_naive": round(naive_s / naive_images * batch / seconds, 1),
               "mean_caption_tokens": round(sum(map(len, cached)) / batch, 1)}
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
    results["same_captions_as_naive"] = True
    results["example_caption"] = decoder.caption_text(naive[0], "")
    from unembed.io import write_json

    write_json(args.out, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
