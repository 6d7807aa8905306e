"""Size on disk of a decoder over a GPT-2-124M-architecture hub LM, as each LM mode saves it: the LM
referenced by id + revision (frozen), referenced with a LoRA adapter in peft's format (lora), a full
copy (full, or --save-full-lm), for ClipCap's MLP mapper (k = 10, 512-d embedding, as published)
and for a one-token linear prefix (DeCap's).

The "hub" is a cache written in the hub's own layout under a temporary HF_HOME, holding a random-
weight GPT-2 124M as "gpt2" (size does not depend on weight values), loaded offline by name.

Nothing is timed. What is checked, for every directory measured: it loads back (`load_decoder`,
offline) into the same decoder, every tensor of its state equal to the saved one's, and it captions
four vectors (greedy, 8 tokens) with the same token ids as the decoder that was saved.

    python benchmarks/decoder_size.py --out benchmarks/results/decoder_size.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def directory_mb(path: Path) -> dict:
    files = {str(f.relative_to(path)): f.stat().st_size for f in path.rglob("*") if f.is_file()}
    return {"total_mb": round(sum(files.values()) / 2 ** 20, 2),
            "files_mb": {k: round(v / 2 ** 20, 3) for k, v in sorted(files.items()) if v > 2 ** 16}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/decoder_size.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="decoder-size-"))
    os.environ.update(HF_HOME=str(work / "hf"), HF_HUB_OFFLINE="1")
    from tests.hub_cache import add_repo
    from unembed.compat import import_transformers

    transformers = import_transformers()
    staging = work / "gpt2-files"
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["a photo of a cat on a sofa", "two dogs in a park"], vocab_size=300,
                            special_tokens=["<|endoftext|>"])
    transformers.GPT2TokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>").save_pretrained(staging)
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(staging, safe_serialization=True)
    add_repo(work / "hf" / "hub", "gpt2", staging)
    base_mb = directory_mb(staging)["total_mb"]

    import torch

    from unembed.decoders import create_decoder, load_decoder
    from unembed.embedders import Embedded

    torch.manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(4, 512), dim=-1)
    embedded = Embedded(vectors, [str(i) for i in range(4)], "ViT-B-32:openai", "ViT-B-32:openai", normalized=True)

    def greedy_ids(decoder) -> torch.Tensor:
        """The token ids `decode` generated (it returns text; the LM's generate is wrapped to keep them)."""
        made, generate = [], decoder.lm.generate
        decoder.lm.generate = lambda *a, **k: made.append(generate(*a, **k)) or made[-1]
        try:
            decoder.decode(embedded, num_beams=1, max_length=8)
        finally:
            del decoder.lm.generate
        return made[0]

    rows = []
    for mapper, k in (("mlp", 10), ("linear", 1)):
        for mode, full in (("frozen", False), ("lora", False), ("full", False), ("lora", True)):
            decoder = create_decoder("clipcap", embedder_spec="ViT-B-32:openai", embedder_id="ViT-B-32:openai",
                                     embed_dim=512, lm="gpt2", lm_mode=mode, mapper=mapper, prefix_length=k,
                                     save_full_lm=full)
            out = work / f"{mapper}-{mode}-{full}"
            decoder.eval()
            decoder.save(out)
            loaded = load_decoder(out)
            saved_state, loaded_state = decoder.state_dict(), loaded.state_dict()
            assert saved_state.keys() == loaded_state.keys(), f"{out.name}: the reloaded decoder has other tensors"
            differ = [k for k in saved_state if not torch.equal(saved_state[k], loaded_state[k])]
            assert not differ, f"{out.name}: {len(differ)} tensors changed on reload, e.g. {differ[:3]}"
            assert torch.equal(greedy_ids(decoder), greedy_ids(loaded)), f"{out.name}: the reloaded decoder " \
                                                                          "captions differently"
            rows.append({"mapper": f"{mapper} (k={k})", "lm_mode": mode + (" --save-full-lm" if full else ""),
                         **directory_mb(out), "reloads_equal": True})
            print(f"{rows[-1]['mapper']:>14} {rows[-1]['lm_mode']:>22}: {rows[-1]['total_mb']:8.2f} MB", flush=True)
    result = {"benchmark": "decoder_size", "base_lm": "GPT-2 124M architecture (random weights)",
              "base_lm_files_mb": base_mb,
              "checked": "every directory reloads offline with every tensor equal to the saved decoder's and the same "
                         "greedy token ids on 4 vectors (nothing here is timed)", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
