#!/usr/bin/env bash
# The offline quickstart from nothing, run by `make quickstart` in the folder given as $1 (default
# quickstart-run). Each command below appears verbatim in docs/GUIDE.md; tests/test_readme.py checks
# that and runs them small.
set -euo pipefail
mkdir -p "${1:-quickstart-run}"
cd "${1:-quickstart-run}"
unembed data scenes --out scenes --n 20000 --seed 0
unembed train clip --data scenes --out models/scenes-clip
unembed build retrieval --captions scenes/train/captions.json --embedder models/scenes-clip --out models/retrieval
unembed caption scenes/test/images --decoder models/retrieval --out test-captions.jsonl
unembed eval --results test-captions.jsonl --refs scenes/test/captions.json --embedder models/scenes-clip --out test-scores.json
unembed caption scenes/compositional/images --decoder models/retrieval --out compositional-captions.jsonl
unembed eval --results compositional-captions.jsonl --refs scenes/compositional/captions.json --embedder models/scenes-clip --out compositional-scores.json
