#!/usr/bin/env bash
# Multi-scale kNN evaluation of frozen encoders (top-1 at 12.5 / 25 / 50 / 100 % of the input size).
#
#   bash knn.sh                                     # random init vs the train.sh checkpoint on the embedded sample
#   DATA=sentinel2_ms bash knn.sh                   # the same on the 13-band sample (output/pretrain_tiny_ms)
#   CHECKPOINTS="none weights/cross_scale_mae_base_pretrain.pth" bash knn.sh --pool mean
#   bash knn.sh weights/cross_scale_mae_large_pretrain.pth output/pretrain_tiny/checkpoint-last.pth   # positional checkpoints
#   bash knn.sh --checkpoints none weights/mine.pth  # the flag replaces CHECKPOINTS and positional checkpoints
#
# Real runs: TRAIN_PATH / TEST_PATH of a labelled CSV or ImageFolder (RESISC45, UC Merced, WHU-RS19, EuroSAT-RGB);
# TEST_PATH=split evaluates a seeded 20 % of TRAIN_PATH (one of the two is needed: the embedded sample's val.csv
# goes only with its train.csv). Extra flags pass through and win over the variables
# (--scale_mode native, --pool mean, ...; precedence: tools/launcher_lib.sh). train_distributed.sh runs this
# script under torchrun (LAUNCHER=knn.sh).
set -euo pipefail
export LAUNCHER_CALLER_DIR=${LAUNCHER_CALLER_DIR:-$PWD}  # the user's relative paths start here (tools/launcher_lib.sh)
cd "$(dirname "$0")"
source tools/launcher_lib.sh
launcher_help knn.sh main_knn.py "$@"

select_data                              # DATA: sentinel2_rgb (default) or sentinel2_ms (tools/launcher_lib.sh)
setvar CHECKPOINTS "none output/pretrain_tiny$DATA_SUFFIX/checkpoint-last.pth"   # space-separated; 'none' is random initialisation
setdata TRAIN_PATH "data/$DATA/train.csv"
setvar TEST_PATH ""                      # empty: the sample's val.csv for its train.csv, else give it (or 'split')
setdata OUTPUT_DIR "output/knn$DATA_SUFFIX"
setvar BATCH_SIZE 64
setvar NUM_WORKERS 2
PYTHON=${PYTHON:-python}
LAUNCH=${LAUNCH:-$PYTHON}               # train_distributed.sh sets this to torchrun

CHECKPOINTS_FROM=CHECKPOINTS
is_explicit CHECKPOINTS || CHECKPOINTS_FROM=
read -ra CHECKPOINT_LIST <<<"$CHECKPOINTS"
# positional checkpoints: <checkpoint>... [flags]
if [[ $# -ge 1 && $1 != -* ]]; then
  CHECKPOINT_LIST=()
  while [[ $# -ge 1 && $1 != -* ]]; do CHECKPOINT_LIST+=("$(from_caller checkpoints "$1")"); shift; done
  mark_explicit CHECKPOINTS
  CHECKPOINTS_FROM="the <checkpoint> arguments"
fi
USER_ARGS=("$@")
resolve_user_args  # their paths absolute, from the folder of the call
set -- ${USER_ARGS[@]+"${USER_ARGS[@]}"}

# the checkpoints Python will read: --checkpoints on the command line (then the only list passed), else the above
if user_flag checkpoints many; then
  CHECKPOINT_LIST=(${FLAG_VALUES[@]+"${FLAG_VALUES[@]}"})
  CHECKPOINTS_FROM=--checkpoints
elif launcher_value CHECKPOINTS; then
  PY_ARGS+=(--checkpoints "${CHECKPOINT_LIST[@]}")
else
  CHECKPOINT_LIST=()
fi
for checkpoint in ${CHECKPOINT_LIST[@]+"${CHECKPOINT_LIST[@]}"}; do
  if [[ $checkpoint != none && ! -f $checkpoint ]]; then
    if [[ -z $CHECKPOINTS_FROM ]]; then
      die "no checkpoint at $(absolute "$checkpoint"): run '$TRAIN_SH' first, or give --checkpoints PATH... / set CHECKPOINTS (published weights: weights/README.md)"
    fi
    die "no checkpoint at $(absolute "$checkpoint") (from $CHECKPOINTS_FROM)"
  fi
done

pass_var train_path TRAIN_PATH
if [[ -n $TEST_PATH ]]; then pass_var test_path TEST_PATH; fi
pass_var output_dir OUTPUT_DIR
pass_var batch_size BATCH_SIZE
pass_var num_workers NUM_WORKERS
pass_bands

# shellcheck disable=SC2086  # LAUNCH is a command line (python, or torchrun and its flags); exec: signals reach it
exec $LAUNCH main_knn.py "${PY_ARGS[@]}" "$@"
