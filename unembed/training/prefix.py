"""Training for the prefix decoders (clipcap, capdec, decap): what differs from the one loop is only
which vectors feed the prefix and how they are bridged.

- clipcap: image embeddings paired with their captions (each image once per caption);
- capdec / decap: the caption's own text embedding (text-only), passed through the decoder's bridge
  (noise for capdec; mean shift when asked), images embedded only when mean shift needs their mean;
  with `recombine`, recombined copies of the captions join them (data/recombine.py).
All embeddings are computed once before training (and cached), never per epoch.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from unembed.data.splits import has_split, load_split
from unembed.pipeline import embed_split
from unembed.errors import BadInputError
from unembed.io import write_json
from unembed.tokenizers import make_tokenizer, pad_right
from unembed.training.loop import Task, TrainConfig, fit

VALIDATION_IMAGES = 200  # val CIDEr during and after training (--val-images): what --keep-best chooses by
MARGIN_IMAGES = 1000     # the edit margin's choice at the end (edits.chosen_margin): small CIDEr differences
MIN_MARGIN_IMAGES = 100  # fewer val images choose no margin


class PrefixTask(Task):
    def __init__(self, decoder, vectors: torch.Tensor, pair_vector: torch.Tensor, captions: list[str],
                 text_only: bool, validation=None, validation_images: int = VALIDATION_IMAGES):
        self.model = decoder
        self.vectors = vectors            # [V, D]: image embeddings (clipcap) or caption embeddings
        self.pair_vector = pair_vector    # [P]: which vector each caption is paired with
        self.captions = captions
        self.tokens, self.lengths = decoder.encode_captions(captions)
        self.text_only = text_only
        self.validation = validation      # (Embedded of val images, {image_id: refs}) or None
        self.validation_images = validation_images  # how many of them val CIDEr reads

    def num_examples(self) -> int:
        return len(self.pair_vector)

    def batch(self, indices, generator):
        vectors = self.vectors[self.pair_vector[indices]]
        if self.text_only:
            vectors = self.model.bridge.for_training(vectors, generator)
        longest = int(self.lengths[indices].max())
        batch = {"vectors": vectors, "tokens": self.tokens[indices, :longest], "lengths": self.lengths[indices]}
        prompts = self.model.training_prompts([self.captions[i] for i in indices.tolist()], generator)
        if prompts is not None:  # as tensors, so that each process keeps its own rows of them
            batch["prompt_ids"], batch["prompt_lengths"] = pad_right(prompts, 0)
        return batch

    def loss(self, model, batch):
        prompts = None
        if "prompt_ids" in batch:
            prompts = [ids[:n].tolist() for ids, n in zip(batch["prompt_ids"], batch["prompt_lengths"].tolist())]
        return model.caption_loss(batch["vectors"], batch["tokens"], batch["lengths"], prompts), {}

    def loss_units(self, batch):
        return float(batch["lengths"].sum())

    def validate(self, model):
        if self.validation is None:
            return {}
        from unembed.eval.metrics import coco_caption_metrics

        embedded, references = self.validation
        embedded = embedded.select(range(min(self.validation_images, len(embedded))))
        captions = model.decode(embedded)
        scores = coco_caption_metrics(dict(zip(embedded.ids, captions)), references, spice=False, meteor=False)
        return {"val_BLEU-4": round(scores["BLEU-4"], 4), "val_CIDEr": round(scores["CIDEr"], 4),
                "val_images": len(captions), "val_example": captions[0]}

    def selection_score(self, metrics):
        return metrics.get("val_CIDEr")

    def describe(self, model):
        return model.text_summary()

    def calibrate(self, model):
        # a corrector keeps its own margin, for its steps and its edits alike (its config's)
        if self.validation is None or not model.substitutes or model.wraps_base:
            return {}
        record = choose_edit_margin(model, self.validation)
        return {"calibration": f"not run: {record}"} if isinstance(record, str) else {"edit_margin": record["margin"]}

    def save(self, model, out_dir, metrics):
        model.save(out_dir, metrics)
        write_json(Path(out_dir) / "metrics.json", metrics)

    def save_metrics(self, model, out_dir, metrics):
        from unembed.decoders.base import model_card
        from unembed.decoders.edits import MARGIN_FILE
        from unembed.io import write_text

        if model.edit_margin_record:  # chosen by calibrate, after the decoder itself was saved
            write_json(Path(out_dir) / MARGIN_FILE, model.edit_margin_record)
        write_json(Path(out_dir) / "metrics.json", metrics)
        write_text(Path(out_dir) / "README.md", model_card(model, metrics))  # the card shows them too


def choose_edit_margin(model, validation) -> dict | str:
    """The decoder's own edit margin, chosen on `validation` (validation_set's pair): val CIDEr after
    one round of edits at each of edits.MARGIN_GRID (and none: OFF), every margin from one embedding
    pass. The record (edits.json's) is kept on the decoder and returned; or why none was chosen: on
    fewer than MIN_MARGIN_IMAGES, CIDEr's differences between margins are noise (on one image every
    margin scores 0)."""
    from unembed.decoders.edits import MARGIN_GRID, OFF, chosen_margin, margin_record, one_round_by_margin
    from unembed.eval.metrics import cider_of_each

    embedded, references = validation
    if len(embedded) < MIN_MARGIN_IMAGES:
        return (f"{len(embedded)} val images; the edit margin is chosen on at least {MIN_MARGIN_IMAGES} (it "
                "stays the default)")
    captions = model.decode(embedded)
    by_margin = {OFF: captions, **one_round_by_margin(model.embedder_for_rerank(), embedded.unit(), captions,
                                                      model.substitutes, MARGIN_GRID)}
    scores = cider_of_each({m: dict(zip(embedded.ids, edited)) for m, edited in by_margin.items()}, references)
    scores = {m: round(v, 4) for m, v in scores.items()}  # as recorded: under 1e-4 CIDEr is no reason to edit more
    model.edit_margin_record = margin_record(chosen_margin(scores), scores)
    return model.edit_margin_record


def _split_images(embedder, data_dir: Path | None, split: str):
    """The split's cached image embeddings, or None when there is no such split or it has no images."""
    if data_dir is None or not has_split(data_dir, split):
        return None
    try:
        return embed_split(embedder, data_dir / split)
    except BadInputError:  # a text-only split
        return None


