"""Joint image-text embedders over open_clip, and the embeddings they produce.

An `Embedder` is built from a spec string, resolved in one place (`Embedder.from_spec`):
- "ViT-B-32:laion2b_s34b_b79k"   an open_clip architecture and pretrained tag (needs network once);
                                  a tag trained with QuickGELU builds that architecture: "ViT-B-32:openai"
                                  is "ViT-B-32-quickgelu:openai", the spelling it records,
- "ViT-B-32"                      the architecture with random weights (speed benchmarks),
- "hf-hub:org/repo"               an open_clip model on the Hugging Face hub,
- "bundle"                        the shipped bundle's scenes embedder,
- "path/to/dir"                   a directory saved by `Embedder.save` (config.json + model.safetensors),
                                  e.g. the scenes embedder trained by `unembed train clip`.

Shapes: embed_images(list of N PIL images) -> [N, D]; embed_texts(N strings) -> [N, D], both
L2-normalised; image_tokens(images) -> [N, T, W] for CoCa models. `Embedded` bundles vectors with
their ids and the embedder's identity so one embedding pass serves training, captioning and eval.
An embedding pass (`embed_pixels`) keeps the vectors as the model made them (CLIP's raw
`encode_image`): each decoder applies the normalisation its method uses (ClipCap's release feeds
them raw; CapDec, DeCap, ViECap and the iterative search normalise).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from unembed import __version__, text_tower
from unembed.compat import clip_bpe, import_open_clip
from unembed.errors import BadInputError, MismatchError, ModelLoadError
from unembed.hub import open_clip_hub_dir, open_clip_spelling, open_clip_weights
from unembed.io import load_tensors, read_json, save_tensors, write_json
# Embedded lives with the embedding files it reads and writes (data/vectors.py); embedders make them.
from unembed.data.vectors import Embedded  # noqa: F401  (re-exported: unembed.embedders.Embedded)

EMBEDDER_FORMAT = "unembed-embedder"
BUNDLED = "bundle"  # the spec that names the shipped bundle's embedder
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def resolve_device(device: str = "auto") -> torch.device:
    """`device` as torch names it ("auto": CUDA when there is one). A device this machine lacks (cuda
    without CUDA, cuda:3 with two GPUs, a misspelling) is one error naming it, here rather than deep
    inside torch; every command's --device goes through this one check."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError):
        raise BadInputError(f"device {device!r}", "is not a device (auto | cpu | cuda[:N] | mps)") from None
    count = {"cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
             "mps": int(torch.backends.mps.is_available())}.get(found.type)
    if count is not None and (found.index or 0) >= count:
        raise BadInputError(f"device {device!r}", f"this machine has {count or 'no'} {found.type.upper()} device"
                            f"{'' if count == 1 else 's'} (use --device cpu, or auto)")
    return found


