"""The decoder interface every method implements, and its saved-directory format.

A decoder turns an `Embedded` ([N, D] vectors, optional [N, T, W] image tokens) into N captions.
Saved as a directory (the Hugging Face / open_clip convention):
    config.json        {"format", "kind", "format_version", "unembed_version", "config": {...}}
    model.safetensors  the decoder's tensors (state_dict)
    + any files the method adds (tokenizer, caption memory) through save_extra / load_extra.
Loading reads config.json first and refuses an unknown kind or a bad config before touching weights.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from unembed import __version__
from unembed.errors import BadInputError, MismatchError, ModelLoadError
from unembed.io import load_module, read_json, save_module, staged_dir, write_json, write_text

DECODER_FORMAT = "unembed-decoder"
FORMAT_VERSION = 4  # 2: an LM that is not fine-tuned is referenced (hub id + revision), not copied;
                    # 3: where the LM's weights are is recorded (lm_weights); embeddings arrive raw;
                    # 4: prefix decoders record no_repeat_ngram_size (earlier ones block no repeats: 0)
_REGISTRY: dict[str, type["Decoder"]] = {}


@dataclass
class DecoderConfig:
    """What every decoder records about the embedding space it decodes."""

    embedder_spec: str = ""  # how to rebuild the embedder (a pretrained name or a directory)
    embedder_id: str = ""    # identity of the exact weights; embeddings from another id are refused
    embed_dim: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Decoder(torch.nn.Module):
    kind: ClassVar[str] = ""
    config_class: ClassVar[type[DecoderConfig]] = DecoderConfig
    summary: ClassVar[str] = ""                  # one line for `unembed train KIND --help` and listings
    needs_tokens: ClassVar[bool] = False         # decodes from image tokens (CoCa), not only vectors
    text_only: ClassVar[bool] = False            # made from captions alone: no images needed (the LM of a
                                                 # training-free decoder counts: it learns from text)
    needs_embedder: ClassVar[bool] = False       # decodes with the embedder's own towers (re-ranking, CoCa)
    # Declared here, once, and read by the CLI, the trainers and `unembed compare`:
    cli_options: ClassVar[tuple[str, ...]] = ()  # config fields that `unembed train KIND` takes as options
    train_defaults: ClassVar[dict] = {}          # TrainConfig defaults of `unembed train KIND` (the paper's)
    compare_recipe: ClassVar[dict] = {}          # `unembed compare`'s scenes-sized training options
    generation_options: ClassVar[tuple[str, ...]] = ()  # what decode(...) takes (unembed/generation.py)
    wraps_base: ClassVar[bool] = False           # trained over another decoder (the corrector), not by `train KIND`
    made_from_others: ClassVar[str] = ""         # the command that makes a kind from other saved decoders (the
                                                 # corrector, an ensemble): no member of an ensemble, never
                                                 # trained by compare
    candidate_score: ClassVar[str] = ""          # what `candidates` scores by ("": it writes none); an ensemble's
                                                 # members must share it, since rerank adds the scores as they are

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self._embedder = None
        # word -> words seen in the same places in the training captions (unembed/decoders/edits.py): set
        # when a decoder is trained on captions, saved as substitutes.json; what `edits` rewrites with.
        self.substitutes: dict[str, list[str]] = {}
        # the record of the edits' margin this decoder chose on its val split (edits.chosen_margin),
        # saved as edits.json; None: edits use EDIT_MARGIN
        self.edit_margin_record: dict | None = None

    @property
    def edit_margin(self) -> float | None:
        """The margin `edits` use when none is given: the one chosen on val, else None (EDIT_MARGIN)."""
        from unembed.decoders.edits import margin_of

        return margin_of(self.edit_margin_record)

    def attach_embedder(self, embedder) -> None:
        """Give a `needs_embedder` decoder the embedder it decodes with (kept outside the module:
        its weights are the embedder's, saved with the embedder, not with the decoder)."""
        self._embedder = embedder

    @property
    def embedder(self):
        if self._embedder is None:
            raise MismatchError(f"the {self.kind} decoder decodes with its embedder; load it with load_decoder(path) "
                                "or call attach_embedder(embedder) first")
        return self._embedder

    def decode(self, embedded, **generation) -> list[str]:
        """N captions for an `Embedded` of N rows; `generation`: options among `generation_options`
        (and LOOP_OPTIONS, rerank and edits, which every kind takes), checked by `check_options` first.
        With rerank N > 1, each row's N candidates from the kind's own search are re-scored against
        the input by the embedder (unembed/decoders/rerank.py)."""
        options = self.check_options(generation)
        n = options.pop("rerank", 1)
        weight, stop, calls, guide, consensus = (options.pop(f"rerank_{k}", None)
                                                 for k in ("weight", "stop", "calls", "guide", "consensus"))
        rounds, margin = options.pop("edits", 0), options.pop("margin", None)
        self.check_embedded(embedded)
        if n <= 1:
            captions = self.write(embedded, **options)
        else:
            from unembed.decoders.rerank import rerank

            captions = rerank(self.embedder_for_rerank(), embedded, self.candidates(embedded, n, **options), weight,
                              stop, calls, guide, consensus or 0.0)
        if not rounds:
            return captions
        from unembed.decoders.edits import edited

        return edited(self.embedder_for_rerank(), embedded.unit(), captions, self.substitutes, rounds,
                      self.edit_margin if margin is None else margin)

    def write(self, embedded, **options) -> list[str]:
        """The kind's own decoding: N captions for N rows, `options` already checked."""
        raise NotImplementedError

    def candidates(self, embedded, n: int, **options) -> list[list[tuple[str, float]]]:
        """Per row, up to `n` (caption, score) pairs from the kind's own search, its score higher for a
        caption it prefers (a length-normalised log-probability, for an LM). Reranking reads these. (An
        ensemble's search is its members': up to `n` from each.)"""
        raise NotImplementedError

    def embedder_for_rerank(self):
        """The embedder that scores candidates: the attached one, else the one the decoder's config names
        (loaded once, on the decoder's device, and kept attached)."""
        if self._embedder is None:
            from unembed.decoders import check_embedder
            from unembed.embedders import load_embedder

            spec = self.recorded_embedder_spec()
            if not spec:
                raise MismatchError(f"rerank scores with the {self.kind} decoder's embedder, and it names none: "
                                    "call attach_embedder(embedder) first")
            embedder = load_embedder(spec, str(self.device_of()))
            check_embedder(self.config.to_dict(), embedder, getattr(self, "source_dir", None) or self.kind)
            self._embedder = embedder
        return self._embedder

    def recorded_embedder_spec(self) -> str:
        """The embedder its config records; a relative directory read beside the directory it was loaded
        from (resolve_embedder_spec)."""
        where = getattr(self, "source_dir", None)
        return resolve_embedder_spec(self.config.to_dict(), where) if where else self.config.embedder_spec

    def device_of(self) -> torch.device:
        first = next(iter(self.parameters()), None)
        return first.device if first is not None else torch.device("cpu")

    @classmethod
    def check_generation(cls, generation: dict) -> dict:
        """The decoding options without None values, each checked against what this kind takes and its
        bounds (unembed/generation.py): BadInputError naming the option, the decoder and what it takes."""
        from unembed.generation import check_generation

        options = check_generation(cls.kind, cls.takes(), generation)
        if "margin" in options and not options.get("edits") and "margin" not in cls.generation_options:
            raise BadInputError("option margin", f"the {cls.kind} decoder uses it only with edits above 0 "
                                                 "(--edits N; edits=N)")
        return options

    def check_options(self, generation: dict) -> dict:
        """`check_generation`, then what this decoder's own files decide: edits need the substitutes it
        learned from its training captions."""
        options = self.check_generation(generation)
        if options.get("edits") and not self.substitutes and "edits" not in self.generation_options:
            from unembed.decoders.edits import no_substitutes

            raise no_substitutes(f"this {self.kind} decoder")
        return options

    @classmethod
    def takes(cls) -> tuple[str, ...]:
        """Every decoding option this kind's decode takes: its own, then the rerank ones (LOOP_OPTIONS)."""
        from unembed.generation import LOOP_OPTIONS

        return cls.generation_options + LOOP_OPTIONS

    @classmethod
    def example(cls, embedder, captions: list[str], workdir: Path) -> "Decoder":
        """A tiny decoder of this kind for `embedder`, with random or quickly fitted weights: what the
        registry-driven tests create, save, load and decode for every registered kind. `workdir`
        is for any file it needs (CoCa saves its own small model there)."""
        raise NotImplementedError(f"the {cls.kind} decoder declares no example")

    def check_embedded(self, embedded) -> None:
        """Refuse embeddings from another embedder or of another dimension, naming both."""
        cfg = self.config
        from unembed.embedders import same_embedder

        if embedded.embedder_id and cfg.embedder_id and not same_embedder(embedded.embedder_id, cfg.embedder_id):
            raise MismatchError(f"this {self.kind} decoder was built for embedder {cfg.embedder_spec!r} "
                                f"(id {cfg.embedder_id}) but the embeddings come from {embedded.embedder_spec!r} "
                                f"(id {embedded.embedder_id})")
        if cfg.embed_dim and embedded.dim != cfg.embed_dim:
            raise MismatchError(f"this {self.kind} decoder expects {cfg.embed_dim}-d embeddings "
                                f"(embedder {cfg.embedder_spec!r}), got {embedded.dim}-d")
        if self.needs_tokens and embedded.image_tokens is None:
            raise MismatchError(f"the {self.kind} decoder needs image token embeddings; embed images with this "
                                "decoder's embedder (a raw vector is not enough)")

    # --- saving -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str = "auto", embedder=None) -> "Decoder":
        """The Hugging Face spelling of `load_decoder`: a directory, hf-hub:ORG/NAME, a zoo or bundle name.
        Called on a method's class (ClipCapDecoder.from_pretrained), it refuses a decoder of another kind."""
        from unembed.decoders import load_decoder

        decoder = load_decoder(name_or_path, device=device, embedder=embedder)
        if cls is not Decoder and not isinstance(decoder, cls):
            raise MismatchError(f"{name_or_path} is a {decoder.kind} decoder, not a {cls.kind} one")
        return decoder

    def save_pretrained(self, path: str | os.PathLike, metrics: dict | None = None) -> None:
        """The Hugging Face spelling of `save` (a directory of config.json and model.safetensors)."""
        self.save(path, metrics)

    def save(self, path: str | os.PathLike, metrics: dict | None = None, *, replace: bool = False) -> None:
        """Write the decoder directory, with a model card (README.md) the hub reads as it is;
        `metrics` (or an existing metrics.json) go into the card. It is written whole beside `path`
        and renamed into place (io.staged_dir), so a crash never leaves new weights under an old
        config.json: `path` is the old decoder or the new one. What else `path` holds (a training run's
        checkpoints and log) is kept, unless `replace`."""
        path = Path(path)
        metrics = metrics if metrics is not None else _saved_metrics(path)
        from unembed.decoders.edits import FILE, MARGIN_FILE

        with staged_dir(path, keep_others=not replace, owned=(FILE, MARGIN_FILE)) as staging:
            self.save_weights(staging)
            self.save_extra(staging)
            if self.substitutes:
                write_json(staging / FILE, self.substitutes)
                if self.edit_margin_record:
                    write_json(staging / MARGIN_FILE, self.edit_margin_record)
            write_text(staging / "README.md", model_card(self, metrics))
            # config.json last: a directory with a config is a complete decoder.
            write_json(staging / "config.json", {"format": DECODER_FORMAT, "kind": self.kind,
                                                 "format_version": FORMAT_VERSION, "unembed_version": __version__,
                                                 "config": self.config.to_dict()})

    def save_weights(self, path: Path) -> None:
        """model.safetensors: the decoder's tensors (methods that reference a base model save less)."""
        save_module(path / "model.safetensors", self)

    def load_weights(self, path: Path) -> None:
        load_module(self, path / "model.safetensors")

    @classmethod
    def upgrade_config(cls, config: dict, format_version: int, path: Path | None = None) -> dict:
        """A config saved by an older format (in directory `path`), brought to this one."""
        return config

    @classmethod
    def from_saved(cls, config: DecoderConfig, path: Path) -> "Decoder":
        """Build an empty decoder for a saved directory (methods with tokenizers read them from `path`)."""
        return cls(config)

    def save_extra(self, path: Path) -> None:
        """Methods with non-tensor state (tokenizers, texts) write it here."""

    def load_extra(self, path: Path) -> None:
        """Counterpart of save_extra, called after the weights are loaded."""


def register_decoder(cls: type[Decoder]) -> type[Decoder]:
    if not cls.kind:
        raise TypeError(f"{cls.__name__} needs a `kind` name to be registered")
    _REGISTRY[cls.kind] = cls
    return cls


def registered() -> dict[str, type[Decoder]]:
    return _REGISTRY


def find_decoder(name: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """(the decoder directory a name means, whether it is one of the shipped bundle's): the one place
    that reads a decoder name, for the CLI, the library and the server. A directory (one that exists,
    or any name with a slash); "hf-hub:ORG/NAME", a hub repo holding one, downloaded once (or read
    from the local cache offline); the name of a bundled decoder; None: the bundle's default."""
    from unembed.bundle import bundled_decoder

    if name is None:
        return bundled_decoder(None), True
    if str(name).startswith("hf-hub:"):
        from unembed.hub import resolve

        return resolve(str(name), "decoder"), False
    if Path(name).exists() or "/" in str(name) or os.sep in str(name):
        return Path(name), False  # a missing directory is named by the loader
    from unembed.zoo import zoo_decoder

    pretrained = zoo_decoder(str(name))  # a zoo name: converted once, then cached; an unknown name: refused
    if pretrained is not None:
        return pretrained, False
    from unembed.bundle import manifest

    known = manifest()["decoders"]
    if str(name) not in known:
        raise ModelLoadError(f"decoder {str(name)!r}: no such directory, and no bundled decoder of that name "
                             f"(the bundle has {', '.join(known)}; a hub decoder is hf-hub:ORG/NAME)")
    return bundled_decoder(str(name)), True


def decoder_path(name: str | os.PathLike | None = None) -> Path:
    """The decoder directory a name means (see find_decoder)."""
    return find_decoder(name)[0]


def read_decoder_config(path: str | os.PathLike) -> dict:
    """config.json of a decoder directory, checked for format and version (no weights read)."""
    path = decoder_path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a decoder directory")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a decoder directory (no config.json)")
    saved = read_json(path / "config.json")
    if not isinstance(saved, dict) or saved.get("format") != DECODER_FORMAT:
        raise ModelLoadError(f"{path}/config.json is not an unembed decoder config")
    if saved.get("format_version", 0) > FORMAT_VERSION:
        raise ModelLoadError(f"{path} was saved by a newer unembed (format {saved['format_version']}); upgrade unembed")
    if not isinstance(saved.get("config"), dict):
        raise ModelLoadError(f"{path}/config.json: its \"config\" is not an object of options")
    return saved


def resolve_embedder_spec(decoder_config: dict, decoder_dir) -> str:
    """The decoder's recorded embedder; a relative directory beside the decoder comes first (a
    bundle's decoders name "../embedder"), then one relative to where the decoder was trained."""
    spec = decoder_config.get("embedder_spec", "")
    if spec and not os.path.isabs(spec):
        beside = Path(decoder_dir) / spec
        if beside.is_dir():
            return str(beside)
    return spec


def build_saved_decoder(cls: type[Decoder], saved: dict, path: Path, device: str = "cpu") -> Decoder:
    """The decoder a directory describes; a damaged directory (a config of the wrong shape or with
    impossible values, truncated or mismatched weights) is refused in one line naming it."""
    config = saved.get("config")
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}/config.json: its \"config\" is not an object of options")
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = set(config) - fields
    if unknown:
        raise ModelLoadError(f"{path}/config.json has options the {cls.kind} decoder does not know: {sorted(unknown)}")
    try:
        config = cls.upgrade_config(config, saved.get("format_version", 1), path)
        decoder = cls.from_saved(cls.config_class(**config), path)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:  # e.g. a negative size, a string for a number
        raise ModelLoadError(f"{path}/config.json describes no buildable {cls.kind} decoder "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    try:
        decoder.load_weights(path)
    except BadInputError as e:
        raise ModelLoadError(f"{e}; does it belong with {path}/config.json?") from None
    decoder.load_extra(path)
    from unembed.decoders.edits import read_margin_record, read_substitutes

    decoder.substitutes = read_substitutes(path)
    decoder.edit_margin_record = read_margin_record(path)
    decoder.source_dir = Path(path)  # where a relative embedder spec (a bundle's "../embedder") is read from
    return decoder.to(device).eval()


# --- the model card -----------------------------------------------------------------------------------

CARD_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE", "CLIPScore", "RefCLIPScore", "val_CIDEr", "val_BLEU-4")


def _saved_metrics(path: Path) -> dict:
    try:
        metrics = read_json(path / "metrics.json") if (path / "metrics.json").is_file() else {}
    except BadInputError:
        return {}
    return metrics if isinstance(metrics, dict) else {}


def model_card(decoder: "Decoder", metrics: dict) -> str:
    """README.md with the YAML block the Hugging Face hub reads (library_name, base_model, tags,
    metrics), so `huggingface-cli upload ORG/NAME DIR` publishes the directory as it is."""
    import json

    from unembed.hub import shown_name

    config = decoder.config.to_dict()
    bases = [m for m in (config.get("lm"), config.get("embedder_spec")) if m and m != "scratch" and _hub_id(m)]
    scores = {k: v for k, v in metrics.items() if k in CARD_METRICS and isinstance(v, (int, float))}
    lines = ["---", "library_name: unembed", "pipeline_tag: image-to-text",
             "tags: " + json.dumps(["unembed", "image-captioning", decoder.kind])]
    if bases:
        lines.append("base_model: " + json.dumps([_hub_id(b) for b in bases]))
    if scores:
        lines.append("metrics: " + json.dumps(sorted(k.split("_")[-1].lower() for k in scores)))
    lines += ["---", "", f"# unembed {decoder.kind} decoder", "",
              f"{decoder.summary or decoder.kind}. Decodes embeddings of `{shown_name(config.get('embedder_spec') or '') or '?'}` "
              f"(id `{config.get('embedder_id') or '?'}`, {config.get('embed_dim')}-d) into captions.", "",
              "```bash", "pip install unembed", "unembed caption IMAGES --decoder hf-hub:ORG/NAME   # or this directory",
              "```", ""]
    if config.get("lm_weights") == "referenced":
        lines += [f"Base LM: `{config['lm']}` (revision `{config.get('lm_revision') or 'main'}`), referenced, not "
                  "copied: loading needs it in the local Hugging Face cache or the hub reachable.", ""]
    elif config.get("lm"):
        what = config.get("lm_config", {}).get("model_type", "causal")
        origin = f" (from `{config['lm']}`)" if _hub_id(config["lm"]) else ""
        lines += [f"LM: a {what} LM{origin}, its weights saved in this directory's model.safetensors.", ""]
    if scores:
        lines += ["| metric | value |", "| --- | ---: |"] + [f"| {k} | {v:.4g} |" for k, v in scores.items()] + [""]
    return "\n".join(lines)


def _hub_id(name: str) -> str:
    """The hub repo id a model name refers to ("" for a local path or an open_clip tag)."""
    name = name[len("hf-hub:"):] if name.startswith("hf-hub:") else name
    if (not name or name == "bundle" or Path(name).exists() or name.startswith((".", "/")) or ":" in name
            or name.count("/") > 1):  # "bundle": the shipped embedder's name (embedders.BUNDLED), no hub repo
        return ""
    return name