def validation_set(embedder, data_dir: Path | None):
    embedded = _split_images(embedder, data_dir, "val")
    if embedded is None:
        return None
    _, captions, ids = load_split(data_dir / "val")
    embedded = embedded.select(range(min(MARGIN_IMAGES, len(embedded))))
    return embedded, {str(i): refs for i, refs in zip(ids, captions)}


def check_sources(kind: str, data_dir=None, caption_files=()) -> None:
    """What a `kind` decoder trains on is there, checked before any model loads: a text-only method needs
    caption files that exist or DATA/train/captions.json; a paired one needs DATA/train. BadInputError."""
    from unembed.decoders import decoder_class

    for path in caption_files:
        if not Path(path).exists():
            raise BadInputError(path, "no such caption file")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise BadInputError(data_dir, "no such data directory")
    has_train = data_dir is not None and has_split(Path(data_dir), "train")
    if decoder_class(kind).text_only:
        if not caption_files and not has_train:
            raise BadInputError(kind, "needs captions: --captions FILE or --data DIR with train/captions.json")
    elif not has_train:
        raise BadInputError(kind, "trains on (image, caption) pairs: --data DIR with train/captions.json and images")


def train_prefix(kind: str, embedder, out_dir, config: TrainConfig, data_dir=None, caption_files=(),
                 resume: bool = False, progress: bool = True, init=None, validation_images: int = VALIDATION_IMAGES,
                 **decoder_options) -> dict:
    """Train a clipcap / capdec / decap decoder and save it to out_dir; with `init` (a saved decoder of
    this kind and embedder), train that one further instead of a new one. Val CIDEr reads the first
    `validation_images` val images."""
    from unembed.data.captions import caption_corpus
    from unembed.decoders import decoder_class
    from unembed.decoders.edits import substitutes, with_earlier
    from unembed.decoders.prefix import TEXT_OPTIONS

    cls = decoder_class(kind)
    if cls.wraps_base:  # its prompts are a base decoder's hypotheses, made by train_corrector
        raise BadInputError(kind, f"is trained over a base decoder: unembed train {kind} --base DIR")
    if not cls.text_only and set(TEXT_OPTIONS) & set(decoder_options):
        raise BadInputError("recombine", f"does nothing for {kind}: only text-only kinds train on recombined captions")
    check_sources(kind, data_dir, caption_files)
    data_dir = Path(data_dir) if data_dir else None
    torch.manual_seed(config.seed)  # the initial weights too are a function of the seed
    # A saved decoder is loaded (or refused) before any caption or image is embedded.
    decoder = None if init is None else _saved_decoder(kind, init, embedder, decoder_options)
    if decoder is not None:  # its margin was chosen for the weights it had: calibration chooses anew
        decoder.edit_margin_record = None
    # Text-only methods never see the training images; only fitting mean shift needs their mean.
    needs_images = not cls.text_only or (decoder is None and decoder_options.get("mean_shift",
                                                                                cls.config_class.mean_shift))
    images = _split_images(embedder, data_dir, "train") if needs_images else None
    copies = []
    if cls.text_only:
        captions, _ = caption_corpus(caption_files, data_dir)
        if not captions:
            raise BadInputError(kind, "needs captions: --captions FILE or --data DIR with train/captions.json")
        written = list(captions)  # the substitutes come from these, not from recombined copies
        copies = _recombined(decoder.config if decoder else None, decoder_options, captions, config.seed)
        captions += copies
        unique = list(dict.fromkeys(captions))
        vectors = embedder.embed_texts(unique)
        index = {c: i for i, c in enumerate(unique)}
        pair_vector = torch.tensor([index[c] for c in captions])
    else:
        if images is None:
            raise BadInputError(kind, "trains on (image, caption) pairs: --data DIR with train/captions.json and images")
        _, per_image, _ = load_split(data_dir / "train")
        captions = [c for caps in per_image for c in caps]
        pair_vector = torch.tensor([i for i, caps in enumerate(per_image) for _ in caps])
        vectors = images.vectors
        unique, written = None, captions

    if decoder is None:
        decoder = _new_decoder(cls, embedder, config.seed, captions, unique, vectors, images, decoder_options)
    else:
        decoder.refit_text(captions)
    # what `edits` rewrites with; a decoder trained further keeps what its earlier captions taught it too
    decoder.substitutes = with_earlier(substitutes(written), decoder.substitutes)
    validation = validation_set(embedder, data_dir)
    warning = decoder.check_on_val(validation)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    task = PrefixTask(decoder, vectors, pair_vector, captions, cls.text_only, validation, validation_images)
    result = fit(task, config, out_dir, resume=resume, progress=progress)
    return {"kind": kind, "train_steps": result.steps, "train_seconds": round(result.seconds, 1),
            "final_loss": round(result.final_loss, 4), **({} if init is None else {"init": str(init)}),
            **({"recombined_captions": len(copies)} if copies else {}),
            **result.metrics}


