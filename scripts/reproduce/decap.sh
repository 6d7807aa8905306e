#!/usr/bin/env bash
# DeCap (Li et al. 2023): a 4-layer, 4-head, 768-wide GPT-2 trained from scratch on the COCO captions
# (CLIP's BPE, 20 tokens, label smoothing 0.1, lr 1e-5, 1,000 warm-up steps, 10 epochs of batch 64),
# one-vector prefix; at inference the image embedding is projected onto a memory of 50,000 training
# caption embeddings (tau 0.01) and decoded greedily. These are `unembed train decap`'s defaults.
# Paper (COCO test): B4 24.7, M 25.0, C 91.2, S 18.7.
source "$(dirname "$0")/common.sh"
unembed train decap --data "$DATA" --embedder "$EMBEDDER" --out "$RUN/models/decap" $TRAIN_FLAGS
unembed compare --data "$DATA" --embedder "$EMBEDDER" --decoders "decap=$RUN/models/decap" \
  --out "$RUN/compare-decap" $COMPARE_FLAGS
