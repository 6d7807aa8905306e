#!/usr/bin/env bash
# `make bundle`: train the shipped default bundle (unembed/bundle) on the scenes world, from nothing.
# One compare run trains the embedder and every decoder at bundle size (scripts/bundle.json) and
# measures them; `scripts/pack_bundle.py` then keeps the models in fp16 with the scenes vocabulary only.
set -euo pipefail
RUN="${1:-bundle-run}"
mkdir -p "$RUN"
unembed data scenes --out "$RUN/scenes" --n 20000 --seed 0
unembed compare --data "$RUN/scenes" --out "$RUN/compare" --config scripts/bundle.json --no-spice
python scripts/pack_bundle.py pack "$RUN/compare" --data "$RUN/scenes" --out unembed/bundle
