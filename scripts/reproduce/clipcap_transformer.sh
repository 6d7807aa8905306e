#!/usr/bin/env bash
# ClipCap, transformer mapper with GPT-2 frozen (the paper's best): k = clip length = 40, 8 layers,
# 8 heads; otherwise as the MLP recipe. Paper (COCO test): B4 33.53, M 27.45, C 113.08, S 21.05.
source "$(dirname "$0")/common.sh"
unembed train clipcap --data "$DATA" --embedder "$EMBEDDER" --lm "$LM" --lm-mode frozen --mapper transformer \
  --prefix-length 40 --mapper-length 40 --mapper-layers 8 --epochs 10 --batch-size 40 --lr 2e-5 --warmup-steps 5000 \
  --out "$RUN/models/clipcap-transformer" $TRAIN_FLAGS
unembed compare --data "$DATA" --embedder "$EMBEDDER" --decoders "clipcap-transformer=$RUN/models/clipcap-transformer" \
  --out "$RUN/compare-clipcap-transformer" $COMPARE_FLAGS
