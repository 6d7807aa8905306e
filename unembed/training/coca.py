"""Train CoCa (Yu et al. 2022) on a caption split: from scratch with both objectives, or fine-tune
any open_clip CoCa checkpoint on captions alone (open_clip's recipe for its mscoco_finetuned weights).

One forward pass, open_clip's CoCaLoss (computed here so that it stays exact across processes):
    contrastive_weight * InfoNCE(image latent [B, D], text latent [B, D])
  + caption_weight * CE(logits [B, L-1, V], caption tokens [B, 1:L]), pad positions ignored.
Batches come from ClipTask (images read per step through open_clip's training transform at the
model's input size, also when the images are smaller: a pretrained 224-px CoCa on 64-px scenes;
captions tokenised once).

Output: OUT/embedder/ (the CoCa model, `Embedder.save`: a joint embedder the other decoders can use)
and OUT/ itself a CoCa decoder directory whose config names the embedder as "embedder" (found
beside it), so `load_decoder(OUT)` and `unembed caption --decoder OUT` work; OUT/metrics.json holds
the contrastive half's retrieval recall, validation captions' BLEU-4/CIDEr and the training time.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
import torch.nn.functional as F

from unembed.decoders.coca import init_decoder_projection, scenes_coca_config  # noqa: F401 (re-exported)
from unembed.embedders import OPENAI_MEAN, OPENAI_STD, Embedder
from unembed.errors import BadInputError
from unembed.data.splits import has_split
from unembed.io import write_json
from unembed.training.clip import ClipTask, contrastive_loss, evaluate_embedder
from unembed.training.loop import TrainConfig, fit

# From scratch (CLIP-like regime); fine-tuning a pretrained CoCa wants a far smaller lr (open_clip's
# COCO fine-tune: lr 1e-5, 1 epoch, batch 128, warm-up 1000).
COCA_DEFAULTS = dict(epochs=5, batch_size=64, lr=1e-3, weight_decay=0.1, warmup_steps=100)
COCA_FINETUNE_DEFAULTS = dict(epochs=1, batch_size=64, lr=1e-5, weight_decay=0.1, warmup_steps=100)
# (contrastive, caption) weights: open_clip's pre-training defaults, and its fine-tuning recipe.
SCRATCH_WEIGHTS, FINETUNE_WEIGHTS = (1.0, 2.0), (0.0, 1.0)
VALIDATION_IMAGES = 200


def pretrained_config(embedder: Embedder) -> dict:
    """An `Embedder.from_config` config for an open_clip CoCa built from a pretrained spec, so the
    fine-tuned model saves as a self-describing embedder directory."""
    from unembed.compat import import_open_clip

    open_clip = import_open_clip()
    from open_clip.coca_model import CoCa

    if embedder.spec.startswith("hf-hub:"):  # the architecture is the repo's open_clip_config.json
        from unembed.hub import repo_id, resolve
        from unembed.io import read_json

        name, found = repo_id(embedder.spec).split("/")[-1], read_json(resolve(embedder.spec, "embedder") /
                                                                        "open_clip_config.json").get("model_cfg")
    else:
        name = embedder.spec.partition(":")[0]
        found = open_clip.get_model_config(name)
    if not found:
        raise BadInputError(embedder.spec, "fine-tuning needs an open_clip CoCa (an architecture name with a pretrained "
                            "tag, or hf-hub:ORG/NAME) or an unembed embedder directory")
    accepted = set(inspect.signature(CoCa).parameters)
    model_cfg = {k: v for k, v in found.items() if k in accepted}
    visual = embedder.model.visual
    size = visual.image_size
    return {"name": f"{name}-finetuned", "model_type": "coca", "model_cfg": model_cfg,
            "preprocess": {"image_size": size[0] if isinstance(size, (tuple, list)) else size,
                           "mean": list(getattr(visual, "image_mean", OPENAI_MEAN)),
                           "std": list(getattr(visual, "image_std", OPENAI_STD))},
            "tokenizer": "clip-bpe"}


class CoCaTask(ClipTask):
    """ClipTask's data and logit-scale clamp; CoCa's two-part loss; saved as embedder + decoder."""

    def __init__(self, embedder: Embedder, train_dir, eval_dir=None, contrastive_weight: float = 1.0,
                 caption_weight: float = 2.0):
        from unembed.decoders.coca import coca_model

        coca_model(embedder)
        super().__init__(embedder, train_dir, eval_dir)
        self.weights = (contrastive_weight, caption_weight)
        self.pad_id = embedder.model.pad_id

    @property
    def unused_parameters(self) -> bool:
        # Captioning only: the contrastive head (text projection, logit scale) gets no gradient.
        return not self.weights[0]

    def batch(self, indices, generator):
        batch = super().batch(indices, generator)
        # The global batch's counts (0-d, so every process keeps them whole): each process's loss is
        # its part of the one-process loss, summed over all processes' rows and caption tokens.
        batch["rows"] = torch.tensor(float(len(indices)))
        batch["caption_tokens"] = (batch["tokens"][:, 1:] != self.pad_id).sum().float()
        return batch

    def loss_units(self, batch) -> float:
        return 1.0  # `loss` already returns this process's part of the whole batch's loss

    def loss(self, model, batch):
        pixels = batch["pixels"]
        tokens = batch["tokens"]
        image_latent, image_tokens = model._encode_image(pixels)
        text_latent, text_tokens = model._encode_text(tokens)  # full context: CLS where embed_texts puts it
        # Causal decoder and pads without loss: positions after the batch's longest caption change
        # nothing, so they skip the [B, L, 49408] vocabulary projection, the costliest part.
        length = int(tokens.argmax(-1).max()) + 1  # the end token has the highest id
        logits = model.text_decoder(image_tokens, text_tokens[:, :length - 1])
        # open_clip's CoCaLoss on one process: weight * InfoNCE + weight * token-mean cross-entropy
        # (pads ignored); the contrastive half is skipped at weight 0, as open_clip does.
        scale = model.logit_scale.exp()
        contrastive = torch.zeros((), device=pixels.device)
        if self.weights[0]:
            contrastive = self.weights[0] * contrastive_loss(image_latent, text_latent, scale)
        caption_sum = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:length], ignore_index=self.pad_id,
                                      reduction="sum")
        caption = self.weights[1] * caption_sum / batch["caption_tokens"]
        part = contrastive * len(tokens) / batch["rows"] + caption
        return part, {"contrastive_loss": round(contrastive.item(), 5),
                      "caption_loss": round((caption * batch["rows"] / len(tokens)).item(), 5),
                      "logit_scale": round(scale.item(), 2)}

    def validate(self, model):
        metrics = super().validate(model)
        if self.eval_dir is None:
            return metrics
        return {**metrics, **self._caption_metrics()}

    def selection_score(self, metrics):
        return metrics.get("val_CIDEr")  # a CoCa is kept for its captions

    def _caption_metrics(self) -> dict:
        from unembed.data.splits import load_split
        from unembed.data.images import load_image
        from unembed.decoders.coca import CoCaDecoder
        from unembed.eval.metrics import coco_caption_metrics

        paths, captions, ids = load_split(self.eval_dir)
        paths, ids = paths[:VALIDATION_IMAGES], [str(i) for i in ids[:VALIDATION_IMAGES]]
        embedded = self.embedder.embed([load_image(p) for p in paths], ids, with_tokens=True)
        predicted = CoCaDecoder.for_embedder(self.embedder).decode(embedded, num_beams=1)
        scores = coco_caption_metrics(dict(zip(ids, predicted)), dict(zip(ids, captions)), spice=False, meteor=False)
        return {"val_BLEU-4": round(scores["BLEU-4"], 4), "val_CIDEr": round(scores["CIDEr"], 4),
                "val_example": predicted[0]}

    def save(self, model, out_dir, metrics):
        from unembed.decoders.coca import CoCaDecoder

        out_dir = Path(out_dir)
        self.embedder.save(out_dir / "embedder")
        CoCaDecoder.for_embedder(self.embedder, embedder_spec="embedder").save(out_dir)
        write_json(out_dir / "metrics.json", metrics)


def initial_embedder(arch: dict | None, init: str | None, seed: int) -> Embedder:
    """A new scenes CoCa (`arch`, default `scenes_coca_config()`), or the CoCa of spec `init`."""
    if init is None:
        torch.manual_seed(seed)  # the initial weights too are a function of the seed
        embedder = Embedder.from_config(arch or scenes_coca_config(), device="cpu")
        init_decoder_projection(embedder.model)
    elif arch is not None:
        raise BadInputError("arch", "applies to training from scratch; fine-tuning keeps the architecture of --init")
    else:
        embedder = Embedder.from_spec(init, device="cpu")
        if "model_cfg" not in embedder.config:
            embedder.config = pretrained_config(embedder)
    embedder.device = torch.device("cpu")
    return embedder


def train_coca(data_dir, out_dir, config: TrainConfig, arch: dict | None = None, init: str | None = None,
               contrastive_weight: float | None = None, caption_weight: float | None = None,
               resume: bool = False, progress: bool = True) -> dict:
    """Train a CoCa on DATA/train (validate on DATA/val, report recall on DATA/test and
    DATA/compositional) and save it to out_dir. Loss weights default to (1, 2) from scratch and
    (0, 1), captioning only, when fine-tuning from `init` (an embedder spec or directory)."""
    data_dir = Path(data_dir)
    embedder = initial_embedder(arch, init, config.seed)
    default = FINETUNE_WEIGHTS if init else SCRATCH_WEIGHTS
    weights = (default[0] if contrastive_weight is None else contrastive_weight,
               default[1] if caption_weight is None else caption_weight)
    val_dir = data_dir / "val" if has_split(data_dir, "val") else None
    task = CoCaTask(embedder, data_dir / "train", val_dir, *weights)
    result = fit(task, config, out_dir, resume=resume, progress=progress)
    report = {"val": result.metrics, "train_steps": result.steps, "train_seconds": round(result.seconds, 1),
              "final_loss": round(result.final_loss, 5), "init": init, "contrastive_weight": weights[0],
              "caption_weight": weights[1]}
    trained = Embedder.load(Path(out_dir) / "embedder", device="cpu")
    for split in ("test", "compositional"):
        if has_split(data_dir, split):
            report[split] = evaluate_embedder(trained, data_dir / split)
    write_json(Path(out_dir) / "metrics.json", report)
    return report