def _new_decoder(cls, embedder, seed: int, captions, unique, vectors, images, decoder_options: dict):
    """A decoder of class `cls` with fresh weights, its tokenizer and text knowledge fitted to the
    captions and, for text-only kinds, its bridge fitted to their embeddings (unique, vectors)."""
    projection = decoder_options.pop("projection_size", cls.config_class.projection_size)
    if projection and unique is not None:
        projection = min(projection, len(unique))
    decoder_config = cls.config_class(embedder_spec=embedder.spec, embedder_id=embedder.id, embed_dim=embedder.dim,
                                      projection_size=projection, **decoder_options)
    decoder = cls(decoder_config, make_tokenizer(decoder_config, captions=captions))
    decoder.fit_text(embedder, captions)
    if unique is not None:
        memory = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed))[:projection]
        decoder.bridge.fit(vectors, None if images is None else images.unit(),  # the means of unit vectors
                           [unique[i] for i in memory.tolist()], vectors[memory])
    return decoder


def _recombined(saved, decoder_options: dict, captions: list[str], seed: int) -> list[str]:
    """The recombined copies of the captions a text-only decoder trains on (data/recombine.py), from the
    saved decoder's settings or the options; a new decoder records its word lists as inline JSON, so
    its config names no file of this machine."""
    from unembed.data.recombine import check_recombine, inline_classes, recombined

    if saved:
        spec, rate = saved.recombine, saved.recombine_rate
    else:
        spec, rate = decoder_options.get("recombine", ""), decoder_options.get("recombine_rate")
    if not spec and (saved or rate is None):
        return []
    classes = check_recombine(spec, rate)
    rate = 1.0 if rate is None else rate
    if not saved:
        decoder_options["recombine"] = inline_classes(classes)
    return recombined(captions, classes, rate, seed)


def _saved_decoder(kind: str, init, embedder, decoder_options: dict):
    """The saved decoder `init`, to be trained further. Its config, tokenizer, text knowledge and bridge
    are kept as they are: its weights mean something only with them, so options that set them are refused."""
    from unembed.decoders import decoder_path, load_decoder, read_decoder_config

    if decoder_options:
        raise BadInputError(next(iter(decoder_options)), f"is set by the decoder {init} that --init trains further")
    saved = read_decoder_config(decoder_path(init))
    if saved.get("kind") != kind:
        raise BadInputError(str(init), f"is a {saved.get('kind')} decoder; `train {kind} --init` needs a {kind} one")
    decoder = load_decoder(init, device="cpu", embedder=embedder)  # refused unless built for this embedder
    # The saved spec may be relative to `init` (a bundle's "../embedder"); the new directory names the
    # embedder it was trained with, as a new decoder would.
    decoder.config.embedder_spec = embedder.spec
    return decoder
