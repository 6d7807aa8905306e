"""Precomputed embeddings in the formats users hold them, read a batch at a time (memory stays
bounded by one batch, whatever the file's size):

- an unembed embeddings file (`unembed embed`: safetensors with ids and the embedder's id);
- any safetensors file holding one [N, D] tensor (vectors from a user's store);
- a `.npy` file of [N, D] (memory-mapped, allow_pickle=False);
- clip-retrieval's folder (and LAION's published embeddings): `img_emb/img_emb_{i}.npy` with
  `metadata/metadata_{i}.parquet` beside them, row for row; each row's metadata (key, url,
  caption, ...) is carried into the output records, and its `key` (else `image_path`) is its id.
The last three carry no embedder id: a decoder can check only their width. Vectors are passed on as
the file holds them; whether they are L2-normalised is the file's word (unembed's own files) or read
off the rows (every row of unit length), so each decoder can normalise as its method does.
"""
from __future__ import annotations

import json
import re
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from unembed.errors import BadInputError, MismatchError
from unembed.io import load_tensors, save_tensors

ID_COLUMNS = ("key", "image_path", "id")


@dataclass
class Embedded:
    """One embedding pass: `vectors` [N, D] as the embedder made them (`normalized` says whether they
    are L2-normalised), `ids` (N strings), optional `image_tokens` [N, T, W] (CoCa decodes from them),
    and the embedder that produced them. Saved as safetensors with the tensors "vectors" and "tokens"
    and the metadata "normalized" ("true" | "false"; files written before it held unit vectors)."""

    vectors: torch.Tensor
    ids: list[str]
    embedder_id: str
    embedder_spec: str
    modality: str = "image"
    image_tokens: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)
    normalized: bool = False

    def __post_init__(self):
        if self.vectors.ndim != 2 or len(self.ids) != self.vectors.shape[0]:
            raise BadInputError("embeddings", f"need vectors [N, D] and N ids, got {tuple(self.vectors.shape)} and {len(self.ids)} ids")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def unit(self) -> torch.Tensor:
        """The vectors L2-normalised (cosine-based methods and the normalising decoders read these)."""
        return self.vectors.float() if self.normalized else torch.nn.functional.normalize(self.vectors.float(), dim=-1)

    @classmethod
    def concat(cls, parts: Sequence["Embedded"]) -> "Embedded":
        """One Embedded from batches of the same embedding pass, in order."""
        first = parts[0]
        tokens = None if first.image_tokens is None else torch.cat([p.image_tokens for p in parts])
        if len({p.normalized for p in parts}) > 1:
            raise MismatchError("cannot join raw and normalised embeddings into one pass")
        return cls(torch.cat([p.vectors for p in parts]), [i for p in parts for i in p.ids], first.embedder_id,
                   first.embedder_spec, first.modality, tokens, dict(first.meta), first.normalized)

    def select(self, index: Sequence[int] | slice) -> "Embedded":
        idx = list(range(len(self)))[index] if isinstance(index, slice) else list(index)
        t = None if self.image_tokens is None else self.image_tokens[idx]
        return Embedded(self.vectors[idx], [self.ids[i] for i in idx], self.embedder_id,
                        self.embedder_spec, self.modality, t, dict(self.meta), self.normalized)

    def save(self, path: str | os.PathLike) -> None:
        tensors = {"vectors": self.vectors}
        if self.image_tokens is not None:
            tensors["tokens"] = self.image_tokens
        metadata = {"format": "unembed-embeddings", "embedder_id": self.embedder_id,
                    "embedder_spec": self.embedder_spec, "modality": self.modality,
                    "ids": json.dumps(self.ids), "meta": json.dumps(self.meta),
                    "normalized": "true" if self.normalized else "false"}
        save_tensors(path, tensors, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Embedded":
        tensors, md = load_tensors(path)
        if md.get("format") != "unembed-embeddings" or "vectors" not in tensors:
            # A bare safetensors file of vectors from a user's vector store: number the rows.
            if len(tensors) != 1:
                raise BadInputError(path, "expected an unembed embeddings file or a safetensors file holding one [N, D] tensor")
            (vectors,) = tensors.values()
            if vectors.ndim != 2:
                raise BadInputError(path, f"expected a [N, D] tensor, got shape {tuple(vectors.shape)}")
            vectors = vectors.float()
            return cls(vectors, [str(i) for i in range(len(vectors))], md.get("embedder_id", ""),
                       md.get("embedder_spec", ""), "unknown", normalized=rows_are_unit(vectors))
        return cls(tensors["vectors"].float(), json.loads(md["ids"]), md["embedder_id"], md["embedder_spec"],
                   md.get("modality", "image"), tensors.get("tokens"), json.loads(md.get("meta", "{}")),
                   md.get("normalized", "true") == "true")  # files from before the flag held unit vectors


@dataclass
class _Part:
    """One array of rows (a file, or one img_emb_{i}.npy) and its metadata table."""

    rows: int
    read: object        # (start, stop) -> np.ndarray / torch.Tensor [rows, D]
    ids: object         # (start, stop) -> list[str]
    metadata: object    # (start, stop) -> list[dict] | None
    tokens: object = None  # (start, stop) -> image tokens [rows, T, W] (CoCa), when the file has them


class EmbeddingSource:
    """N embeddings from one of the formats above; `batches` yields (Embedded, per-row metadata)."""

    def __init__(self, path, parts: list[_Part], dim: int, embedder_id: str = "", embedder_spec: str = "",
                 modality: str = "image", normalized: bool | None = None):
        self.path, self.parts, self.dim = str(path), parts, dim
        self.embedder_id, self.embedder_spec, self.modality = embedder_id, embedder_spec, modality
        self.starts = np.cumsum([0] + [p.rows for p in parts])
        if normalized is None:  # a file that does not say: read it off its first rows
            sample = parts[0].read(0, min(parts[0].rows, 1024)) if parts else []
            normalized = rows_are_unit(sample if isinstance(sample, torch.Tensor)
                                       else torch.from_numpy(np.array(sample, dtype=np.float32)))
        self.normalized = normalized

    def __len__(self) -> int:
        return int(self.starts[-1])

    def batches(self, batch_size: int, rows: Sequence[int] | None = None) -> Iterator[tuple[object, list[dict] | None]]:
        """Contiguous batches of `rows` (default all; a distributed process gives its block)."""
        rows = range(len(self)) if rows is None else rows
        if len(rows) == 0:
            return
        first, last = rows[0], rows[-1] + 1
        for start in range(first, last, batch_size):
            stop = min(start + batch_size, last)
            vectors, ids, meta, tokens = [], [], [], []
            for part, (lo, hi) in self._spans(start, stop):
                chunk = part.read(lo, hi)
                vectors.append(chunk.float() if isinstance(chunk, torch.Tensor)
                               else torch.from_numpy(np.array(chunk, dtype=np.float32)))  # a copy: mmap is read-only
                ids += part.ids(lo, hi)
                found = part.metadata(lo, hi)
                meta += found if found is not None else [{} for _ in range(hi - lo)]
                if part.tokens is not None:
                    tokens.append(part.tokens(lo, hi))
            yield (Embedded(torch.cat(vectors), ids, self.embedder_id, self.embedder_spec, self.modality,
                            torch.cat(tokens).float() if tokens else None, normalized=self.normalized),
                   meta if any(meta) else None)

    def _spans(self, start: int, stop: int):
        for i, part in enumerate(self.parts):
            lo, hi = max(start, self.starts[i]), min(stop, self.starts[i + 1])
            if lo < hi:
                yield part, (int(lo - self.starts[i]), int(hi - self.starts[i]))


def open_embeddings(path) -> EmbeddingSource:
    path = Path(path)
    if path.is_dir():
        return _clip_retrieval(path)
    if not path.is_file():
        raise BadInputError(path, "no such file or directory")
    if path.suffix == ".npy":
        array = _npy(path)
        return EmbeddingSource(path, [_array_part(array, path.stem)], array.shape[1])
    return _safetensors(path)


def _npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:  # an object array would need unpickling: refused
        raise BadInputError(path, f"cannot be read without unpickling, which unembed never does ({e})") from None
    except OSError as e:
        raise BadInputError(path, f"is not a .npy array ({e})") from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise BadInputError(path, f"expected a float [N, D] array, got {array.dtype} of shape {array.shape}")
    return array


def _array_part(array, name: str, table=None) -> _Part:
    def ids(lo, hi):
        if table is not None:
            column = next((c for c in ID_COLUMNS if c in table.column_names), None)
            if column is not None:
                return [str(v) for v in table.column(column).slice(lo, hi - lo).to_pylist()]
        return [f"{name}:{i}" if name else str(i) for i in range(lo, hi)]

    def metadata(lo, hi):
        return None if table is None else table.slice(lo, hi - lo).to_pylist()

    return _Part(len(array), lambda lo, hi: array[lo:hi], ids, metadata)


def _safetensors(path: Path) -> EmbeddingSource:
    from safetensors import safe_open

    from unembed.io import check_safetensors

    check_safetensors(path)
    try:
        handle = safe_open(str(path), framework="pt")
        metadata, keys = dict(handle.metadata() or {}), list(handle.keys())
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise BadInputError(path, f"corrupt safetensors file ({e})") from None
    if metadata.get("format") == "unembed-embeddings" and "vectors" in keys:
        key, ids = "vectors", json.loads(metadata["ids"])
    elif len(keys) == 1:
        key, ids = keys[0], None
    else:
        raise BadInputError(path, "expected an unembed embeddings file or a safetensors file holding one [N, D] tensor")
    vectors = handle.get_slice(key)  # the slices keep the file open and read only the rows asked for
    shape = vectors.get_shape()
    if len(shape) != 2:
        raise BadInputError(path, f"expected a [N, D] tensor, got shape {tuple(shape)}")
    tokens = handle.get_slice("tokens") if ids is not None and "tokens" in keys else None
    part = _Part(shape[0], lambda lo, hi: vectors[lo:hi].float(),
                 (lambda lo, hi: ids[lo:hi]) if ids is not None else (lambda lo, hi: [str(i) for i in range(lo, hi)]),
                 lambda lo, hi: None, (lambda lo, hi: tokens[lo:hi]) if tokens is not None else None)
    said = metadata.get("normalized", "true") == "true" if ids is not None else None  # unembed's files say
    return EmbeddingSource(path, [part], shape[1], metadata.get("embedder_id", ""), metadata.get("embedder_spec", ""),
                           metadata.get("modality", "image" if ids is not None else "unknown"), said)


def _clip_retrieval(folder: Path) -> EmbeddingSource:
    """clip-retrieval's output folder: img_emb/img_emb_{i}.npy and metadata/metadata_{i}.parquet."""
    import pyarrow.parquet as pq

    arrays = sorted((folder / "img_emb").glob("img_emb_*.npy"), key=_number) if (folder / "img_emb").is_dir() else []
    if not arrays:
        raise BadInputError(folder, "is not a clip-retrieval embeddings folder (no img_emb/img_emb_N.npy)")
    parts, dim = [], None
    for file in arrays:
        array = _npy(file)
        table_file = folder / "metadata" / f"metadata_{_number(file)}.parquet"
        table = pq.read_table(table_file) if table_file.is_file() else None
        if table is not None and table.num_rows != len(array):
            raise BadInputError(table_file, f"has {table.num_rows} rows for the {len(array)} vectors of {file.name}")
        if dim is not None and array.shape[1] != dim:
            raise BadInputError(file, f"holds {array.shape[1]}-d vectors, the others {dim}-d")
        dim = array.shape[1]
        parts.append(_array_part(array, file.stem, table))
    return EmbeddingSource(folder, parts, dim)


def rows_are_unit(vectors: torch.Tensor, tolerance: float = 1e-3) -> bool:
    """Whether every row of [N, D] vectors is L2-normalised: what a file that does not say holds."""
    return bool(len(vectors)) and bool(((vectors.float().norm(dim=-1) - 1).abs() < tolerance).all())


def _number(path: Path) -> int:
    found = re.search(r"(\d+)$", path.stem)
    return int(found.group(1)) if found else -1
