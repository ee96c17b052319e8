#!/usr/bin/env bash
# Linear probing of a frozen pretrained encoder (BatchNorm + linear head, LARS). Same arguments as finetune.sh:
#
#   bash linprobe.sh                                   # WEIGHTS from train.sh, embedded sample, seconds on a CPU
#   bash linprobe.sh vit_base_patch16 weights/cross_scale_mae_base_pretrain.pth --global_pool
#
# Real runs (upstream's linprobe.sh): INPUT_SIZE=128 EPOCHS=50 WARMUP_EPOCHS=10 BATCH_SIZE=1024 BLR=0.1
#   EXTRA="" (augmented, as upstream) with the fMoW-RGB TRAIN_PATH / TEST_PATH.
# By default this trains on centre crops (--no_aug), so the frozen features are computed once; EXTRA="" augments instead.
# LARS follows the linear scaling rule lr = BLR x batch / 256; at the small batch here it needs a larger BLR.
set -euo pipefail
cd "$(dirname "$0")"

export SCRIPT=main_linprobe.py
export EPOCHS=${EPOCHS:-90}
export WARMUP_EPOCHS=${WARMUP_EPOCHS:-5}
export BLR=${BLR:-10}
export OUTPUT_DIR=${OUTPUT_DIR:-output/linprobe_tiny}
EXTRA=${EXTRA---no_aug}
exec bash finetune.sh "$@" $EXTRA
