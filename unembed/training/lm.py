"""Training a caption language model: the LM the iterative decoder (MAGIC) re-ranks.

MAGIC's LM is GPT-2 fine-tuned on the captions' text with SimCTG's objective (Su et al. 2022):
next-token cross-entropy plus a token-level contrastive term that spreads the hidden states of a
caption's tokens apart (margin 0.5), which is what makes the decoder's degeneration penalty
informative. Offline the LM is a GPT-2-architecture model trained from scratch ("scratch", sized by
`lm_config` over `SCRATCH_LM`), with a BPE learned from the captions ("corpus:N") by default.

Each caption is [start] caption [end] ([N, T] ids, padding told apart by length); the loss is
cross-entropy over the T-1 predicted tokens, plus the contrastive term over the same positions'
last hidden states [N, T-1, E]. Held-out captions give the validation loss and perplexity.

The output directory is a Hugging Face model directory (config.json + model.safetensors, so
`AutoModelForCausalLM.from_pretrained(out_dir)` loads it) with the tokenizer's files and
`unembed_lm.json` naming the tokenizer, so `IterativeDecoder.build(embedder, lm=out_dir)` takes it.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from unembed.decoders.iterative import LM_METADATA, IterativeConfig, lm_and_tokenizer
from unembed.tokenizers import encode_captions
from unembed.errors import BadInputError
from unembed.io import read_json, write_json
from unembed.training.loop import Task, TrainConfig, fit

# From scratch an LM needs a far larger rate than MAGIC's GPT-2 fine-tuning (lr 2e-5, batch 128,
# 20k steps): pass --lr 2e-5 when fine-tuning a pretrained LM.
LM_DEFAULTS = dict(epochs=10, batch_size=64, lr=5e-4, warmup_steps=200, weight_decay=0.01)
VALIDATION_CAPTIONS = 1000


class LMTask(Task):
    def __init__(self, lm, tokenizer, captions: list[str], validation: list[str], max_tokens: int, margin: float):
        self.model = lm
        self.margin = margin
        self.tokens, self.lengths = encode_captions(tokenizer, captions, max_tokens, start=True)
        self.validation = encode_captions(tokenizer, validation, max_tokens, start=True) if validation else None

    def num_examples(self) -> int:
        return len(self.lengths)

    def batch(self, indices, generator):
        longest = int(self.lengths[indices].max())
        lengths = self.lengths[indices]
        # The global batch's counts (0-d, so every process keeps them whole): each process returns its
        # part of the one-process loss, which is a mean over all processes' tokens and token pairs.
        real = lengths - 1
        return {"tokens": self.tokens[indices, :longest], "lengths": lengths,
                "real_tokens": real.sum().float(), "token_pairs": (real * (real - 1)).sum().float()}

    def loss_units(self, batch) -> float:
        return 1.0  # `loss` already returns this process's part of the whole batch's loss

    def loss(self, model, batch):
        nll, valid, hidden = caption_nll(model, batch["tokens"], batch["lengths"], self.margin > 0)
        ce = nll[valid].sum() / batch["real_tokens"]
        if self.margin <= 0:
            return ce, {}
        cl = simctg_loss(hidden, valid, self.margin, batch["token_pairs"])
        return ce + cl, {"ce": round(ce.item(), 5), "simctg": round(cl.item(), 5)}

    @torch.no_grad()
    def validate(self, model):
        if self.validation is None:
            return {}
        model.eval()
        tokens, lengths = self.validation
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for i in range(0, len(lengths), 256):
            rows = lengths[i:i + 256]
            nll, valid, _ = caption_nll(model, tokens[i:i + 256, :int(rows.max())].to(device), rows.to(device))
            total, count = total + float(nll[valid].sum()), count + int(valid.sum())
        loss = total / count
        return {"val_loss": round(loss, 4), "val_perplexity": round(math.exp(loss), 3)}

    def selection_score(self, metrics):
        return -metrics["val_loss"] if "val_loss" in metrics else None  # the lowest loss is the best

    def save(self, model, out_dir, metrics):
        save_pretrained(model, Path(out_dir))
        write_json(Path(out_dir) / "metrics.json", metrics)


def caption_nll(model, tokens: torch.Tensor, lengths: torch.Tensor, hidden: bool = False):
    """Per-position next-token loss [N, T-1], which positions are real [N, T-1], and (if asked) the
    last hidden states there [N, T-1, E]. Right padding needs no attention mask in a causal LM: no
    real position attends to a later one."""
    out = model(input_ids=tokens, output_hidden_states=hidden)
    nll = F.cross_entropy(out.logits[:, :-1].transpose(1, 2).float(), tokens[:, 1:], reduction="none")
    valid = torch.arange(tokens.shape[1] - 1, device=tokens.device)[None, :] < (lengths - 1)[:, None]
    return nll, valid, out.hidden_states[-1][:, :-1] if hidden else None


def simctg_loss(hidden: torch.Tensor, valid: torch.Tensor, margin: float, pairs_total=None) -> torch.Tensor:
    """SimCTG's token contrast: mean over pairs i != j of a caption's real positions of
    max(0, margin - (cos(h_i, h_i) - cos(h_i, h_j))); the sum over these rows' pairs divided by
    `pairs_total` (a whole batch's pair count) when given."""
    h = F.normalize(hidden.float(), dim=-1)
    cosine = h @ h.transpose(1, 2)  # [N, T, T]
    gap = cosine.diagonal(dim1=1, dim2=2)[:, :, None] - cosine
    pairs = valid[:, :, None] & valid[:, None, :] & ~torch.eye(len(valid[0]), dtype=torch.bool, device=h.device)
    total = pairs.sum().clamp(min=1) if pairs_total is None else pairs_total.clamp(min=1)
    return (F.relu(margin - gap) * pairs).sum() / total


def save_pretrained(model, out_dir: Path) -> None:
    """The LM's HF files, each moved into place whole (save_pretrained itself writes in place)."""
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".lm-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        files = sorted(os.listdir(tmp), key=lambda name: name == "config.json")  # the config last
        for name in files:
            os.replace(Path(tmp) / name, out_dir / name)


def split_validation(captions: list[str], seed: int) -> tuple[list[str], list[str]]:
    """Hold out distinct captions (1 in 20, at most VALIDATION_CAPTIONS): every copy of a held-out
    caption leaves the training set, so the validation loss measures unseen text."""
    unique = list(dict.fromkeys(captions))
    held = min(VALIDATION_CAPTIONS, len(unique) // 20)
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed)).tolist()
    validation = [unique[i] for i in order[:held]]
    held_out = set(validation)
    return [c for c in captions if c not in held_out], validation


