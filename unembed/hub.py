"""Hugging Face hub names, resolved in one place, the way the HF libraries resolve them.

A name is a local directory, or a hub repo id ("gpt2", "ORG/NAME", optionally "hf-hub:ORG/NAME").
`huggingface_hub.snapshot_download` does the resolving, so its own settings hold (HF_ENDPOINT,
HF_HUB_OFFLINE, HF_HOME / HF_HUB_CACHE, proxies, HF_HUB_ETAG_TIMEOUT), read here at call time
(the library reads them once, at import):
- with network: downloaded once into the local cache, then read from there;
- offline (HF_HUB_OFFLINE=1) or the hub unreachable: read from the local cache, the library's own
  fallback when its request fails (nothing here probes the network or changes the process's settings);
- in neither: one clear line naming the repo.
The snapshot a name resolved to (its commit hash) is the revision a decoder records, so a decoder
that keeps only an adapter reloads exactly the base it was trained on.

open_clip's pretrained tags ("ViT-B-32:openai") name weight files in hub repos too: `open_clip_spelling`
says which architecture a tag's weights were trained with (OpenAI's CLIPs use QuickGELU, which
open_clip spells "NAME-quickgelu"), and `open_clip_weights` fetches the file the same way.
"""
from __future__ import annotations

import os
from pathlib import Path

from unembed.errors import ModelLoadError

HUB_PREFIX = "hf-hub:"
QUICKGELU = "-quickgelu"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's preference


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def endpoint() -> str | None:
    """HF_ENDPOINT as the environment names it now (None: the library's default)."""
    return os.environ.get("HF_ENDPOINT") or None


def etag_timeout() -> float:
    """HF_HUB_ETAG_TIMEOUT (seconds per metadata request) as the environment names it now."""
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 10)
    except ValueError:
        return 10.0


def shown_name(name: str) -> str:
    """A model name as a model card or a server may show it: a folder (of this machine, or absolute)
    by its last part, since its path means nothing elsewhere; any other name as it is."""
    return Path(name).name if name and (os.path.isabs(name) or is_local(name)) else name


def is_local(name: str) -> bool:
    return Path(name).is_dir()


def repo_id(name: str) -> str:
    return name[len(HUB_PREFIX):] if name.startswith(HUB_PREFIX) else name


# What unembed reads of a hub repo: configs and tokenizer files, and for an LM its safetensors weights.
# Without these filters a model repo comes whole (gpt2: about 5 GB of TF, Flax, ONNX and Rust weights).
TEXT_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken"]
WANTED_FILES = {"LM": [*TEXT_FILES, "*.safetensors"], "tokenizer": TEXT_FILES}