class Embedder:
    """An open_clip model with its preprocessing and tokenizer, used only for inference here."""

    def __init__(self, model, preprocess, tokenizer, spec: str, embedder_id: str,
                 device: str | torch.device = "cpu", config: dict | None = None):
        self.device = resolve_device(str(device))
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.spec = spec
        self.id = embedder_id
        self.config = config or {}
        self.texts_embedded = 0  # texts through the text tower so far: the "embedder calls" of inversion

    @property
    def dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.Tensor):
            return proj.shape[1]
        if isinstance(proj, torch.nn.Linear):
            return proj.out_features
        return int(self.embed_texts(["a"]).shape[1])

    @property
    def has_image_tokens(self) -> bool:
        return hasattr(self.model, "_encode_image")

    def _pixel_batches(self, images: Sequence, batch_size: int):
        for i in range(0, len(images), batch_size):
            yield torch.stack([self.preprocess(im) for im in images[i:i + batch_size]]).to(self.device)

    @torch.no_grad()
    def embed_images(self, images: Sequence, batch_size: int = 64) -> torch.Tensor:
        out = [self.model.encode_image(pixels, normalize=True).float().cpu()
               for pixels in self._pixel_batches(images, batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.dim)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        out = []
        self.texts_embedded += len(texts)
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i:i + batch_size])).to(self.device)
            out.append(text_tower.encode_text(self.model, tokens).float().cpu())  # over real length, not padding
        return torch.cat(out) if out else torch.empty(0, self.dim)

    @torch.no_grad()
    def image_tokens(self, images: Sequence, batch_size: int = 64) -> torch.Tensor:
        """Token embeddings [N, T, W] that CoCa's text decoder cross-attends to."""
        if not self.has_image_tokens:
            raise MismatchError(f"embedder {self.spec} has no image tokens (only CoCa models do)")
        return torch.cat([self.model._encode_image(pixels)[1].float().cpu()
                          for pixels in self._pixel_batches(images, batch_size)])

    def embed(self, images: Sequence, ids: Sequence[str], with_tokens: bool = False, batch_size: int = 64) -> Embedded:
        """Embed images once into an `Embedded` (with CoCa's image tokens when asked)."""
        parts = [self.embed_pixels(pixels, ids[i * batch_size:(i + 1) * batch_size], with_tokens)
                 for i, pixels in enumerate(self._pixel_batches(images, batch_size))]
        return Embedded.concat(parts) if parts else Embedded(torch.empty(0, self.dim), [], self.id, self.spec, "image")

    @torch.no_grad()
    def embed_pixels(self, pixels: torch.Tensor, ids: Sequence[str], with_tokens: bool = False) -> Embedded:
        """Embed one batch of preprocessed pixels [B, 3, H, W] (pipeline.iter_pixel_batches gives them)."""
        pixels = pixels.to(self.device)
        if with_tokens:
            latent, tokens = self.model._encode_image(pixels, normalize=False)
            return Embedded(latent.float().cpu(), list(ids), self.id, self.spec, "image", tokens.float().cpu())
        vectors = self.model.encode_image(pixels, normalize=False).float().cpu()  # raw: each decoder normalises as its method does
        return Embedded(vectors, list(ids), self.id, self.spec, "image")

    def check(self, embedded: Embedded) -> None:
        if embedded.embedder_id and not same_embedder(embedded.embedder_id, self.id):
            raise MismatchError(f"embeddings come from embedder {embedded.embedder_spec!r} (id {embedded.embedder_id}), "
                                f"not from {self.spec!r} (id {self.id})")

    # --- building -----------------------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: str, device: str = "auto") -> "Embedder":
        path = Path(spec)
        if spec == BUNDLED and not path.exists():  # the shipped scenes embedder, by name
            from unembed.bundle import bundle_dir

            path = bundle_dir() / "embedder"
        if path.is_dir():
            return cls.load(path, device)
        if spec.startswith("hf-hub:"):
            return cls._pretrained(spec, None, spec, device)
        name, _, tag = spec.partition(":")
        if tag:  # the architecture the tag's weights were trained as: "ViT-B-32:openai" builds ViT-B-32-quickgelu
            name = open_clip_spelling(name, tag)
            spec = f"{name}:{tag}"
        return cls._pretrained(name, tag or None, spec, device)

    @classmethod
    def _pretrained(cls, name: str, tag: str | None, spec: str, device: str) -> "Embedder":
        """Hub files come through unembed.hub (huggingface_hub's own resolving: the local cache when
        the hub cannot be reached), then open_clip builds from the local files."""
        open_clip = import_open_clip()
        if not name.startswith("hf-hub:") and name not in open_clip.list_models():
            raise ModelLoadError(f"unknown embedder {spec!r}: {name!r} is neither a directory nor an open_clip "
                                 "architecture (see open_clip.list_models())")
        needs_hub = name.startswith("hf-hub:") or tag is not None
        build, tokenizer_name, pretrained, preprocess_cfg = name, name, tag, {}
        offline_hint = ". Without network, pass a local embedder directory instead (e.g. one trained with `unembed train clip`)."
        try:
            if name.startswith("hf-hub:"):
                build = f"local-dir:{open_clip_hub_dir(name)}"
                text_cfg = read_json(Path(build[len("local-dir:"):]) / "open_clip_config.json")["model_cfg"].get("text_cfg", {})
                tokenizer_name = name if text_cfg.get("hf_tokenizer_name") else build  # an HF tokenizer: by its hub name
            elif tag:
                file, preprocess_cfg = open_clip_weights(name, tag)
                pretrained = file or tag  # a tag open_clip fetches by URL: open_clip fetches it
        except ModelLoadError as e:
            raise ModelLoadError(f"{e}{offline_hint}") from None
        logging.disable(logging.ERROR)  # open_clip logs its own multi-line failure; ours is the one line
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                build, pretrained=None if build.startswith("local-dir:") else pretrained, device="cpu",
                **{f"image_{k}": v for k, v in preprocess_cfg.items()})
        except Exception as e:
            raise ModelLoadError(f"cannot load pretrained embedder {spec!r}: "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}{offline_hint}") from None
        finally:
            logging.disable(logging.NOTSET)
        tokenizer = open_clip.get_tokenizer(tokenizer_name)
        return cls(model, preprocess, tokenizer, spec, spec if needs_hub else f"{name}:random", device)

    @classmethod
    def from_pretrained(cls, spec: str, device: str = "auto") -> "Embedder":
        """The Hugging Face spelling of `load_embedder` / `from_spec`."""
        return cls.from_spec(spec, device)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """The Hugging Face spelling of `save`."""
        self.save(path)

    @classmethod
    def from_config(cls, config: dict, spec: str = "", device: str = "cpu") -> "Embedder":
        """Build an untrained embedder from an architecture config (see `scenes_config`)."""
        import_open_clip()
        from open_clip.coca_model import CoCa
        from open_clip.model import CLIP
        from open_clip.transform import image_transform

        model_type = config.get("model_type", "clip")
        arch = dict(config["model_cfg"])
        model = (CoCa if model_type == "coca" else CLIP)(**arch, **({} if model_type == "coca" else {"output_dict": True}))
        pre = config["preprocess"]
        preprocess = image_transform(pre["image_size"], is_train=False, mean=tuple(pre["mean"]), std=tuple(pre["std"]))
        tokenizer = clip_bpe(arch["text_cfg"]["context_length"])
        if "vocab" in config:
            tokenizer = PrunedTokenizer(tokenizer, config["vocab"])
        return cls(model, preprocess, tokenizer, spec, config.get("id", "untrained"), device, config)

    def save(self, path: str | os.PathLike) -> None:
        """Save config.json + model.safetensors. The id is a hash of the weights, so a decoder can
        tell whether an embedding came from this exact embedder wherever the directory moves."""
        path = Path(path)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        digest = hashlib.sha256()
        for k in sorted(state):
            digest.update(k.encode())
            digest.update(state[k].float().numpy().tobytes())
        self.id = f"{self.config.get('name', 'embedder')}-{digest.hexdigest()[:12]}"
        config = dict(self.config, format=EMBEDDER_FORMAT, id=self.id, unembed_version=__version__)
        save_tensors(path / "model.safetensors", state)
        write_json(path / "config.json", config)
        self.config, self.spec = config, str(path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto") -> "Embedder":
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not an embedder directory (no config.json)")
        config = read_json(path / "config.json")
        if config.get("format") != EMBEDDER_FORMAT:
            raise ModelLoadError(f"{path}/config.json is not an unembed embedder config (format {config.get('format')!r})")
        embedder = cls.from_config(config, str(path), "cpu")
        state, _ = load_tensors(path / "model.safetensors")
        embedder.model.load_state_dict(state)
        embedder.model.to(resolve_device(device)).eval()
        embedder.device = resolve_device(device)
        return embedder


class PrunedTokenizer:
    """CLIP's tokenizer over a pruned vocabulary: BPE ids map to the rows a pruned model kept.

    `kept` is ascending, so padding (0) stays 0 and the end token stays the largest id, where CLIP's
    text tower pools. A token outside the kept set becomes 0 (the model never learnt it anyway), and
    the first time a word meets that fate it is named on stderr, so no text is misread silently."""

    def __init__(self, base, kept: Sequence[int]):
        self.base, self.kept = base, torch.tensor(kept)
        self.named: set[str] = set()  # unknown words already reported
        self.lookup = torch.zeros(len(base.encoder), dtype=torch.long)
        self.lookup[self.kept] = torch.arange(len(kept))
        self.context_length = base.context_length
        self.sot_token_id = int(self.lookup[base.sot_token_id])
        self.eot_token_id = int(self.lookup[base.eot_token_id])

    def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
        ids = self.base(texts, context_length)
        mapped = self.lookup[ids]
        unknown = ids[(mapped == 0) & (ids != 0)].unique().tolist()
        if unknown:
            words = sorted({self.base.decode([i]).strip() for i in unknown} - self.named)
            if words:
                self.named.update(words)
                shown = ", ".join(repr(w) for w in words[:12]) + (f" and {len(words) - 12} more" if len(words) > 12 else "")
                print(f"unembed: note: this embedder keeps a pruned vocabulary (the bundle's knows only the scenes "
                      f"world) and does not know {shown}; such words are read as padding", file=sys.stderr, flush=True)
        return mapped

    def decode(self, ids) -> str:
        return self.base.decode(self.kept[torch.as_tensor(ids, dtype=torch.long)].tolist())


def prune_vocabulary(embedder: Embedder, texts: Sequence[str]) -> Embedder:
    """A copy of a CLIP-BPE embedder keeping only the token rows `texts` use: the same vectors for
    those texts and for every image, a fraction of the size (CLIP's 49,408-row token embedding, and
    CoCa's as large output layer, dominate a small model). The copy is unsaved: save() gives its id."""
    base = getattr(embedder.tokenizer, "base", embedder.tokenizer)
    if not hasattr(base, "encoder") or "model_cfg" not in embedder.config:
        raise MismatchError(f"embedder {embedder.spec!r} is not a CLIP-BPE model built from a config; cannot prune it")
    ids = torch.cat([base(list(texts[i:i + 4096])).unique() for i in range(0, len(texts), 4096)])
    kept = sorted(set(ids.tolist()) | {0, base.sot_token_id, base.eot_token_id})
    if isinstance(embedder.tokenizer, PrunedTokenizer):  # pruned before: its rows are numbered by its lookup
        rows, vocab = embedder.tokenizer.lookup[torch.tensor(kept)], len(embedder.tokenizer.kept)
    else:
        rows, vocab = torch.tensor(kept), len(base.encoder)
    state = {k: _keep_rows(v, vocab, rows) for k, v in embedder.model.state_dict().items()}
    config = json.loads(json.dumps(embedder.config))
    for part in ("text_cfg", "multimodal_cfg"):
        if part in config["model_cfg"]:
            config["model_cfg"][part]["vocab_size"] = len(kept)
    config["vocab"] = kept
    pruned = Embedder.from_config(config, "", "cpu")
    pruned.model.load_state_dict(state)
    pruned.model.to(embedder.device)
    pruned.device = embedder.device
    return pruned


def _keep_rows(tensor: torch.Tensor, vocab: int, rows: torch.Tensor) -> torch.Tensor:
    for dim, size in enumerate(tensor.shape):
        if size == vocab:
            return tensor.index_select(dim, rows.to(tensor.device))
    return tensor


def scenes_config(image_size: int = 64, embed_dim: int = 256, vision_width: int = 16, text_width: int = 128,
                  text_layers: int = 3, context_length: int = 32, name: str = "scenes-clip", patch_size: int = 0) -> dict:
    """The small open_clip CLIP used as the offline stand-in for CLIP: a ModifiedResNet image tower
    (width 16: ~173 img/s training on 2 CPU cores) and a 3-layer text transformer on CLIP's BPE.
    `patch_size` > 0 makes the image tower a one-layer ViT instead (no BatchNorm)."""
    vision = {"layers": [1, 1, 1, 1], "width": vision_width, "image_size": image_size, "head_width": 64}
    if patch_size:
        vision = {"layers": 1, "width": vision_width, "image_size": image_size, "patch_size": patch_size,
                  "head_width": min(64, vision_width)}
    return {
        "name": name,
        "model_type": "clip",
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": vision,
            "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": text_width,
                         "heads": max(1, text_width // 32), "layers": text_layers},
        },
        "preprocess": {"image_size": image_size, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)},
        "tokenizer": "clip-bpe",
    }


