"""Train a small joint embedder (open_clip CLIP) from scratch with the contrastive loss.

The offline stand-in for CLIP: trained on the scenes world (`unembed data scenes`), in CLIP's
regime (logit scale starts at 1/0.07 and may reach 100), so that image and text embeddings keep a
modality gap as real CLIP's do and the text-only decoders face the problem they exist for.

Data: a split directory with captions.json (COCO format) and its images, of any size and format.
Captions are tokenised once into [N, C, context] ints; images are read per step, in DataLoader
workers ahead of the model (memory does not grow with the split), through open_clip's training
transform (random resized crop to the embedder's size, its mean and std). A batch pairs each image
with one of its captions chosen at random. Each image's crop is drawn from (seed, step, position in
the batch), so a resumed run, or one with more workers or processes, sees the same pixels.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from unembed.data.splits import has_split, load_split
from unembed.embedders import Embedder, scenes_config
from unembed.io import write_json
from unembed.training.loop import Task, TrainConfig, step_generator, step_indices, step_seed

MAX_LOGIT_SCALE = math.log(100)
CLIP_DEFAULTS = dict(epochs=6, batch_size=128, lr=1e-3, weight_decay=0.1, warmup_steps=100)


class TrainImages(torch.utils.data.Dataset):
    """A split's images, read when a batch asks for them, each through the training transform under
    its own seed. Items are keyed (seed, step, position, index), as `StepBatches` yields them."""

    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int, int, int]) -> tuple[int, torch.Tensor]:
        from unembed.data.images import load_image

        seed, step, position, index = key
        image = load_image(self.paths[index])
        with torch.random.fork_rng(devices=[]):  # the crop's draws, never the process's own stream
            torch.manual_seed(step_seed(seed, step, position))
            return index, self.transform(image)


class StepBatches(torch.utils.data.Sampler):
    """The DataLoader's batch sampler: each step's examples as the loop draws them (`step_indices`)."""

    def __init__(self, steps: range, n: int, batch_size: int, seed: int):
        self.steps, self.n, self.batch_size, self.seed = steps, n, batch_size, seed

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self):
        for step in self.steps:
            indices = step_indices(step, self.n, self.batch_size, self.seed).tolist()
            yield [(self.seed, step, position, index) for position, index in enumerate(indices)]


def _collate(items: list[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([index for index, _ in items]), torch.stack([pixels for _, pixels in items])


def train_transform(preprocess: dict):
    """open_clip's training transform for an embedder's preprocess config (size, mean, std)."""
    from unembed.compat import import_open_clip

    import_open_clip()
    from open_clip.transform import image_transform

    return image_transform(preprocess["image_size"], is_train=True, mean=tuple(preprocess["mean"]),
                           std=tuple(preprocess["std"]))


def tokenize_captions(tokenizer, captions: list[list[str]]) -> torch.Tensor:
    """[N, C, context] token ids; images with fewer than C captions repeat their first ones."""
    per_image = max(len(c) for c in captions)
    flat = [c[i % len(c)] for c in captions for i in range(per_image)]
    tokens = tokenizer(flat)
    return tokens.view(len(captions), per_image, -1).to(torch.int32)


@torch.no_grad()
def retrieval_metrics(image_vecs: torch.Tensor, text_vecs: torch.Tensor, text_owner: torch.Tensor) -> dict:
    """COCO-style recall: image->text hits if any of the image's captions ranks in the top k;
    text->image hits if the caption's own image ranks in the top k. Also the modality-gap statistics."""
    sims = image_vecs @ text_vecs.T  # [I, T]
    out = {}
    for k in (1, 5):
        top_texts = sims.topk(k, dim=1).indices                       # [I, k]
        out[f"i2t_R@{k}"] = (text_owner[top_texts] == torch.arange(len(image_vecs))[:, None]).any(1).float().mean().item()
        top_images = sims.T.topk(k, dim=1).indices                    # [T, k]
        out[f"t2i_R@{k}"] = (top_images == text_owner[:, None]).any(1).float().mean().item()
    from unembed.eval.gap import _derangement

    matched = (image_vecs[text_owner] * text_vecs).sum(-1)
    # Random pairs are a caption and another image: a derangement over images (as `unembed gap`
    # pairs them), never a neighbouring caption, which is mostly of the same image.
    other_image = _derangement(len(image_vecs), torch.Generator().manual_seed(0))
    shuffled = (image_vecs[other_image[text_owner]] * text_vecs).sum(-1)
    out["gap_matched_cos"] = matched.mean().item()
    out["gap_random_cos"] = shuffled.mean().item()
    out["gap_mean_distance"] = (image_vecs.mean(0) - text_vecs.mean(0)).norm().item()
    return {k: round(v, 4) for k, v in out.items()}


