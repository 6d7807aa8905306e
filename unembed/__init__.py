"""unembed: turn joint (CLIP-style) embeddings back into text.

    import unembed
    embedder = unembed.load_embedder("ViT-B-32:laion2b_s34b_b79k")   # or a local directory
    decoder = unembed.load_decoder("path/to/decoder")
    captions = unembed.caption(["cat.jpg"], decoder=decoder)

Heavy libraries (torch, open_clip, transformers) load on first use, so `unembed --help` is fast.
"""
__version__ = "0.1.0"

_LAZY = {
    "load_embedder": "unembed.embedders",
    "Embedder": "unembed.embedders",
    "Embedded": "unembed.embedders",
    "create_decoder": "unembed.decoders",
    "load_decoder": "unembed.decoders",
    "list_decoders": "unembed.decoders",
    "caption": "unembed.pipeline",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unembed' has no attribute {name!r}")
