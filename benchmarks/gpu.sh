#!/usr/bin/env bash
# Every performance benchmark on one CUDA GPU, into OUT_DIR (default benchmarks/results):
# - gpu.json: the iterative (MAGIC) search, prefix decoding and DeCap's projection at real size
#   (ViT-B-32 and GPT-2 124M architectures, random weights; M = 1,000,000), prefix decoding in fp32
#   and bf16, the others in bf16;
# - train_precision_gpu.json and its captions: CapDec with GPT-2 124M's blocks trained in fp32, bf16
#   and fp16 on the scenes world (20,000 scenes, made here), then the test split captioned by each.
#   Score it on a machine with Java: python benchmarks/train_precision.py score --data DIR --result FILE.
# About 10 minutes on one H200 (2026-12-04: iterative 91 s, each prefix run ~65 s, projection 28 s,
# each precision's training ~85 s and captioning ~25 s, with interpreter starts). Each stage has its
# own time limit, and a stage that fails or runs out leaves the others' results (gpu.json says which;
# the script then exits 1); run again with the same OUT_DIR, train_precision keeps the precisions it
# measured. Nothing here downloads.
#
#   bash benchmarks/gpu.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
TMP=$(mktemp -d)
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
STAGES="iterative prefix_fp32 prefix decap_projection train_precision"
FAILED=0
combine() {  # gpu.json from what the stages left so far: a run cut short keeps what it did
    "$PY" - "$TMP" "$OUT/gpu.json" $STAGES <<'PY'
import json, sys
from pathlib import Path
tmp, out, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
result = {"gpu": (tmp / "gpu.txt").read_text().strip(), "stages": {}}
for name in names:
    status = tmp / f"{name}.status"
    result["stages"][name] = json.loads(status.read_text()) if status.exists() else {"exit": "not run"}
    if (tmp / f"{name}.json").exists():
        result[name] = json.loads((tmp / f"{name}.json").read_text())
out.write_text(json.dumps(result, indent=2) + "\n")
PY
}
stage() {  # stage NAME SECONDS COMMAND...: its exit status and time go into gpu.json
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name (at most ${limit}s)"
    timeout "$limit" "$@"
    local code=$?
    [ "$code" = 0 ] || FAILED=1
    echo "{\"exit\": $code, \"seconds\": $((SECONDS - t0))}" > "$TMP/$name.status"
    combine
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$TMP/gpu.txt"
cat "$TMP/gpu.txt"
"$PY" -c 'import torch, transformers, open_clip; print("torch", torch.__version__, "transformers", transformers.__version__, "open_clip", open_clip.__version__, "cuda", torch.cuda.is_available())'
# The scenes world is made on the CPU while the first (GPU) stage runs; its own cores, not the timed ones'.
"$PY" -m unembed.cli data scenes --out "$TMP/scenes" --n 20000 --seed 0 > "$TMP/scenes.log" 2>&1 &
SCENES=$!
stage iterative 120 "$PY" benchmarks/iterative_speed.py --device cuda --dtype bf16 --batches 1,16,64 --naive-images 0 --out "$TMP/iterative.json"
stage prefix_fp32 100 "$PY" benchmarks/prefix_speed.py --device cuda --dtype fp32 --batches 1,64,256 --naive-images 2 --out "$TMP/prefix_fp32.json"
stage prefix 100 "$PY" benchmarks/prefix_speed.py --device cuda --dtype bf16 --batches 1,64,256 --naive-images 2 --out "$TMP/prefix.json"
stage decap_projection 50 "$PY" benchmarks/decap_projection.py --device cuda --out "$TMP/decap_projection.json"
wait $SCENES; tail -1 "$TMP/scenes.log"
stage train_precision 420 "$PY" benchmarks/train_precision.py run --data "$TMP/scenes" --work "$TMP/train" --out "$OUT/train_precision_gpu.json" --device cuda --steps 600 --max-images 1000
cat "$OUT/gpu.json" | head -c 3000; echo
"$PY" -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))["stages"]))' "$OUT/gpu.json"
exit "$FAILED"
