#!/usr/bin/env bash
# Train and evaluate the three prefix decoders on the scenes world made by scripts/quickstart.sh,
# in the same folder ($1, default demo-run). Each command below is the documented one (README).
set -euo pipefail
cd "${1:-demo-run}"
SMALL_LM='{"n_layer": 4, "n_embd": 256}'
for kind in clipcap capdec decap; do
  start=$SECONDS
  unembed train $kind --data scenes --embedder models/scenes-clip --out models/$kind \
      --lm scratch --tokenizer corpus:4000 --lm-config "$SMALL_LM" \
      --lr 1e-3 --warmup-steps 100 --batch-size 64 --max-steps 600
  echo "$kind training: $((SECONDS - start)) s wall" >&2
  for split in test compositional; do
    start=$SECONDS
    unembed caption scenes/$split/images --decoder models/$kind --out $kind-$split-captions.jsonl
    echo "$kind captioning $split: $((SECONDS - start)) s wall" >&2
    unembed eval --results $kind-$split-captions.jsonl --refs scenes/$split/captions.json \
      --embedder models/scenes-clip --name $kind-$split --out $kind-$split-scores.json
  done
done
