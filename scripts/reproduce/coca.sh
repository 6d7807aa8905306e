#!/usr/bin/env bash
# CoCa as open_clip released it fine-tuned on COCO (coca_ViT-B-32, mscoco_finetuned_laion2b_s13b_b90k):
# no training here, captioned from its own image tokens. (The paper's 2.1B model reports C 143.6, S 24.7;
# open_clip does not publish numbers for this B-32 checkpoint.)
source "$(dirname "$0")/common.sh"
unembed build coca --embedder "$COCA" --out "$RUN/models/coca"
unembed compare --data "$DATA" --embedder "$EMBEDDER" --decoders "coca=$RUN/models/coca" \
  --out "$RUN/compare-coca" $COMPARE_FLAGS
