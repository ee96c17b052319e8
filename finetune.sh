#!/usr/bin/env bash
# Fine-tune a pretrained encoder for classification (GPU if there is one, else CPU).
#
#   bash finetune.sh                                   # WEIGHTS from train.sh, embedded Sentinel-2 sample (times: README quick start)
#   WEIGHTS=weights/cross_scale_mae_base_pretrain.pth bash finetune.sh --epochs 5
#   DATA=sentinel2_ms bash finetune.sh               # the 13-band sample and DATA=sentinel2_ms bash train.sh's weights
#   bash finetune.sh --finetune weights/mine.pth --epochs 1     # flags win over the variables below
#   bash finetune.sh vit_large_patch16 weights/cross_scale_mae_large_pretrain.pth --nb_classes 62   # upstream's <model> [weights] form
#
# Real runs (upstream's fMoW-RGB setting): WEIGHTS=weights/cross_scale_mae_base_pretrain.pth INPUT_SIZE=128
#   EPOCHS=100 WARMUP_EPOCHS=5 BATCH_SIZE=512 BLR=1e-3 TRAIN_PATH=../fmow-rgb-preproc/train_128.csv
#   TEST_PATH=../fmow-rgb-preproc/val_128.csv OUTPUT_DIR=output/finetune_base
# Your own TRAIN_PATH needs its evaluation set: TEST_PATH=PATH, or TEST_PATH=split (a seeded 20 % of TRAIN_PATH held
# out; docs/own_data.md). Relative paths you give are relative to the folder you call this from.
# Extra flags pass through to Python and win over the variables (precedence: tools/launcher_lib.sh); --finetune
# replaces WEIGHTS (--finetune "" with --model NAME: random initialisation). train_distributed.sh runs this script
# under torchrun (LAUNCHER=finetune.sh). linprobe.sh runs it with SCRIPT=main_linprobe.py and its own defaults
# (DEFAULT_EPOCHS, DEFAULT_WARMUP_EPOCHS, DEFAULT_BLR, DEFAULT_OUTPUT_DIR).
set -euo pipefail
export LAUNCHER_CALLER_DIR=${LAUNCHER_CALLER_DIR:-$PWD}  # the user's relative paths start here (tools/launcher_lib.sh)
cd "$(dirname "$0")"
source tools/launcher_lib.sh
launcher_help finetune.sh "${SCRIPT:-main_finetune.py}" "$@"

SCRIPT=${SCRIPT:-main_finetune.py}
select_data                             # DATA: sentinel2_rgb (default) or sentinel2_ms (tools/launcher_lib.sh)
setvar WEIGHTS "output/pretrain_tiny$DATA_SUFFIX/checkpoint-last.pth"
setvar MODEL ""                         # empty: the architecture of WEIGHTS
setvar INPUT_SIZE 64                    # train.sh pretrains at 64 px
setvar EPOCHS "${DEFAULT_EPOCHS:-30}"
setvar WARMUP_EPOCHS "${DEFAULT_WARMUP_EPOCHS:-3}"
setvar BATCH_SIZE 32                    # per device
setvar BLR "${DEFAULT_BLR:-1e-3}"
setdata TRAIN_PATH "data/$DATA/train.csv"
setvar TEST_PATH ""                     # empty: the sample's val.csv for its train.csv, else give it (or 'split')
setdata OUTPUT_DIR "${DEFAULT_OUTPUT_DIR:-output/finetune_tiny}$DATA_SUFFIX"
setvar NUM_WORKERS 2
PYTHON=${PYTHON:-python}
LAUNCH=${LAUNCH:-$PYTHON}               # train_distributed.sh sets this to torchrun

WEIGHTS_FROM=WEIGHTS
is_explicit WEIGHTS || WEIGHTS_FROM=
# upstream's positional form: <model> [weights] [flags]
if [[ $# -ge 1 && $1 != -* ]]; then MODEL=$1; mark_explicit MODEL; shift; fi
if [[ $# -ge 1 && $1 != -* ]]; then
  WEIGHTS=$(from_caller finetune "$1"); mark_explicit WEIGHTS; WEIGHTS_FROM="the <weights> argument"; shift
fi
USER_ARGS=("$@")
resolve_user_args  # their paths absolute, from the folder of the call
set -- ${USER_ARGS[@]+"${USER_ARGS[@]}"}

pass_weights  # --finetune on the command line, else WEIGHTS (unless --config decides); checked

pass_training_vars

# shellcheck disable=SC2086  # LAUNCH is a command line (python, or torchrun and its flags); exec: signals reach it
exec $LAUNCH "$SCRIPT" "${PY_ARGS[@]}" "$@"
