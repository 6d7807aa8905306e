"""Pretrained decoders by name: `--decoder clipcap-coco` (CLI, library and server alike, through
`decoders.find_decoder`).

Each zoo entry names a published file on the Hugging Face hub and how unembed turns it into a decoder:
- first use: huggingface_hub downloads the file into its own cache (HF_HOME, HF_ENDPOINT and
  HF_HUB_OFFLINE hold as for every hub name, see unembed.hub), the importer converts it
  (`unembed import`'s code: `torch.load(weights_only=True)`, tensors only), and the decoder is written
  whole (io.staged_dir) under
      $UNEMBED_CACHE/zoo/NAME-<sha256 of the file, 16 hex>-f<decoder format version>/NAME
  ($UNEMBED_CACHE is read at each call; default $XDG_CACHE_HOME/unembed, i.e. ~/.cache/unembed),
  with zoo.json beside it saying where it came from;
- later uses: the hub cache answers (offline too) and the converted decoder is loaded as it is;
- a new upstream revision (other bytes) or a new decoder format is another key: converted again.
The file's sha256 is the name huggingface_hub gives its blob (an LFS file's etag is its sha256), so
a cache hit reads nothing; a file stored under another name (a cache without symlinks) is hashed.

Entries, and how each was checked (the public hub listings and the projects' code):
- clipcap-coco / clipcap-conceptual: ClipCap's released weights (rmokady/CLIP_prefix_caption,
  predict.py: `coco_weights.pt`, `conceptual_weights.pt`; prefix length 10, the MLP mapper, GPT-2
  fine-tuned and saved in the file, CLIP ViT-B/32 from OpenAI fed raw, greedy until ".") as the
  community mirrors them. The embedder is named by the hub repo open_clip itself downloads
  "ViT-B-32-quickgelu:openai" from, which carries its own open_clip_config.json (quick_gelu, OpenAI's
  preprocessing): the same weights, built from the repo's own config.
- coca-vit-b-32-coco / coca-vit-l-14-coco: open_clip's `coca_ViT-B-32` / `coca_ViT-L-14` with tag
  `mscoco_finetuned_laion2b_s13b_b90k`, named by the LAION repos open_clip's registry points that tag
  at (each holds open_clip_config.json and open_clip_pytorch_model.bin). A CoCa decodes with its own
  towers: "converting" writes a coca decoder that references the embedder.
No CapDec or DeCap release is mirrored on the hub (CapDec's weights are on Google Drive; DeCap
released none), so neither has an entry; `unembed import` converts a downloaded file.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from unembed.errors import ModelLoadError, did_you_mean

CACHE_ENV = "UNEMBED_CACHE"
PROVENANCE = "zoo.json"
OPENAI_VIT_B_32 = "hf-hub:timm/vit_base_patch32_clip_224.openai"  # open_clip's "ViT-B-32-quickgelu:openai"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ZooModel:
    name: str
    method: str               # the decoder kind it becomes
    embedder: str             # the embedder spec the decoder records (and captioning loads)
    lm: str
    repo: str                 # the hub repo holding the published file
    file: str
    size: str                 # of `file`, as the hub lists it
    licence: str
    trained_on: str
    settings: str
    scores: dict = field(default_factory=dict)  # as published: {"dataset": ..., metric: value}
    scores_source: str = ""
    open_clip_name: str = ""  # the same embedder weights by their open_clip pretrained name
    licence_note: str = ""
    options: dict = field(default_factory=dict)  # the importer's checks (prefix length, mapper)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "options"}


_CLIPCAP = dict(method="clipcap", embedder=OPENAI_VIT_B_32, lm="gpt2 (fine-tuned; its weights are in the file)",
                size="636 MB", licence="MIT",
                licence_note="ClipCap's repository (rmokady/CLIP_prefix_caption) is MIT; the mirror states none",
                settings="MLP mapper, prefix length 10, GPT-2 fine-tuned, CLIP ViT-B/32 (OpenAI) fed raw, "
                         "greedy until '.' (at most 67 tokens)",
                open_clip_name="ViT-B-32-quickgelu:openai", options={"prefix_length": 10, "mapper": "mlp"})
_COCA = dict(method="coca", lm="CoCa's own (its multimodal text decoder)", licence="MIT",
             licence_note="as the LAION repository's model card states",
             settings="open_clip CoCa fine-tuned on COCO captions; decoded with its own towers (beam search, "
                      "3 beams, at most 28 tokens)")

ZOO: dict[str, ZooModel] = {m.name: m for m in (
    ZooModel(name="clipcap-coco", repo="akhaliq/CLIP-prefix-captioning-COCO-weights", file="coco_weights.pt",
             trained_on="COCO captions (Karpathy train)",
             scores={"dataset": "COCO Karpathy test", "BLEU-4": 32.15, "METEOR": 27.1, "CIDEr": 108.35,
                     "SPICE": 20.12},
             scores_source="ClipCap paper (Mokady et al. 2021), Table 1, MLP + GPT-2 tuning", **_CLIPCAP),
    ZooModel(name="clipcap-conceptual", repo="akhaliq/CLIP-prefix-captioning-conceptual-weights",
             file="conceptual_weights.pt", trained_on="Conceptual Captions (3M)",
             scores={"dataset": "Conceptual Captions validation", "ROUGE-L": 26.71, "CIDEr": 87.26, "SPICE": 18.5},
             scores_source="ClipCap paper (Mokady et al. 2021), Table 2, MLP + GPT-2 tuning", **_CLIPCAP),
    ZooModel(name="coca-vit-b-32-coco", embedder="hf-hub:laion/mscoco_finetuned_CoCa-ViT-B-32-laion2B-s13B-b90k",
             repo="laion/mscoco_finetuned_CoCa-ViT-B-32-laion2B-s13B-b90k", file="open_clip_pytorch_model.bin",
             size="1.01 GB", trained_on="LAION-2B (13B samples seen), then COCO captions",
             open_clip_name="coca_ViT-B-32:mscoco_finetuned_laion2b_s13b_b90k", **_COCA),
    ZooModel(name="coca-vit-l-14-coco", embedder="hf-hub:laion/mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k",
             repo="laion/mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k", file="open_clip_pytorch_model.bin",
             size="2.55 GB", trained_on="LAION-2B (13B samples seen), then COCO captions",
             open_clip_name="coca_ViT-L-14:mscoco_finetuned_laion2b_s13b_b90k", **_COCA),
)}


def cache_root() -> Path:
    """Where converted decoders live: $UNEMBED_CACHE, else $XDG_CACHE_HOME/unembed, else
    ~/.cache/unembed (read now, not at import)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().absolute()
    return (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unembed").absolute()


# --- resolving a name ---------------------------------------------------------------------------------

def zoo_decoder(name: str) -> Path | None:
    """For `find_decoder`: the decoder directory of zoo model `name` (downloaded and converted on first
    use); None for a bundled decoder's name; any other name is refused in one line listing the names."""
    if name in ZOO:
        return decoder_dir(name)
    try:
        from unembed.bundle import manifest

        bundled = list(manifest()["decoders"])
    except ModelLoadError:  # no bundle: the bundle's own error names it
        return None
    if name in bundled:
        return None
    raise ModelLoadError(unknown_name(name, bundled))


def unknown_name(name: str, bundled: list[str]) -> str:
    hint = did_you_mean(name, [*ZOO, *bundled])
    return (f"decoder {name!r}: no such directory or pretrained model, and the bundle has no decoder {name!r}{hint} "
            f"(pretrained: {', '.join(ZOO)}; bundled: {', '.join(bundled) or 'none'}; a hub decoder is "
            "hf-hub:ORG/NAME; `unembed models` lists them)")


def decoder_dir(name: str) -> Path:
    """The converted decoder of zoo model `name`: from unembed's cache when this revision of its file
    was converted before, else downloaded (or found in the hub cache), converted and cached."""
    model = _model(name)
    source, revision = source_file(model)
    digest = file_sha256(source)
    home = converted_home(model, digest)
    if _complete(home, model):
        return home / model.name
    from unembed.decoders.base import FORMAT_VERSION
    from unembed.io import staged_dir, write_json

    print(f"zoo model {model.name}: converting {model.repo}/{model.file} (revision {revision[:12] or '?'}) "
          f"into {home}", file=sys.stderr, flush=True)
    with staged_dir(home, keep_others=False) as staging:
        convert(model, source, staging / model.name)
        write_json(staging / PROVENANCE, {"name": model.name, "method": model.method, "repo": model.repo,
                                          "file": model.file, "revision": revision, "sha256": digest,
                                          "format_version": FORMAT_VERSION, "unembed_version": _version()})
    return home / model.name


def prefetch(name: str) -> Path:
    """Everything zoo model `name` needs, now (e.g. before going offline): its converted decoder and
    its embedder's files. Returns the decoder directory."""
    path = decoder_dir(name)
    embedder = _model(name).embedder
    if embedder.startswith("hf-hub:"):
        from unembed.hub import open_clip_hub_dir

        open_clip_hub_dir(embedder)
    return path


def source_file(model: ZooModel) -> tuple[Path, str]:
    """(the published file in the local hub cache, the commit it was resolved at): downloaded once,
    or found in the cache offline (unembed.hub.snapshot: one line naming the repo when neither)."""
    from unembed.hub import snapshot, snapshot_revision

    folder = snapshot(model.repo, f"pretrained model {model.name!r} file", f"{model.repo}/{model.file}",
                      allow_patterns=[model.file])
    path = folder / model.file
    if not path.is_file():
        raise ModelLoadError(f"pretrained model {model.name!r}: hub repo {model.repo!r} holds no {model.file} "
                             f"(at {snapshot_revision(folder) or folder})")
    return path, snapshot_revision(folder)


def file_sha256(path: Path) -> str:
    """The sha256 of a file: the name of its hub-cache blob when it is one, else computed."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and _SHA256.fullmatch(real.name):
        return real.name
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def converted_home(model: ZooModel, digest: str) -> Path:
    from unembed.decoders.base import FORMAT_VERSION

    return cache_root() / "zoo" / f"{model.name}-{digest[:16]}-f{FORMAT_VERSION}"


def convert(model: ZooModel, source: Path, out: Path) -> None:
    """Write the decoder zoo model `model` makes of its published file `source` into `out` (new)."""
    if model.method == "coca":  # the file IS the embedder's weights; the decoder references it
        from unembed.decoders.coca import CoCaDecoder
        from unembed.embedders import load_embedder

        CoCaDecoder.for_embedder(load_embedder(model.embedder, "cpu")).save(out)
        return
    from unembed.decoders import published

    lm = model.lm.split()[0]
    published.import_published(model.method, source, out, embedder=model.embedder, lm=lm, **model.options)


def _complete(home: Path, model: ZooModel) -> bool:
    return (home / PROVENANCE).is_file() and (home / model.name / "config.json").is_file()


def _model(name: str) -> ZooModel:
    if name not in ZOO:
        raise ModelLoadError(f"no pretrained model {name!r}{did_you_mean(name, ZOO)} (known: {', '.join(ZOO)})")
    return ZOO[name]


def _version() -> str:
    from unembed import __version__

    return __version__


# --- listing ------------------------------------------------------------------------------------------

def status(model: ZooModel) -> str:
    """"converted", "downloaded" or "not downloaded", from the local caches alone (no network, no hashing)."""
    from huggingface_hub import try_to_load_from_cache

    from unembed.hub import cache_dir

    found = try_to_load_from_cache(model.repo, model.file, cache_dir=cache_dir())
    if not isinstance(found, str):
        return "not downloaded"
    real = Path(os.path.realpath(found))
    if real.parent.name == "blobs" and _SHA256.fullmatch(real.name) and _complete(
            converted_home(model, real.name), model):
        return "converted"
    return "downloaded"


def listing() -> list[dict]:
    """Every name `--decoder` takes besides a directory or hf-hub:ORG/NAME: the zoo's, then the bundle's."""
    rows = [{"name": m.name, "from": "pretrained", **m.to_dict(), "status": status(m)} for m in ZOO.values()]
    try:
        from unembed.bundle import bundle_dir, manifest

        info, root = manifest(), bundle_dir()
    except ModelLoadError:
        return rows
    from unembed.io import read_json

    for name in info["decoders"]:
        try:
            kind = read_json(root / name / "config.json").get("kind", "?")
        except Exception:  # a damaged bundle entry is listed, and named when loaded
            kind = "?"
        size = sum(f.stat().st_size for f in (root / name).rglob("*") if f.is_file())
        measured = info.get("scores", {}).get(name, {})
        rows.append({"name": name, "from": "bundle", "method": kind, "embedder": "bundle", "lm": "", "repo": "",
                     "file": "", "size": f"{size / 2 ** 20:.1f} MB", "licence": "", "trained_on": info.get("data", ""),
                     "settings": "", "scores": {"dataset": f"scenes {info.get('split', 'test')}, measured",
                                                **{k: round(v, 3) for k, v in measured.items()
                                                   if k in ("BLEU-4", "CIDEr", "CLIPScore")}},
                     "scores_source": "bundle.json", "open_clip_name": "", "licence_note": "", "status": "installed",
                     "default": name == info.get("default")})
    return rows
