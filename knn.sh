#!/usr/bin/env bash
# Multi-scale kNN evaluation of frozen encoders (top-1 at 12.5 / 25 / 50 / 100 % of the input size).
#
#   bash knn.sh                                     # random init vs the train.sh checkpoint on the embedded sample
#   CHECKPOINTS="none weights/cross_scale_mae_base_pretrain.pth" bash knn.sh --pool mean
#   bash knn.sh weights/cross_scale_mae_large_pretrain.pth output/pretrain_tiny/checkpoint-last.pth   # positional checkpoints
#
# Real runs: TRAIN_PATH / TEST_PATH of a labelled CSV or ImageFolder (RESISC45, UC Merced, WHU-RS19, EuroSAT-RGB);
# TEST_PATH=split evaluates a seeded 20 % of TRAIN_PATH. Extra flags pass through (--scale_mode native, --pool mean, ...).
set -euo pipefail
cd "$(dirname "$0")"

CHECKPOINTS=${CHECKPOINTS:-"none output/pretrain_tiny/checkpoint-last.pth"}
TRAIN_PATH=${TRAIN_PATH:-data/sentinel2_rgb/train.csv}
TEST_PATH=${TEST_PATH:-data/sentinel2_rgb/val.csv}
OUTPUT_DIR=${OUTPUT_DIR:-output/knn}
BATCH_SIZE=${BATCH_SIZE:-64}
NUM_WORKERS=${NUM_WORKERS:-2}
PYTHON=${PYTHON:-python}

POSITIONAL=()
while [[ $# -ge 1 && $1 != -* ]]; do POSITIONAL+=("$1"); shift; done
if [[ ${#POSITIONAL[@]} -gt 0 ]]; then CHECKPOINTS="${POSITIONAL[*]}"; fi
for checkpoint in $CHECKPOINTS; do
  if [[ $checkpoint != none && ! -f $checkpoint ]]; then
    echo "error: no checkpoint at $checkpoint: run 'bash train.sh' first, or set CHECKPOINTS (see weights/README.md)" >&2
    exit 1
  fi
done

# shellcheck disable=SC2086  # CHECKPOINTS is a list of paths
$PYTHON main_knn.py --checkpoints $CHECKPOINTS --train_path "$TRAIN_PATH" --test_path "$TEST_PATH" \
  --output_dir "$OUTPUT_DIR" --batch_size "$BATCH_SIZE" --num_workers "$NUM_WORKERS" "$@"
