#!/usr/bin/env bash
# CapDec (Nukrai et al. 2022): ClipCap's model trained on the COCO captions' text only, with Gaussian
# noise of variance 0.016 on the normalised text embeddings; GPT-2 fine-tuned, lr 2e-5, 10 epochs of
# batch 32. (The official code's defaults use RN50x4 and a transformer mapper; the paper's ViT-B/32
# COCO row is this MLP setting.) Paper (COCO test): B4 26.4, M 25.1, R-L 51.8, C 91.8.
source "$(dirname "$0")/common.sh"
unembed train capdec --data "$DATA" --embedder "$EMBEDDER" --lm "$LM" --lm-mode full --mapper mlp --prefix-length 10 \
  --noise-variance 0.016 --epochs 10 --batch-size 32 --lr 2e-5 --warmup-steps 5000 --out "$RUN/models/capdec" $TRAIN_FLAGS
unembed compare --data "$DATA" --embedder "$EMBEDDER" --decoders "capdec=$RUN/models/capdec" \
  --out "$RUN/compare-capdec" $COMPARE_FLAGS
