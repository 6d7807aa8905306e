"""The default bundle shipped inside the package (this directory): a scenes embedder and every
decoder, in fp16, with bundle.json naming them and the default. This module only finds them; the
bundle is made by `make bundle` (scripts/bundle.sh, packed by scripts/pack_bundle.py).
With no --decoder, `unembed caption` uses the bundle's default. It knows only the scenes world:
shapes, colours and positions on plain or textured backgrounds.
"""
from __future__ import annotations

import os
from pathlib import Path

from unembed.errors import ModelLoadError
from unembed.io import read_json

BUNDLE_DIR = Path(__file__).parent
BUNDLE_ENV = "UNEMBED_BUNDLE"  # another bundle directory to use instead of the shipped one
MANIFEST = "bundle.json"
MAX_BYTES = 25 * 2 ** 20  # the size budget of the shipped bundle


def bundle_dir() -> Path:
    return Path(os.environ.get(BUNDLE_ENV) or BUNDLE_DIR)


def manifest(bundle: Path | None = None) -> dict:
    bundle = bundle or bundle_dir()
    if not (bundle / MANIFEST).is_file():
        raise ModelLoadError(f"no model bundle at {bundle} (make it with `make bundle`); give --decoder DIR instead")
    return read_json(bundle / MANIFEST)


def bundled_decoder(name: str | None = None, bundle: Path | None = None) -> Path:
    """The directory of a bundled decoder: `name`, or the bundle's default."""
    bundle = bundle or bundle_dir()
    info = manifest(bundle)
    name = name or info["default"]
    if name not in info["decoders"]:
        raise ModelLoadError(f"the bundle has no decoder {name!r} (it has {', '.join(info['decoders'])})")
    return bundle / name
