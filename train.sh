#!/usr/bin/env bash
# Pretrain Cross-Scale MAE on one device: the GPU if there is one, else the CPU.
#
#   bash train.sh                                  # tiny paper model, embedded Sentinel-2 sample, < 3 min on 2 CPU cores
#   bash train.sh --epochs 1 --output_dir X        # extra flags pass through to main_pretrain.py
#   bash train.sh mae_vit_base_MsLdCeCd scaled_dot_product mse --epochs 400   # upstream's form: <model> <attention> <loss>
#
# For the paper's run, set the variables below (or export them) to:
#   MODEL=cross_scale_mae_vit_base INPUT_SIZE=128 PATCH_SIZE=16 EPOCHS=400 WARMUP_EPOCHS=40 BATCH_SIZE=512
#   BLR=5e-5 TRAIN_PATH=../fmow-rgb-preproc/train_128.csv OUTPUT_DIR=output/cross_scale_mae_base SAVE_EVERY=25 PLOT_EVERY=25
# (make train_128.csv with tools/preprocess.py). train_distributed.sh runs this script under torchrun.
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-cross_scale_mae_vit_tiny}
INPUT_SIZE=${INPUT_SIZE:-128}
PATCH_SIZE=${PATCH_SIZE:-16}
EPOCHS=${EPOCHS:-40}
WARMUP_EPOCHS=${WARMUP_EPOCHS:-4}
BATCH_SIZE=${BATCH_SIZE:-32}           # per device
BLR=${BLR:-1e-3}                       # the paper's 5e-5 is for batch 4096 and 400 epochs; a short tiny run needs more
TRAIN_PATH=${TRAIN_PATH:-data/sentinel2_rgb/train.csv}
OUTPUT_DIR=${OUTPUT_DIR:-output/pretrain_tiny}
NUM_WORKERS=${NUM_WORKERS:-2}
SAVE_EVERY=${SAVE_EVERY:-10}
PLOT_EVERY=${PLOT_EVERY:-5}
PYTHON=${PYTHON:-python}
LAUNCH=${LAUNCH:-$PYTHON}              # train_distributed.sh sets this to torchrun

# upstream's positional form: <model> <attention> <loss> [flags]
UPSTREAM=()
if [[ $# -ge 1 && $1 != -* ]]; then
  MODEL=$1
  [[ $# -ge 2 && $2 != -* ]] && UPSTREAM+=(--attn_name "$2")
  [[ $# -ge 3 && $3 != -* ]] && UPSTREAM+=(--loss "$3")
  shift $((1 + ${#UPSTREAM[@]} / 2))
fi

$LAUNCH main_pretrain.py \
  --model "$MODEL" --input_size "$INPUT_SIZE" --patch_size "$PATCH_SIZE" \
  --epochs "$EPOCHS" --warmup_epochs "$WARMUP_EPOCHS" --batch_size "$BATCH_SIZE" --blr "$BLR" \
  --train_path "$TRAIN_PATH" --output_dir "$OUTPUT_DIR" --num_workers "$NUM_WORKERS" \
  --save_every "$SAVE_EVERY" --plot_every "$PLOT_EVERY" \
  ${UPSTREAM[@]+"${UPSTREAM[@]}"} "$@"
