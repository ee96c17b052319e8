#!/usr/bin/env bash
# Fine-tune a pretrained encoder for classification (GPU if there is one, else CPU).
#
#   bash finetune.sh                                   # WEIGHTS from train.sh, embedded Sentinel-2 sample, ~1 min on 2 CPU cores
#   WEIGHTS=weights/cross_scale_mae_base_pretrain.pth bash finetune.sh --epochs 5
#   bash finetune.sh vit_large_patch16 weights/cross_scale_mae_large_pretrain.pth --nb_classes 62   # upstream's <model> [weights] form
#
# Real runs (upstream's fMoW-RGB setting): WEIGHTS=weights/cross_scale_mae_base_pretrain.pth INPUT_SIZE=128
#   EPOCHS=100 WARMUP_EPOCHS=5 BATCH_SIZE=512 BLR=1e-3 TRAIN_PATH=../fmow-rgb-preproc/train_128.csv
#   TEST_PATH=../fmow-rgb-preproc/val_128.csv OUTPUT_DIR=output/finetune_base
# linprobe.sh runs this script with main_linprobe.py and its own defaults. Extra flags pass through.
set -euo pipefail
cd "$(dirname "$0")"

SCRIPT=${SCRIPT:-main_finetune.py}
WEIGHTS=${WEIGHTS:-output/pretrain_tiny/checkpoint-last.pth}
MODEL=${MODEL:-}                        # empty: the architecture of WEIGHTS
INPUT_SIZE=${INPUT_SIZE:-128}
EPOCHS=${EPOCHS:-30}
WARMUP_EPOCHS=${WARMUP_EPOCHS:-3}
BATCH_SIZE=${BATCH_SIZE:-32}            # per device
BLR=${BLR:-1e-3}
TRAIN_PATH=${TRAIN_PATH:-data/sentinel2_rgb/train.csv}
TEST_PATH=${TEST_PATH:-data/sentinel2_rgb/val.csv}
OUTPUT_DIR=${OUTPUT_DIR:-output/finetune_tiny}
NUM_WORKERS=${NUM_WORKERS:-2}
PYTHON=${PYTHON:-python}

if [[ $# -ge 1 && $1 != -* ]]; then MODEL=$1; shift; fi
if [[ $# -ge 1 && $1 != -* ]]; then WEIGHTS=$1; shift; fi
if [[ ! -f $WEIGHTS ]]; then
  echo "error: no weights at $WEIGHTS: run 'bash train.sh' first, or set WEIGHTS=weights/cross_scale_mae_base_pretrain.pth (see weights/README.md)" >&2
  exit 1
fi

$PYTHON "$SCRIPT" --finetune "$WEIGHTS" ${MODEL:+--model "$MODEL"} --input_size "$INPUT_SIZE" \
  --epochs "$EPOCHS" --warmup_epochs "$WARMUP_EPOCHS" --batch_size "$BATCH_SIZE" --blr "$BLR" \
  --train_path "$TRAIN_PATH" --test_path "$TEST_PATH" --output_dir "$OUTPUT_DIR" --num_workers "$NUM_WORKERS" "$@"
