"""Imported once by `unembed compare`'s fork server: torch, transformers and open_clip (with the
torchvision fix), so each fresh training or captioning process forks with them loaded instead of
paying seconds of imports again. Importing this module is its whole job."""
from unembed.compat import import_open_clip, import_transformers

import_transformers()
import_open_clip()
