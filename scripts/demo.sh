#!/usr/bin/env bash
# The main job, run by `make demo` into the folder given as $1 (default demo-run): the toolkit with the
# shipped bundle in a few minutes, nothing to train. Each command below appears verbatim in README.md;
# tests/test_readme.py checks that and runs them small. (Training from nothing: `make quickstart`.)
set -euo pipefail
out="${1:-demo-run}"
mkdir -p "$out"
cd "$out"
unembed demo --out demo-images
unembed data scenes --out scenes --n 200 --n-eval 100 --seed 0
unembed compare --data scenes --embedder bundle --decoders bundle --max-images 100 --no-spice --out compare-scenes
echo
echo "results in $(pwd):"
echo "  demo-images/                 new scenes images (captioned above by every bundled decoder)"
echo "  compare-scenes/report.html   every decoder on 100 test images: scores, speed, each image's captions"
echo "  compare-scenes/compare.md    the table; compare.json has every number"
echo "Real photos: unembed caption photo.jpg --decoder clipcap-coco (downloads ClipCap's COCO weights once)"
