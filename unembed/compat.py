"""Import open_clip on torch builds whose torchvision wheel does not match.

PyPI's torchvision fails to import beside some CPU builds of torch with
"operator torchvision::nms does not exist": its Python side registers fake kernels for
C++ ops that the mismatched binary never defined. open_clip imports torchvision, so
unembed would not import at all. Defining the two op schemas that torchvision's import
looks up lets it load; unembed never calls those ops. Applied only when the import fails.
"""
from __future__ import annotations

import functools
import sys

_MISSING_OP = "torchvision::nms does not exist"
_schemas_defined = None  # keeps the torch.library.Library alive: dropping it unregisters the ops


def _define_torchvision_op_schemas() -> None:
    global _schemas_defined
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _schemas_defined = lib


def import_torchvision():
    try:
        import torchvision
    except RuntimeError as e:
        if _MISSING_OP not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _define_torchvision_op_schemas()
        import torchvision
    return torchvision


def import_open_clip():
    import_torchvision()
    import open_clip

    return open_clip


@functools.lru_cache(maxsize=None)
def clip_bpe(context_length: int):
    """open_clip's SimpleTokenizer, built once per process and context length: building one reads and
    merges its 49k-word vocabulary (0.2 s), and every embedder and decoder load asked for a new one.
    Its only state besides the vocabulary is a memo of words already split, so sharing it is safe."""
    return import_open_clip().tokenizer.SimpleTokenizer(context_length=context_length)


def torchvision_was_patched() -> bool:
    return _schemas_defined is not None


def import_transformers():
    """transformers imports torchvision too (for image processors), so it needs the same fix."""
    import_torchvision()
    import transformers

    return transformers


def run_accelerate_cli(argv: list[str]) -> None:
    """`accelerate ...` with the torchvision fix applied: accelerate's own command line imports
    torchvision (through timm) and fails on the same mismatched builds."""
    import_torchvision()
    from accelerate.commands.accelerate_cli import main

    sys.argv = ["accelerate", *argv]
    main()


if __name__ == "__main__":
    if sys.argv[1:2] != ["accelerate"]:
        sys.exit("usage: python -m unembed.compat accelerate launch [accelerate options] -m unembed.cli ...")
    run_accelerate_cli(sys.argv[2:])
