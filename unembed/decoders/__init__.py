"""The decoder registry: every decoder kind by name, created from a config or loaded from a directory.

Built-in decoders are imported when first asked for (not at package import), so listing or
loading one never imports the others' dependencies.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from unembed.decoders.base import (DECODER_FORMAT, Decoder, DecoderConfig, build_saved_decoder, decoder_path,
                                   find_decoder,
                                   read_decoder_config, register_decoder, registered, resolve_embedder_spec)
from unembed.errors import ModelLoadError

BUILTIN_DECODERS = {
    "retrieval": "unembed.decoders.retrieval",
    "clipcap": "unembed.decoders.clipcap",
    "capdec": "unembed.decoders.capdec",
    "decap": "unembed.decoders.decap",
    "viecap": "unembed.decoders.viecap",
    "iterative": "unembed.decoders.iterative",
    "coca": "unembed.decoders.coca",
    "corrector": "unembed.decoders.corrector",
    "ensemble": "unembed.decoders.ensemble",
}


def decoder_class(name: str) -> type[Decoder]:
    if name not in registered() and name in BUILTIN_DECODERS:
        importlib.import_module(BUILTIN_DECODERS[name])
    try:
        return registered()[name]
    except KeyError:
        raise ModelLoadError(f"unknown decoder kind {name!r} (known: {', '.join(list_decoders())})") from None


def list_decoders() -> list[str]:
    return sorted(set(BUILTIN_DECODERS) | set(registered()))


def prefix_kinds() -> list[str]:
    """The prefix-LM kinds `unembed train KIND` trains on their own: not those trained over a base
    decoder (the corrector, by `unembed train corrector --base DIR`)."""
    from unembed.decoders.prefix import PrefixDecoder

    return [k for k in list_decoders() if issubclass(decoder_class(k), PrefixDecoder) and not decoder_class(k).wraps_base]


def create_decoder(name: str, **config) -> Decoder:
    cls = decoder_class(name)
    return cls(cls.config_class(**config))


def load_decoder(path, device: str = "auto", embedder=None) -> Decoder:
    """Load a saved decoder directory; with `embedder`, refuse it unless it was built for that embedder,
    and attach it. A decoder that decodes with its embedder's towers gets one attached (loaded from its
    config if not given); others load theirs only if asked to rerank."""
    from unembed.embedders import resolve_device

    path = decoder_path(path)
    device = str(resolve_device(device))  # one default everywhere: auto (CUDA when there is one)
    saved = read_decoder_config(path)
    cls = decoder_class(saved.get("kind", ""))
    if embedder is not None:
        check_embedder(saved["config"], embedder, path)
    decoder = build_saved_decoder(cls, saved, Path(path), device)
    if cls.needs_embedder and embedder is None:
        from unembed.embedders import load_embedder

        embedder = load_embedder(resolve_embedder_spec(saved["config"], path), device)
        check_embedder(saved["config"], embedder, path)
    if embedder is not None:  # every kind reranks with it (rerank N); some also decode with it
        decoder.attach_embedder(embedder)
    return decoder


def check_embedder(config: dict, embedder, where) -> None:
    from unembed.errors import MismatchError

    from unembed.embedders import same_embedder

    if config.get("embedder_id") and not same_embedder(config["embedder_id"], embedder.id):
        raise MismatchError(f"decoder {where} was built for embedder {config.get('embedder_spec')!r} "
                            f"(id {config['embedder_id']}), not {embedder.spec!r} (id {embedder.id})")
    if config.get("embed_dim") and config["embed_dim"] != embedder.dim:
        raise MismatchError(f"decoder {where} expects {config['embed_dim']}-d embeddings; "
                            f"embedder {embedder.spec!r} makes {embedder.dim}-d")


__all__ = ["DECODER_FORMAT", "Decoder", "DecoderConfig", "create_decoder", "decoder_path", "find_decoder", "decoder_class", "list_decoders", "prefix_kinds",
           "check_embedder", "load_decoder", "read_decoder_config", "register_decoder", "resolve_embedder_spec"]
