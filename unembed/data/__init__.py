"""Data: splits, images, captions, embedding files, the scenes world."""

# The largest image any command decodes, checked from its header before decoding (decompression bombs):
# one limit for `caption`, `embed`, training and `serve` (its --max-pixels). Here, not in images.py, so
# the command line can show it without importing Pillow.
MAX_PIXELS = 64_000_000
