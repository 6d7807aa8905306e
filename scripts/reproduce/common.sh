# Shared by the reproduction recipes: COCO in Karpathy's splits, imported once into $RUN/coco.
# Every setting can be given from outside, e.g. a smoke run:
#   TRAIN_FLAGS="--max-steps 2" COMPARE_FLAGS="--max-images 8 --no-spice" bash scripts/reproduce/capdec.sh
set -euo pipefail
KARPATHY="${KARPATHY:-dataset_coco.json}"    # Karpathy's split file (restval joins train)
IMAGES="${IMAGES:-coco-images}"              # the folder holding train2014/ and val2014/
RUN="${RUN:-reproduce-run}"
EMBEDDER="${EMBEDDER:-ViT-B-32:openai}"      # the CLIP every paper here used
LM="${LM:-gpt2}"                             # GPT-2 small (124M)
COCA="${COCA:-coca_ViT-B-32:mscoco_finetuned_laion2b_s13b_b90k}"
TRAIN_FLAGS="${TRAIN_FLAGS:-}"
COMPARE_FLAGS="${COMPARE_FLAGS:-}"
DATA="$RUN/coco"
if [ ! -f "$DATA/test/captions.json" ]; then
  unembed data import --format karpathy --annotations "$KARPATHY" --images "$IMAGES" --out "$DATA"
fi
