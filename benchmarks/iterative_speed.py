"""Captions per second of the iterative decoder (MAGIC) at real size with random weights (speed does
not depend on weight values): a GPT-2 124M-architecture LM (GPT2Config()'s 12 layers x 768, with
CLIP's 49,408-token BPE because GPT-2's own tokenizer needs the hub) re-ranked by open_clip ViT-B-32's
text tower; k = 45 candidates, 16 tokens.

Three designs, side by side in one run, each asserted to give the same captions on every image it timed:
- unembed's search: all candidates of all images in one LM forward over the KV cache per step, the
  vocabulary-wide LM head only on the kept rows, and the text tower over each caption's shared prefix
  once, each candidate's last tokens against its keys and values (unembed/text_tower.py);
- MAGIC's own design (yxuansu/MAGIC, `PlugAndPlayContrastiveDecodingOneStepFast`), written out here
  faithfully: one image at a time, as its inference runs; per step one LM forward of the k candidates
  over the cache enlarged k times, logits for all of them, and one CLIP text call on the k candidate
  texts padded to the longest of them (Hugging Face's `padding=True`, here the real-length tower);
- a naive loop of the method, as first reference code is written: a full LM forward over the whole
  sequence per step and per candidate, one text call per candidate (kept as a second row, on one image:
  it is minutes per caption).
Speed-ups are captions/s over the reference's captions/s. The stop string is off so that every caption
runs to the same length (equal work); EOS still ends one, and the mean length is recorded.
The 1-minute load average is recorded at the start and the end, with a note when it is above 1.5
(other jobs on the machine slow every design; the captions/s are then low).

    python benchmarks/iterative_speed.py --out benchmarks/results/iterative_speed_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from unembed import text_tower
from unembed.decoders.iterative import IterativeDecoder
from unembed.embedders import Embedder
from machine_load import load_average, load_record

GPT2_124M = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024}  # transformers' GPT2Config()


def ends_with(caption: list[int], v: int, tok, settings) -> bool:
    """Add the chosen token to the caption (EOS is not added); whether the caption has ended."""
    if v == tok.eos_id:
        return True
    caption.append(v)
    return bool(settings.stop and settings.stop in tok.decode([v]))


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
            if ends_with(caption, ids[int(score.argmax())].item(), tok, settings):
                break
        captions.append(caption)
    return captions


@torch.no_grad()
def magic_one_step_fast(decoder, targets: torch.Tensor, settings) -> list[list[int]]:
    """MAGIC's own design (see the module docstring), one image at a time, with unembed's conventions for
    the candidate text (an EOS candidate is judged as the caption without it) so that outputs compare."""
    from unembed.compat import import_transformers

    tok, lm, embedder = decoder.tokenizer, decoder.lm, decoder.embedder
    scale, alpha, beta, k = decoder.logit_scale(settings), settings.alpha, settings.beta, settings.k
    start = torch.tensor([[tok.bos_id] + (tok.encode(settings.prompt) if settings.prompt else [])], device=lm.device)
    captions = []
    for target in F.normalize(targets.float(), dim=-1).to(lm.device):
        out = lm(input_ids=start, past_key_values=import_transformers().DynamicCache(), use_cache=True,
                 output_hidden_states=True)
        past, context, logits = out.past_key_values, out.hidden_states[-1], out.logits[:, -1]
        caption = []
        for _ in range(settings.max_length):
            probs = logits.float().softmax(dim=-1)
            top_ids = logits.topk(k, dim=-1).indices  # [1, k]
            top_probs = probs.gather(1, top_ids)
            past.batch_repeat_interleave(k)  # MAGIC's enlarge_past_key_values
            # MAGIC also passes attention_mask=ones([k, 1]): the transformers it was written for broadcast
            # that over the past; today's would read it as masking the past, so it is left out here.
            out = lm(input_ids=top_ids.view(-1, 1), past_key_values=past, use_cache=True, output_hidden_states=True)
            hidden = out.hidden_states[-1]  # [k, 1, E]
            cosine = F.normalize(context.expand(k, -1, -1).float(), dim=-1) @ F.normalize(hidden.float(), dim=-1).transpose(1, 2)
            penalty = cosine.squeeze(-1).amax(dim=-1)  # [k]
            ids = top_ids[0].tolist()
            texts = [tok.decode(caption + [v] if v != tok.eos_id else caption) for v in ids]
            text = text_tower.encode_text(embedder.model, embedder.tokenizer(texts).to(lm.device)).float()
            clip_score = (scale * text @ target).softmax(dim=-1)
            score = (1 - alpha) * top_probs[0].float() - alpha * penalty + beta * clip_score
            chosen = int(score.argmax())
            past.batch_select_indices(torch.tensor([chosen], device=lm.device))  # select_past_key_values
            context = torch.cat([context, hidden[chosen:chosen + 1]], dim=1)
            logits = out.logits[chosen:chosen + 1, -1]
            if ends_with(caption, ids[chosen], tok, settings):
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
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--naive-images", type=int, default=1, help="images the naive loop decodes (0: skip it)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="compute precision (autocast)")
    args = parser.parse_args()
    from unembed.pipeline import inference_precision

    with inference_precision(args.dtype, args.device):
        run(args)


def run(args) -> None:
    load_start = load_average()
    torch.manual_seed(0)
    embedder = Embedder.from_spec(args.embedder, device=args.device)
    decoder = IterativeDecoder.build(embedder, lm="scratch", tokenizer="clip-bpe", lm_config=json.loads(args.lm_config),
                                     k=args.k, max_length=args.length, stop="").to(args.device).eval()
    settings = decoder.settings({})
    batches = [int(b) for b in args.batches.split(",")]
    images = max(batches)  # every caption timed is checked against MAGIC's design
    targets = F.normalize(torch.randn(images, embedder.dim), dim=-1)
    results = {"device": args.device, "dtype": args.dtype, "cpu": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "lm": f"GPT-2 architecture {json.loads(args.lm_config)}, random weights, "
                     f"{sum(p.numel() for p in decoder.lm.parameters()) / 1e6:.1f}M parameters",
               "embedder": f"open_clip {args.embedder}, random weights (text tower re-ranks)",
               "k": args.k, "max_tokens": args.length, "alpha": settings.alpha, "beta": settings.beta, "runs": []}

    # Each design runs once untimed at the size it is timed at: the first pass through large tensors
    # pays for growing the heap (measured: the first batch-16 search took twice as long as the next).
    strict = args.device == "cpu"

    def check(ok: bool, message: str) -> None:
        """On the CPU a mismatch stops the run; on a GPU (its minutes are few) it is recorded: its
        kernels round a batch of candidates and one image's differently, and random weights make near ties."""
        if not ok:
            if strict:
                raise AssertionError(message)
            results.setdefault("mismatches", []).append(message)

    magic_one_step_fast(decoder, targets[:1], settings)
    magic_s, magic = timed(lambda: magic_one_step_fast(decoder, targets, settings))
    results["magic_captions_per_s"] = round(images / magic_s, 4)
    print(json.dumps({"magic_images": images, "seconds": round(magic_s, 1)}), flush=True)
    if args.naive_images:
        naive_s, naive = timed(lambda: naive_search(decoder, targets[:args.naive_images], settings))
        check(naive == magic[:args.naive_images], "the naive loop and MAGIC's design disagree")
        results["naive_captions_per_s"] = round(args.naive_images / naive_s, 4)
        results["naive_images"] = args.naive_images
        print(json.dumps({"naive_images": args.naive_images, "seconds": round(naive_s, 1)}), flush=True)
    for batch in batches:
        decoder.search(targets[:batch], settings)  # untimed, as above
        seconds, cached = timed(lambda: decoder.search(targets[:batch], settings))
        same = sum(a == b for a, b in zip(cached, magic))
        check(same == batch, f"unembed's search and MAGIC's design disagree on {batch - same} of {batch} captions")
        rate = batch / seconds
        run = {"batch": batch, "captions_per_s": round(rate, 4), "captions_checked": batch, "same_captions": same,
               "speedup_vs_magic": round(rate / results["magic_captions_per_s"], 2),
               "mean_caption_tokens": round(sum(map(len, cached)) / batch, 1)}
        if "naive_captions_per_s" in results:
            run["speedup_vs_naive"] = round(rate / results["naive_captions_per_s"], 1)
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
    results["same_captions"] = "mismatches" not in results
    results["example_caption"] = decoder.caption_text(magic[0], "")
    results["checked"] = ("every timed caption, as token ids: unembed's search at each batch and the naive loop's "
                          "images against MAGIC's design, which decodes every image")
    results.update(load_record(load_start, load_average(), interleaved=False))
    from unembed.io import write_json

    write_json(args.out, results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
