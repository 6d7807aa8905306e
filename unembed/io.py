"""Atomic file writes and safe tensor files.

Every write goes to a temporary file in the destination's directory and is moved into place
with os.replace, so a crash never leaves a half-written file under the final name; a directory
written whole (a decoder) goes to a staging folder beside it and is renamed into place. Tensors are
read only from safetensors; anything that would need unpickling is refused.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from unembed.errors import BadInputError, UnsafeFileError

PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol >= 2, and torch.save's zip container


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file owner-only; a written file gets the mode open() would give it
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike, keep_others: bool = True, owned: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield an empty folder beside `path` to write a whole directory into; on success it takes
    `path`'s place: the old folder is moved aside, the new one renamed in, then the old one removed.
    A crash leaves `path` the old complete folder or the new one (in the instant between the two
    renames, the old one lies aside as .NAME.old-*). With `keep_others`, what the old folder holds
    that the new one does not (a training run's checkpoints/ and log, a CoCa's embedder/) moves into
    the new one, as a write in place would have kept it; never the `owned` names, files the writer
    writes when it has them (an old one would describe another model)."""
    path = Path(path).absolute()
    if path == Path.cwd() or path in Path.cwd().parents:  # renamed away, this process would work in a removed folder
        raise BadInputError(path, "is the current directory (or holds it); save into a folder below it")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.saving-", dir=path.parent))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's folder is owner-only; a saved directory is not
    try:
        yield staging
        _swap_in(staging, path, keep_others, owned)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(new: Path, path: Path, keep_others: bool, owned: tuple[str, ...] = ()) -> None:
    if not path.exists():
        os.rename(new, path)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, aside)  # onto the empty folder mkdtemp made: a unique name, no race
    os.rename(new, path)
    if keep_others:
        for entry in aside.iterdir():
            if not (path / entry.name).exists() and entry.name not in owned:
                os.rename(entry, path / entry.name)
    shutil.rmtree(aside, ignore_errors=True)


def check_out_dir(path: str | os.PathLike, format: str, overwrite: bool) -> None:
    """Where a command writes a model directory (`--out`): absent, empty, or a directory of `format`
    (its config.json's "format", e.g. "unembed-decoder"), that one replaced only with `overwrite`. A
    folder of anything else is refused, so `--out models` never replaces or fills a folder of models."""
    path = Path(path)
    what = format.removeprefix("unembed-")
    if not path.exists():
        return
    if not path.is_dir():
        raise BadInputError(path, f"is a file; --out names the {what} directory to write")
    if not any(path.iterdir()):
        return
    if _model_format(path) != format:
        raise BadInputError(path, f"is neither empty nor an unembed {what} directory; give a new or empty folder")
    if not overwrite:
        raise BadInputError(path, f"already holds an unembed {what}; give --overwrite to replace it")


def _model_format(path: Path) -> str | None:
    try:
        config = read_json(path / "config.json")
    except (BadInputError, UnsafeFileError):
        return None
    return config.get("format") if isinstance(config, dict) else None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, turning every failure into one BadInputError naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise BadInputError(path, f"cannot read ({e.strerror or e})") from None
    if raw[:1] in PICKLE_MAGIC or raw[:4] in PICKLE_MAGIC:
        raise UnsafeFileError(f"{path}: looks like a pickle/torch.save file; unembed never unpickles files, expected JSON")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadInputError(path, "is not UTF-8 text, expected JSON") from None
    except json.JSONDecodeError as e:
        raise BadInputError(path, f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def check_safetensors(path: str | os.PathLike) -> Path:
    """Refuse anything that is not a safetensors file, before any library opens it."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, "no such file")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors starts with a little-endian u64 header length followed by '{'; checked first,
    # because a header length whose low byte is 0x80 starts with pickle's magic byte
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return path
    if head[:1] in PICKLE_MAGIC or head[:4] in PICKLE_MAGIC:
        raise UnsafeFileError(f"{path}: is a pickle/torch.save file; unembed loads weights and embeddings only from .safetensors")
    raise BadInputError(path, "is not a safetensors file")


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict, dict[str, str]]:
    """Return (tensors, metadata) of a safetensors file."""
    from safetensors import safe_open

    path = check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise BadInputError(path, f"corrupt safetensors file ({e})") from None
    return tensors, metadata


def save_module(path: str | os.PathLike, module) -> None:
    """A module's state_dict as safetensors; tied weights (an LM's input and output embedding) are
    stored once, as safetensors' save_model does."""
    from safetensors.torch import save_model

    with atomic_path(path) as tmp:
        save_model(module, str(tmp))


def load_module(module, path: str | os.PathLike) -> None:
    """Load weights saved by save_module into `module` (strict: every non-tied tensor must be there)."""
    from safetensors.torch import load_model

    path = check_safetensors(path)
    first = next(iter(module.state_dict().values()), None)
    try:
        load_model(module, str(path), strict=True, device=str(first.device) if first is not None else "cpu")
    except RuntimeError as e:
        raise BadInputError(path, f"does not match the model: {str(e).splitlines()[0][:300]}") from None
    except Exception as e:  # safetensors' own errors: a truncated or damaged file
        raise BadInputError(path, f"corrupt safetensors file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