def evaluate_embedder(embedder: Embedder, split_dir) -> dict:
    from unembed.data.images import iter_pixel_batches

    paths, captions, _ = load_split(split_dir)
    # Batch by batch: a COCO split held as decoded images would take gigabytes (5,000 of 640x480).
    # No on_error: every image of a scored split must load.
    image_vecs = torch.cat([embedder.embed_pixels(pixels, [str(p) for p in files]).unit() for files, pixels in
                            iter_pixel_batches(paths, 64, embedder.preprocess, device=embedder.device)])
    texts = [c for caps in captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    return retrieval_metrics(image_vecs, embedder.embed_texts(texts), owner)


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's rows of `x` in rank order, with gradients flowing back to their owners, and
    where this process's rows start. Processes may hold different numbers of rows (a global batch
    of 33 on 2 processes): each pads to the largest count for the collective and the padding is cut."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x, 0
    from torch.distributed.nn.functional import all_gather

    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([len(x)], device=x.device))
    counts = [int(c) for c in counts]
    padded = torch.nn.functional.pad(x, (0, 0, 0, max(counts) - len(x)))
    parts = all_gather(padded)
    rank = dist.get_rank()
    return torch.cat([part[:n] for part, n in zip(parts, counts)]), sum(counts[:rank])


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over the whole global batch (open_clip's ClipLoss on one process).
    Across processes each scores its own rows against everyone's, which makes the row-weighted
    average over processes (the loop's loss share) equal the one-process loss on the whole batch,
    also when the processes hold different numbers of rows."""
    import torch.nn.functional as F

    both, start = gather_rows(torch.cat([image, text], dim=1))
    all_image, all_text = both.split(image.shape[1], dim=1)
    labels = torch.arange(start, start + len(image), device=image.device)
    per_image = logit_scale * image @ all_text.T   # [n, N]: my images against every caption
    per_text = logit_scale * text @ all_image.T    # [n, N]: my captions against every image
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


class ClipTask(Task):
    def __init__(self, embedder: Embedder, train_dir, eval_dir=None):
        self.embedder = embedder
        self.model = embedder.model
        self.paths, captions, _ = load_split(train_dir)
        self.tokens = tokenize_captions(embedder.tokenizer, captions)
        self.preprocess = embedder.config["preprocess"]
        self.eval_dir = eval_dir

    def num_examples(self) -> int:
        return len(self.paths)

    def batch(self, indices, generator):
        """The batch's captions; `batches` adds its pixels."""
        choice = torch.randint(self.tokens.shape[1], (len(indices),), generator=generator)
        return {"tokens": self.tokens[indices, choice].long()}

    def batches(self, steps, batch_size, seed, workers=0):
        from torch.utils.data import DataLoader

        sampler = StepBatches(steps, len(self.paths), batch_size, seed)
        loader = DataLoader(TrainImages(self.paths, train_transform(self.preprocess)), batch_sampler=sampler,
                            num_workers=workers, collate_fn=_collate)
        for step, (indices, pixels) in zip(steps, loader):
            yield indices, {**self.batch(indices, step_generator(seed, step)), "pixels": pixels}

    def loss(self, model, batch):
        out = model(batch["pixels"], batch["tokens"])
        loss = contrastive_loss(out["image_features"], out["text_features"], out["logit_scale"])
        return loss, {"logit_scale": round(out["logit_scale"].item(), 2)}

    def after_step(self, model):
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def validate(self, model):
        if self.eval_dir is None:
            return {}
        model.eval()
        self.embedder.device = next(model.parameters()).device
        return evaluate_embedder(self.embedder, self.eval_dir)

    def selection_score(self, metrics):
        # retrieval both ways at rank 1: what an embedder is for
        if "i2t_R@1" in metrics and "t2i_R@1" in metrics:
            return (metrics["i2t_R@1"] + metrics["t2i_R@1"]) / 2
        return None

    def save(self, model, out_dir, metrics):
        self.embedder.save(out_dir)
        write_json(Path(out_dir) / "metrics.json", metrics)


def train_clip(data_dir, out_dir, config: TrainConfig, arch: dict | None = None, resume: bool = False,
               progress: bool = True) -> dict:
    """Train a scenes embedder on DATA/train, validate on DATA/val, report recall on DATA/test."""
    from unembed.training.loop import fit

    data_dir = Path(data_dir)
    torch.manual_seed(config.seed)  # the initial weights too are a function of the seed
    embedder = Embedder.from_config(arch or scenes_config(), device="cpu")
    embedder.device = torch.device("cpu")
    task = ClipTask(embedder, data_dir / "train", data_dir / "val" if has_split(data_dir, "val") else None)
    result = fit(task, config, out_dir, resume=resume, progress=progress)
    report = {"val": result.metrics, "train_steps": result.steps, "train_seconds": round(result.seconds, 1)}
    for split in ("test", "compositional"):
        if has_split(data_dir, split):
            report[split] = evaluate_embedder(Embedder.load(out_dir, device="cpu"), data_dir / split)
    write_json(Path(out_dir) / "metrics.json", report)
    return report
