#!/usr/bin/env bash
# Linear probing of a frozen pretrained encoder (BatchNorm + linear head, LARS). Same arguments and variables as finetune.sh:
#
#   bash linprobe.sh                                   # WEIGHTS from train.sh, embedded sample (times: README quick start)
#   DATA=sentinel2_ms bash linprobe.sh                 # the 13-band sample and DATA=sentinel2_ms bash train.sh's weights
#   bash linprobe.sh vit_base_patch16 weights/cross_scale_mae_base_pretrain.pth --global_pool
#   bash linprobe.sh --finetune weights/mine.pth --epochs 10    # flags win over the variables
#
# Real runs (upstream's linprobe.sh): INPUT_SIZE=128 EPOCHS=50 WARMUP_EPOCHS=10 BATCH_SIZE=1024 BLR=0.1
#   EXTRA="" (augmented, as upstream) with the fMoW-RGB TRAIN_PATH / TEST_PATH.
# By default this trains on centre crops (--no_aug), so the frozen features are computed once; EXTRA="" augments instead
# (with --config and no EXTRA, the file decides). train_distributed.sh runs it under torchrun (LAUNCHER=linprobe.sh).
# LARS follows the linear scaling rule lr = BLR x batch / 256; at the small batch here it needs a larger BLR.
set -euo pipefail
export LAUNCHER_CALLER_DIR=${LAUNCHER_CALLER_DIR:-$PWD}  # the user's relative paths start here (tools/launcher_lib.sh)
cd "$(dirname "$0")"
source tools/launcher_lib.sh
launcher_help linprobe.sh main_linprobe.py "$@"

# finetune.sh's defaults for a linear probe; EPOCHS, BLR, ... in the environment and flags still win
export SCRIPT=main_linprobe.py DEFAULT_EPOCHS=90 DEFAULT_WARMUP_EPOCHS=5 DEFAULT_BLR=10 DEFAULT_OUTPUT_DIR=output/linprobe_tiny
USER_ARGS=("$@")
if [[ -z ${EXTRA+x} ]]; then
  EXTRA=--no_aug
  user_flag config && EXTRA=
fi
# shellcheck disable=SC2086  # EXTRA is a list of flags
exec bash finetune.sh "$@" $EXTRA
