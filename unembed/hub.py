"""Hugging Face hub names, resolved in one place, the way the HF libraries resolve them.

A name is a local directory, or a hub repo id ("gpt2", "ORG/NAME", optionally "hf-hub:ORG/NAME"):
- with network: downloaded once into the local cache (HF_HOME / HF_HUB_CACHE), then read from there;
- offline (HF_HUB_OFFLINE=1) or the hub unreachable: read from the local cache, as
  `from_pretrained` does with local_files_only;
- in neither: one clear line within seconds (a TCP probe, not a minute of retries).
The snapshot a name resolved to (its commit hash) is the revision a decoder records, so a decoder
that keeps only an adapter reloads exactly the base it was trained on.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

from unembed.errors import ModelLoadError

HUB_HOST = ("huggingface.co", 443)
HUB_PREFIX = "hf-hub:"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so an offline machine fails in seconds instead of retrying for a minute."""
    if hub_offline():
        return False
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


def force_hub_offline() -> None:
    """Make every HF library read the local cache only (they read the variable at import time, and
    huggingface_hub may be imported already)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def is_local(name: str) -> bool:
    return Path(name).is_dir()


def repo_id(name: str) -> str:
    return name[len(HUB_PREFIX):] if name.startswith(HUB_PREFIX) else name


def resolve(name: str, what: str, revision: str | None = None) -> Path:
    """The local directory of `name` (a directory, or a hub repo snapshot: downloaded once, or
    found in the cache offline). `what` names the thing in errors ("LM", "tokenizer", "decoder")."""
    if is_local(name):
        return Path(name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    repo = repo_id(name)
    online = hub_reachable()
    try:
        return Path(snapshot_download(repo, revision=revision or None, local_files_only=not online,
                                      cache_dir=cache_dir()))
    except HFValidationError:
        raise ModelLoadError(f"{what} {name!r} is neither a directory nor a Hugging Face hub repo id") from None
    except Exception as e:  # huggingface_hub raises several kinds (not cached, not found, gated, offline)
        at = f" at revision {revision}" if revision else ""
        if not online:
            raise ModelLoadError(f"cannot load {what} {name!r}{at}: it is not in the local Hugging Face cache "
                                 f"({cache_dir()}) and the hub is unreachable"
                                 f"{' (HF_HUB_OFFLINE is set)' if hub_offline() else ''}") from None
        raise ModelLoadError(f"cannot download {what} {name!r}{at}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None


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
