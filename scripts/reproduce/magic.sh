#!/usr/bin/env bash
# MAGIC (Su et al. 2022): GPT-2 small fine-tuned on the COCO captions' text with SimCTG (margin 0.5),
# then training-free CLIP-guided search: k = 45, alpha 0.1, beta 2.0, 16 tokens. (MAGIC's fine-tuning
# schedule is not restated here: this uses `unembed train lm`'s defaults.)
# Paper (COCO test): B1 56.8, B4 12.9, M 17.4, R-L 39.9, C 49.3, S 11.3.
source "$(dirname "$0")/common.sh"
unembed train lm --data "$DATA" --lm "$LM" --simctg-margin 0.5 \
  --out "$RUN/models/magic-lm" $TRAIN_FLAGS
unembed build iterative --embedder "$EMBEDDER" --lm "$RUN/models/magic-lm" --k 45 --alpha 0.1 --beta 2.0 \
  --max-length 16 --out "$RUN/models/magic"
unembed compare --data "$DATA" --embedder "$EMBEDDER" --decoders "magic=$RUN/models/magic" \
  --out "$RUN/compare-magic" $COMPARE_FLAGS
