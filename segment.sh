#!/usr/bin/env bash
# Semantic segmentation with a pretrained encoder: UperNet on a 4-level ViT pyramid (GPU if there is one, else CPU).
#
#   bash segment.sh                                    # WEIGHTS from train.sh, embedded Sentinel-2 masks (times: README quick start)
#   bash segment.sh --freeze_encoder                   # PANGAEA's frozen-encoder protocol
#   bash segment.sh --head linear --freeze_encoder     # per-patch linear probe
#   DATA=sentinel2_ms bash segment.sh                  # the 13-band sample's masks, from DATA=sentinel2_ms bash train.sh
#   WEIGHTS=weights/cross_scale_mae_base_pretrain.pth bash segment.sh --epochs 5
#
# ISPRS Potsdam / Vaihingen (512 px crops, batch 8 per GPU, mIoU / mF1 over the five classes without clutter;
# tiles cut beforehand into images/ + masks/ folders, labels as the RGB colour images ISPRS ships):
#   WEIGHTS=weights/cross_scale_mae_base_pretrain.pth INPUT_SIZE=512 BATCH_SIZE=8 EPOCHS=50 WARMUP_EPOCHS=2 BLR=1.6e-3
#   TRAIN_PATH=../potsdam/train TEST_PATH=../potsdam/val PALETTE=isprs OUTPUT_DIR=output/segment_potsdam
#   bash segment.sh --exclude_classes 5 --scales 0.125 0.25 0.5 1.0
# ISPRS protocol (docs/segmentation.md, "ISPRS protocol"): evaluate on the eroded-boundary reference (Potsdam 5_Labels_all_noBoundary,
# Vaihingen ..._eroded_COMPLETE: black = boundary, ignored by --palette isprs) or add --eval_ignore_boundary 3 to the
# full reference; without --exclude_classes 5 the means include clutter (mmsegmentation's mIoU). Vaihingen's IRRG
# tiles go in as given: near-infrared in the R slot of RGB-pretrained weights. Intervals: --block_pattern
# '^(\d+_\d+)_' makes each ISPRS tile one location block for mmsegmentation-style crop names.
# LoveDA: PALETTE=none and --class_names background building road water barren forest agriculture --reduce_zero_label.
# Extra flags pass through to Python and win over the variables (precedence: tools/launcher_lib.sh); --finetune
# replaces WEIGHTS (--finetune "" with --model NAME: random initialisation). train_distributed.sh runs it under
# torchrun with LAUNCHER=segment.sh.
set -euo pipefail
export LAUNCHER_CALLER_DIR=${LAUNCHER_CALLER_DIR:-$PWD}  # the user's relative paths start here (tools/launcher_lib.sh)
cd "$(dirname "$0")"
source tools/launcher_lib.sh
launcher_help segment.sh "${SCRIPT:-main_segment.py}" "$@"

SCRIPT=${SCRIPT:-main_segment.py}
select_data                             # DATA: sentinel2_rgb (default) or sentinel2_ms (tools/launcher_lib.sh)
setvar WEIGHTS "output/pretrain_tiny$DATA_SUFFIX/checkpoint-last.pth"
setvar MODEL ""                         # empty: the architecture of WEIGHTS
setdata INPUT_SIZE "$TILE_SIZE"         # crop side: the sample's tiles, 128 px (13-band: 64) (Potsdam / Vaihingen: 512)
setvar EPOCHS 8
setvar WARMUP_EPOCHS 1
setvar BATCH_SIZE 16                    # per device (Potsdam / Vaihingen: 8)
setvar BLR 1.6e-3                       # lr 1e-4 at batch 16 (MAE / BEiT UperNet recipe)
setdata TRAIN_PATH "data/$DATA/seg_train.csv"
setvar TEST_PATH ""                     # empty: the sample's seg_val.csv for its seg_train.csv, else give it
setdata PALETTE "data/$DATA/seg_palette.json"   # isprs for Potsdam / Vaihingen
setvar SCALES "0.125 0.25 0.5 1.0"
setvar DECODER_CHANNELS 128             # the literature: 512 (ViT-B) or 768
setdata OUTPUT_DIR "output/segment_tiny$DATA_SUFFIX"
setvar NUM_WORKERS 2
PYTHON=${PYTHON:-python}
LAUNCH=${LAUNCH:-$PYTHON}               # train_distributed.sh sets this to torchrun

WEIGHTS_FROM=WEIGHTS
is_explicit WEIGHTS || WEIGHTS_FROM=
USER_ARGS=("$@")
resolve_user_args  # their paths absolute, from the folder of the call
set -- ${USER_ARGS[@]+"${USER_ARGS[@]}"}
pass_weights  # --finetune on the command line, else WEIGHTS (unless --config decides); checked

pass_training_vars
pass_var palette PALETTE
pass_var decoder_channels DECODER_CHANNELS
pass_rgb_bands
if ! user_flag scales && launcher_value SCALES; then
  read -r -a SCALE_LIST <<< "$SCALES"
  PY_ARGS+=(--scales "${SCALE_LIST[@]}")
fi

# shellcheck disable=SC2086  # LAUNCH is a command line (python, or torchrun and its flags); exec: signals reach it
exec $LAUNCH "$SCRIPT" "${PY_ARGS[@]}" "$@"