def train_lm(captions: list[str], out_dir, config: TrainConfig, lm: str = "scratch", tokenizer: str = "",
             lm_config: dict | None = None, validation_captions: list[str] | None = None,
             max_caption_tokens: int = 40, simctg_margin: float = 0.5, resume: bool = False,
             progress: bool = True) -> dict:
    """Train (or fine-tune) a causal LM on caption text and save it to out_dir.

    lm: "scratch" (GPT-2 architecture, `lm_config` overrides SCRATCH_LM's sizes) or an HF LM id/directory.
    tokenizer: "" = "corpus:4000" for a scratch LM, the LM's own otherwise; or "clip-bpe", "corpus:N", an HF id.
    validation_captions: None holds out a share of `captions` (`split_validation`).
    """
    if not captions:
        raise BadInputError("captions", "no captions to train the LM on")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)  # the initial weights too are a function of the seed
    if validation_captions is None:
        captions, validation_captions = split_validation(captions, config.seed)
    # The LM half of an iterative decoder's config names the LM and tokenizer the same way here.
    spec = IterativeConfig(lm=lm, lm_config=dict(lm_config or {}),
                           tokenizer=tokenizer or ("corpus:4000" if lm == "scratch" else ""))
    # A resumed run keeps the tokenizer it started with (saved before the first step).
    saved = resume and (out_dir / LM_METADATA).is_file()
    if saved:
        spec.tokenizer = read_json(out_dir / LM_METADATA)["tokenizer"]
    model, text_tokenizer = lm_and_tokenizer(spec, directory=out_dir if saved else None, captions=captions)
    text_tokenizer.save(out_dir)
    # A caption longer than the LM's positions would index past its position table.
    max_caption_tokens = min(max_caption_tokens, getattr(model.config, "n_positions", max_caption_tokens))
    write_json(out_dir / LM_METADATA, {"format": "unembed-lm", "lm": lm, "tokenizer": spec.tokenizer or lm,
                                       "max_caption_tokens": max_caption_tokens, "simctg_margin": simctg_margin})
    task = LMTask(model, text_tokenizer, captions, validation_captions, max_caption_tokens, simctg_margin)
    result = fit(task, config, out_dir, resume=resume, progress=progress)
    return {"kind": "lm", "train_steps": result.steps, "train_seconds": round(result.seconds, 1),
            "final_loss": round(result.final_loss, 4), **result.metrics}
