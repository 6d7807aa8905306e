"""Help that teaches: examples for every command, a description and default for every option.

`finish_help(parser)` walks the whole parser once it is built: each command gets its EXAMPLES as an
epilog (tests/test_help.py parses every example, so none can go stale), an option registered without
help gets the shared wording of COMMON_HELP (the same flag means the same thing in every command),
and defaults are shown by HelpFormatter.
"""
from __future__ import annotations

import argparse

COMMON_HELP = {
    "device": "where models run: auto (CUDA when there is one, else CPU), cpu, cuda, cuda:N",
    "batch_size": "items per batch",
    "epochs": "passes over the training data (default: the method's)",
    "lr": "peak learning rate (default: the method's)",
    "warmup_steps": "steps of linear learning-rate warm-up (default: the method's)",
    "seed": "random seed (same seed, same result)",
    "mixed_precision": "train in fp16 or bf16 autocast (fp16 with loss scaling); default: fp32",
    "embedder": "the embedder: an open_clip name:tag (ViT-B-32:openai), hf-hub:ORG/NAME, a directory from "
                "`unembed train clip`, or bundle (the shipped scenes embedder)",
    "out": "where to write it",
    "format": "output format",
    "split": "the data split to use (a folder DATA/SPLIT with captions.json)",
    "no_spice": "skip SPICE (needs Java and the Stanford CoreNLP jars)",
    "max_pairs": "at most this many (image, caption) pairs",
    "port": "TCP port to listen on",
    "image_size": "side of the square images, in pixels",
    "paths": "image files, folders or glob patterns",
    "kind": "which method's checkpoint it is",
    "num_beams": "beam search width (1 = greedy)",
    "max_caption_tokens": "captions are cut to this many tokens in training",
}

EXAMPLES = {
    "caption": ["unembed caption examples/*.png",
                "unembed caption photos/ --decoder clipcap-coco --out captions.jsonl",
                "unembed caption --embeddings photos.safetensors --decoder models/capdec --rerank 8"],
    "embed": ["unembed embed photos/ --embedder ViT-B-32:openai --out photos.safetensors"],
    "eval": ["unembed eval --results captions.jsonl --refs data/test/captions.json",
             "unembed eval --results captions.jsonl --refs data/test/captions.json --embedder bundle --no-spice",
             "unembed eval --invert --decoder models/capdec --data scenes --rerank 8"],
    "demo": ["unembed demo", "unembed demo --n 8 --out demo-images"],
    "compare": ["unembed compare --data scenes --decoders retrieval,capdec,clipcap --out compare-scenes",
                "unembed compare --data coco --embedder ViT-B-32:openai --decoders capdec=models/capdec,retrieval "
                "--out compare-coco"],
    "gap": ["unembed gap --data scenes --embedder models/scenes-clip --out gap"],
    "train clip": ["unembed train clip --data scenes --out models/scenes-clip --epochs 5"],
    "train coca": ["unembed train coca --data scenes --out models/coca"],
    "train lm": ["unembed train lm --captions captions.txt --out models/lm"],
    "train capdec": ["unembed train capdec --data scenes --embedder models/scenes-clip --out models/capdec",
                     "unembed train capdec --captions captions.txt --embedder ViT-B-32:openai --lm gpt2 "
                     "--lm-mode lora --out models/capdec"],
    "train clipcap": ["unembed train clipcap --data coco --embedder ViT-B-32:openai --out models/clipcap"],
    "train decap": ["unembed train decap --captions captions.txt --embedder ViT-B-32:openai --out models/decap"],
    "train corrector": ["unembed train corrector --base models/capdec --data scenes --out models/corrector",
                        "unembed train corrector --base capdec --captions captions.txt --out models/corrector "
                        "--max-captions 20000"],
    "train viecap": ["unembed train viecap --data scenes --embedder models/scenes-clip --out models/viecap"],
    "build retrieval": ["unembed build retrieval --captions captions.txt --embedder bundle --out models/retrieval"],
    "build iterative": ["unembed build iterative --embedder ViT-B-32:openai --lm gpt2 --out models/magic"],
    "build ensemble": ["unembed build ensemble --member models/viecap-seed-0 --member models/viecap-seed-1 "
                       "--member models/viecap-seed-2 --out models/viecaps",
                       "unembed build ensemble --member capdec --member viecap --out models/text-only"],
    "build coca": ["unembed build coca --embedder coca_ViT-B-32:mscoco_finetuned_laion2b_s13b_b90k --out models/coca"],
    "import": ["unembed import clipcap coco_weights.pt --out models/clipcap-coco",
               "unembed import decap decap_coco.pt --memory captions.txt --out models/decap-coco"],
    "data scenes": ["unembed data scenes --out scenes --n 2000"],
    "data import": ["unembed data import --format karpathy --annotations dataset_coco.json --images coco-images "
                    "--out coco"],
    "serve": ["unembed serve", "unembed serve --decoder clipcap --decoder models/capdec --port 8080"],
    "models": ["unembed models", "unembed models --json", "unembed models --fetch clipcap-coco"],
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; each option's default shown where it has one worth showing."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and default not in (None, False, argparse.SUPPRESS) and "default" not in text
                and not isinstance(action, argparse._StoreTrueAction)):
            text += f" (default: {default})"
        return text


def commands(parser: argparse.ArgumentParser, name: str = ""):
    """(command name, parser) for every command and subcommand, e.g. ("train capdec", parser)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                full = f"{name} {sub}".strip()
                yield full, child
                yield from commands(child, full)


def finish_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.formatter_class = HelpFormatter
    for name, child in commands(parser):
        child.formatter_class = HelpFormatter
        if name in EXAMPLES:
            child.epilog = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name])
        for action in child._actions:
            if action.help is None and action.dest in COMMON_HELP:
                action.help = COMMON_HELP[action.dest]
    return parser