def resolve(name: str, what: str, revision: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """The local directory of `name` (a directory, or a hub repo snapshot: downloaded once, or
    found in the cache offline). `what` names the thing in errors ("LM", "tokenizer", "decoder") and
    says which files are fetched (WANTED_FILES; `allow_patterns` instead, when given)."""
    if is_local(name):
        return Path(name)
    return snapshot(repo_id(name), what, name, revision, allow_patterns or WANTED_FILES.get(what))


def snapshot(repo: str, what: str, name: str | None = None, revision: str | None = None,
             allow_patterns: list[str] | None = None) -> Path:
    """`snapshot_download` of hub repo `repo` (only `allow_patterns` when given), with its errors
    turned into one line naming `what` `name`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, OfflineModeIsEnabled
    from requests.exceptions import ConnectionError, Timeout

    name = name or repo
    try:
        return Path(snapshot_download(repo, revision=revision or None, cache_dir=cache_dir(), endpoint=endpoint(),
                                      local_files_only=hub_offline(), etag_timeout=etag_timeout(),
                                      allow_patterns=allow_patterns))
    except HFValidationError:
        raise ModelLoadError(f"{what} {name!r} is neither a directory nor a Hugging Face hub repo id") from None
    except Exception as e:  # huggingface_hub raises several kinds (not cached, not found, gated, offline)
        at = f" at revision {revision}" if revision else ""
        cause = e.__cause__ or e.__context__
        if hub_offline() or isinstance(cause, OfflineModeIsEnabled):
            raise ModelLoadError(f"cannot load {what} {name!r}{at}: it is not in the local Hugging Face cache "
                                 f"({cache_dir()}) and the hub is unreachable (HF_HUB_OFFLINE is set)") from None
        if isinstance(cause, (ConnectionError, Timeout)):
            raise ModelLoadError(f"cannot load {what} {name!r}{at}: it is not in the local Hugging Face cache "
                                 f"({cache_dir()}) and the hub is unreachable ({hub_url()}: "
                                 f"{type(cause).__name__})") from None
        raise ModelLoadError(f"cannot download {what} {name!r}{at}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None


def hub_url() -> str:
    if endpoint():
        return endpoint()
    from huggingface_hub import constants

    return constants.ENDPOINT


def snapshot_revision(path: Path) -> str:
    """The commit hash of a hub snapshot directory (…/snapshots/HASH), or "" for any other directory."""
    path = Path(path)
    return path.name if path.parent.name == "snapshots" else ""


def cache_dir() -> str:
    """The hub cache as the environment names it now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub.constants import HF_HUB_CACHE

    return str(HF_HUB_CACHE)


# --- open_clip names ----------------------------------------------------------------------------


def _quick_gelu(name: str) -> bool:
    from open_clip.factory import get_model_config

    return bool((get_model_config(name) or {}).get("quick_gelu", False))


def open_clip_spelling(name: str, tag: str) -> str:
    """The open_clip architecture that pretrained tag `tag` of `name` must be built as: `name` itself,
    or "NAME-quickgelu" where the tag's weights were trained with QuickGELU and `name` has GELU
    (open_clip itself would build GELU and only warn). The way open_clip decides its warning decides
    here: the tag's `quick_gelu` in its pretrained registry against the architecture config's.
    A QuickGELU spelling of GELU weights is refused in one line naming the right spelling."""
    from unembed.compat import import_open_clip

    open_clip = import_open_clip()
    from open_clip.pretrained import get_pretrained_cfg

    models = set(open_clip.list_models())
    if name not in models:
        raise ModelLoadError(f"unknown embedder {name + ':' + tag!r}: {name!r} is neither a directory nor an open_clip "
                             "architecture (see open_clip.list_models())")
    sibling = name[:-len(QUICKGELU)] if name.endswith(QUICKGELU) else name + QUICKGELU
    sibling = sibling if sibling in models else None
    listed = {n: get_pretrained_cfg(n, tag) for n in (name, sibling)
              if n and tag in open_clip.list_pretrained_tags_by_model(n)}
    if not listed:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ModelLoadError(f"unknown pretrained tag {tag!r} for {name} (known: {tags})")
    trained_quick = any(cfg.get("quick_gelu", False) for cfg in listed.values())
    if name in listed and _quick_gelu(name) == trained_quick:
        return name
    if sibling and _quick_gelu(sibling) == trained_quick:
        if trained_quick:  # OpenAI's names ("ViT-B-32:openai"): the weights' own activation
            return sibling
        raise ModelLoadError(f"embedder {name + ':' + tag!r} builds QuickGELU, but the {tag} weights were trained "
                             f"with GELU: use {sibling}:{tag}")
    if name in listed:  # no spelling with the weights' activation (e.g. a registry without the flag): as open_clip
        return name
    raise ModelLoadError(f"unknown pretrained tag {tag!r} for {name} (known: "
                         f"{', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'})")


def open_clip_weights(name: str, tag: str) -> tuple[str | None, dict]:
    """(the local file of open_clip pretrained tag `name:tag`, its preprocessing options), the file
    fetched from the tag's hub repo as `snapshot` does; (None, {}) for a tag open_clip fetches by URL."""
    from unembed.compat import import_open_clip

    import_open_clip()
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(name, tag)
    preprocess = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    if not cfg.get("hf_hub"):
        return None, {}
    repo, filename = os.path.split(cfg["hf_hub"])  # "ORG/NAME/" (open_clip's default files) or "ORG/NAME/FILE"
    candidates = [filename[:-4] + ".safetensors", filename] if filename.endswith((".bin", ".pth")) else \
        [filename] if filename else list(OPEN_CLIP_WEIGHTS)
    what = f"embedder {name + ':' + tag!r} weights from hub repo"
    for file in candidates:  # the preferred file first: only what is asked for is downloaded
        path = snapshot(repo, what, repo, allow_patterns=[file]) / file
        if path.is_file():
            return str(path), preprocess
    raise ModelLoadError(f"cannot load {what} {repo!r}: it holds none of {', '.join(candidates)}")


def open_clip_hub_dir(name: str) -> Path:
    """The local snapshot of open_clip hub model `name` ("hf-hub:ORG/NAME"): its config and weights."""
    repo = repo_id(name)
    folder = snapshot(repo, "embedder", name, allow_patterns=[OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS[0]])
    if not (folder / OPEN_CLIP_WEIGHTS[0]).is_file():
        folder = snapshot(repo, "embedder", name, allow_patterns=[OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS[1]])
    if not (folder / OPEN_CLIP_CONFIG).is_file() or not any((folder / f).is_file() for f in OPEN_CLIP_WEIGHTS):
        raise ModelLoadError(f"embedder {name!r} is not an open_clip model: the hub repo holds no "
                             f"{OPEN_CLIP_CONFIG} with {' or '.join(OPEN_CLIP_WEIGHTS)}")
    return folder
