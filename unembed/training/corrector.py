"""Training a corrector (decoders/corrector.py) over a text-only base decoder, from captions alone.

Each training caption c is embedded; its embedding t gets the corrector's noise (CapDec's Gaussian, so
that it looks like what an image would give; a `clean_share` of captions keep theirs clean, as a text
embedding to invert arrives); the base decodes t into a hypothesis h; h is embedded. The corrector
learns to write c from (t, e(h), t - e(h)) and h's tokens: next-token cross-entropy on c, through the
one training loop (PrefixTask). Hypotheses are made once, before training, in batches.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from unembed.data.vectors import Embedded
from unembed.decoders.bridges import add_noise
from unembed.decoders.edits import substitutes
from unembed.errors import BadInputError
from unembed.training.loop import TrainConfig, fit
from unembed.training.prefix import VALIDATION_IMAGES, PrefixTask, check_sources, validation_set

HYPOTHESIS_BATCH = 256
def hypotheses(base, embedder, captions: list[str], noise_variance: float, clean_share: float,
               generator: torch.Generator, progress: bool = True) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """(targets t [N, D], the base's hypotheses h, their embeddings e(h) [N, D]) for the captions."""
    vectors = F.normalize(embedder.embed_texts(captions).float(), dim=-1)
    noisy = add_noise(vectors, noise_variance, "gaussian", generator)
    clean = torch.rand(len(captions), generator=generator) < clean_share
    targets = torch.where(clean[:, None], vectors, noisy)
    written = []
    for start in range(0, len(captions), HYPOTHESIS_BATCH):
        part = targets[start:start + HYPOTHESIS_BATCH]
        ids = [str(i) for i in range(start, start + len(part))]
        written += base.decode(Embedded(part, ids, embedder.id, embedder.spec, "text"), num_beams=1)
        if progress:
            print(f"\rhypotheses: {len(written)}/{len(captions)}", end="", flush=True)
    if progress:
        print(flush=True)
    return targets, written, F.normalize(embedder.embed_texts(written).float(), dim=-1)


def train_corrector(base_dir, embedder, out_dir, config: TrainConfig, data_dir=None, caption_files=(),
                    resume: bool = False, progress: bool = True, max_captions: int = 0,
                    validation_images: int = VALIDATION_IMAGES, **options) -> dict:
    """Train a corrector over the base decoder in `base_dir` and save it (with the base inside) to out_dir;
    `max_captions` > 0: a seeded sample of that many distinct captions (each costs the base a decode)."""
    from unembed.data.captions import caption_corpus
    from unembed.decoders import load_decoder
    from unembed.decoders.corrector import CorrectorConfig, CorrectorDecoder

    check_sources("corrector", data_dir, caption_files)
    base = load_decoder(base_dir, device=str(embedder.device), embedder=embedder)
    if not base.text_only or not hasattr(base, "generate_from"):
        raise BadInputError(str(base_dir), f"a corrector wraps a text-only prefix decoder (capdec, decap, viecap), "
                                           f"not {base.kind}")
    captions, _ = caption_corpus(caption_files, Path(data_dir) if data_dir else None)
    unique = list(dict.fromkeys(captions))
    if not unique:
        raise BadInputError("corrector", "needs captions: --captions FILE or --data DIR with train/captions.json")
    if 0 < max_captions < len(unique):
        keep = torch.randperm(len(unique), generator=torch.Generator().manual_seed(config.seed))[:max_captions]
        unique = [unique[i] for i in sorted(keep.tolist())]
    torch.manual_seed(config.seed)
    decoder_config = CorrectorConfig(embedder_spec=embedder.spec, embedder_id=embedder.id, embed_dim=embedder.dim,
                                     base_kind=base.kind, tokenizer=base.config.tokenizer, **options)
    decoder = CorrectorDecoder(decoder_config, base.tokenizer, base=base)
    decoder.attach_embedder(embedder)
    targets, written, written_vectors = hypotheses(base, embedder, unique, decoder_config.noise_variance,
                                                   decoder_config.clean_share,
                                                   torch.Generator().manual_seed(config.seed), progress)
    decoder.train_hypotheses = {c: decoder.prompt(h) for c, h in zip(unique, written)}
    decoder.substitutes = substitutes(captions)
    inputs = decoder.inputs(targets, written_vectors)
    task = PrefixTask(decoder, inputs, torch.arange(len(unique)), unique, text_only=False,
                      validation=validation_set(embedder, Path(data_dir) if data_dir else None),
                      validation_images=validation_images)
    result = fit(task, config, out_dir, resume=resume, progress=progress)
    already = sum(h == c for h, c in zip(written, unique))
    return {"kind": "corrector", "base": str(base_dir), "base_kind": base.kind, "captions": len(unique),
            "train_steps": result.steps,
            "train_seconds": round(result.seconds, 1), "final_loss": round(result.final_loss, 4),
            "training_hypotheses_already_right": round(already / len(unique), 4), **result.metrics}
