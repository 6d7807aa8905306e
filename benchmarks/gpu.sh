#!/usr/bin/env bash
# Every performance benchmark on one CUDA GPU, in bf16 where precision applies, into one JSON file.
# Sized to finish within 8 minutes on one H100/H200 (GPU time is scarce): the iterative and prefix
# benchmarks at their real sizes, DeCap's projection at M = 1,000,000. Nothing here downloads.
#
#   bash benchmarks/gpu.sh [OUT_DIR]      -> OUT_DIR/gpu.json (default benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
TMP=$(mktemp -d)
PY=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$TMP/gpu.txt"
timeout 200 "$PY" benchmarks/iterative_speed.py --device cuda --dtype bf16 --batches 1,16,64 --naive-images 0 --out "$TMP/iterative.json"
timeout 120 "$PY" benchmarks/prefix_speed.py --device cuda --dtype bf16 --batches 1,64,256 --naive-images 2 --out "$TMP/prefix.json"
timeout 90 "$PY" benchmarks/decap_projection.py --device cuda --out "$TMP/decap_projection.json"
mkdir -p "$OUT"
"$PY" - "$TMP" "$OUT/gpu.json" <<'PY'
import json, sys
from pathlib import Path
tmp, out = Path(sys.argv[1]), Path(sys.argv[2])
result = {"gpu": (tmp / "gpu.txt").read_text().strip(), "dtype": "bf16"}
for name in ("iterative", "prefix", "decap_projection"):
    result[name] = json.loads((tmp / f"{name}.json").read_text())
out.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
PY