def canonical_embedder_id(embedder_id: str) -> str:
    """A pretrained embedder's id as it is built now: "ViT-B-32:openai" is "ViT-B-32-quickgelu:openai"
    (OpenAI's weights need QuickGELU), so decoders and embeddings recorded under the old spelling still
    match. Ids of trained embedders (a name and a hash) and anything unknown stay as they are."""
    name, _, tag = embedder_id.partition(":")
    if name == "hf-hub":  # open_clip's own hub repo of a registered name:tag is that name:tag
        registered = _registered_hub_repos().get(tag.rstrip("/"))
        if registered is None:
            return embedder_id
        name, tag = registered
    if not tag or tag == "random" or Path(embedder_id).is_dir():
        return embedder_id
    from unembed.hub import open_clip_spelling

    try:
        return f"{open_clip_spelling(name, tag)}:{tag}"
    except ModelLoadError:
        return embedder_id


@functools.lru_cache(maxsize=1)
def _registered_hub_repos() -> dict[str, tuple[str, str]]:
    """{hub repo: (architecture, tag)} of open_clip's pretrained registry (where it downloads each tag)."""
    open_clip = import_open_clip()
    from open_clip.pretrained import get_pretrained_cfg

    repos = {}
    for name, tag in open_clip.list_pretrained():
        repo = (get_pretrained_cfg(name, tag) or {}).get("hf_hub", "").rstrip("/")
        if repo:
            repos.setdefault(repo, (name, tag))
    return repos


def same_embedder(a: str, b: str) -> bool:
    """Whether two recorded embedder ids name the same weights (see canonical_embedder_id)."""
    return a == b or canonical_embedder_id(a) == canonical_embedder_id(b)


def load_embedder(spec: str, device: str = "auto") -> Embedder:
    return Embedder.from_spec(spec, device)
