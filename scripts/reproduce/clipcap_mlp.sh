#!/usr/bin/env bash
# ClipCap, MLP mapper with GPT-2 fine-tuned (Mokady et al. 2021): k = 10, AdamW lr 2e-5, 5,000
# warm-up steps, 10 epochs of batch 40; beam search 5. Paper (COCO test): B4 32.15, M 27.1, C 108.35, S 20.12.
source "$(dirname "$0")/common.sh"
unembed train clipcap --data "$DATA" --embedder "$EMBEDDER" --lm "$LM" --lm-mode full --mapper mlp --prefix-length 10 \
  --epochs 10 --batch-size 40 --lr 2e-5 --warmup-steps 5000 --out "$RUN/models/clipcap-mlp" $TRAIN_FLAGS
unembed compare --data "$DATA" --embedder "$EMBEDDER" --decoders "clipcap-mlp=$RUN/models/clipcap-mlp" \
  --out "$RUN/compare-clipcap-mlp" $COMPARE_FLAGS
