#!/usr/bin/env bash
# Pretrain Cross-Scale MAE on one device: the GPU if there is one, else the CPU.
#
#   bash train.sh                                  # tiny paper model on the embedded Sentinel-2 sample, then the
#                                                  # pretrained-vs-random-init evaluation (times: README quick start)
#   bash train.sh --epochs 1 --output_dir X        # extra flags pass through to main_pretrain.py, and win over
#                                                  # the variables below (precedence: tools/launcher_lib.sh)
#   bash train.sh mae_vit_base_MsLdCeCd scaled_dot_product mse --epochs 400   # upstream's form: <model> <attention> <loss>
#   DATA=sentinel2_ms bash train.sh                # the same on the 13-band sample (data/sentinel2_ms, 64 px at 20 m),
#                                                  # into output/pretrain_tiny_ms (DATA: tools/launcher_lib.sh)
#
# For the paper's run, set the variables below (or export them) to:
#   MODEL=cross_scale_mae_vit_base INPUT_SIZE=128 PATCH_SIZE=16 EPOCHS=400 WARMUP_EPOCHS=40 BATCH_SIZE=512
#   BLR=5e-5 TRAIN_PATH=../fmow-rgb-preproc/train_128.csv OUTPUT_DIR=output/cross_scale_mae_base SAVE_EVERY=25 PLOT_EVERY=25
# (make train_128.csv with tools/preprocess.py). train_distributed.sh runs this script under torchrun.
set -euo pipefail
export LAUNCHER_CALLER_DIR=${LAUNCHER_CALLER_DIR:-$PWD}  # the user's relative paths start here (tools/launcher_lib.sh)
cd "$(dirname "$0")"

source tools/launcher_lib.sh
launcher_help train.sh main_pretrain.py "$@"

select_data                            # DATA: sentinel2_rgb (default) or sentinel2_ms
setvar MODEL cross_scale_mae_vit_tiny
setvar INPUT_SIZE 64                   # the quick start: 64 px tiles, patch 8 (64 patches), as measured in the README
setvar PATCH_SIZE 8
setvar EPOCHS 60
setvar WARMUP_EPOCHS 5
setvar BATCH_SIZE 32                   # per device
setvar BLR 1e-2                        # the paper's 5e-5 is for batch 4096 and 400 epochs; a short tiny run needs more
setvar NORM_PIX_LOSS 1                 # 1: reconstruct per-patch standardised pixels (--norm_pix_loss); 0: raw pixels
setvar SAMPLE_EVAL 1                   # 1: on the embedded sample, end with tools/sample_eval.py (pretrained vs random init)
setdata TRAIN_PATH "data/$DATA/train.csv"
setdata OUTPUT_DIR "output/pretrain_tiny$DATA_SUFFIX"
setvar NUM_WORKERS 2
setvar SAVE_EVERY 10
setvar PLOT_EVERY 20
PYTHON=${PYTHON:-python}
LAUNCH=${LAUNCH:-$PYTHON}              # train_distributed.sh sets this to torchrun

# upstream's positional form: <model> <attention> <loss> [flags]
ATTN_NAME= LOSS=
if [[ $# -ge 1 && $1 != -* ]]; then MODEL=$1; mark_explicit MODEL; shift; fi
if [[ $# -ge 1 && $1 != -* ]]; then ATTN_NAME=$1; mark_explicit ATTN_NAME; shift; fi
if [[ $# -ge 1 && $1 != -* ]]; then LOSS=$1; mark_explicit LOSS; shift; fi
USER_ARGS=("$@")
resolve_user_args  # their paths absolute, from the folder of the call
set -- ${USER_ARGS[@]+"${USER_ARGS[@]}"}

pass_var model MODEL
pass_var input_size INPUT_SIZE
pass_var patch_size PATCH_SIZE
pass_var epochs EPOCHS
pass_var warmup_epochs WARMUP_EPOCHS
pass_var batch_size BATCH_SIZE
pass_var blr BLR
pass_var train_path TRAIN_PATH
pass_var output_dir OUTPUT_DIR
pass_var num_workers NUM_WORKERS
pass_var save_every SAVE_EVERY
pass_var plot_every PLOT_EVERY
pass_bands
pass_rgb_bands
if [[ -n ${ATTN_NAME:-} ]]; then pass_var attn_name ATTN_NAME; fi
if [[ -n ${LOSS:-} ]]; then pass_var loss LOSS; fi
if [[ $NORM_PIX_LOSS == 1 ]] && launcher_value NORM_PIX_LOSS && ! user_flag norm_pix_loss; then PY_ARGS+=(--norm_pix_loss); fi

# The quick start (the embedded sample, one process, no --config) ends with the evidence that pretraining helped,
# for a run that finished its schedule only: a stopped run (Ctrl-C, SIGTERM) exits with the trainer's status
# (128 + the signal's number) and says how to continue; tools/sample_eval.py refuses a checkpoint of an unfinished
# schedule anyway.
if [[ $SAMPLE_EVAL == 1 && $TRAIN_PATH == "data/$DATA/train.csv" && $LAUNCH == "$PYTHON" ]] \
   && ! user_flag config && ! user_flag train_path && ! user_flag output_dir; then
  status=0
  $LAUNCH main_pretrain.py "${PY_ARGS[@]}" "$@" || status=$?
  if ((status != 0)); then
    if ((status > 128)); then
      echo "train.sh: training stopped (status $status), no evaluation of an unfinished run; continue it with:" \
           "$TRAIN_SH $* --resume auto" >&2
    fi
    exit "$status"
  fi
  exec $PYTHON tools/sample_eval.py "$OUTPUT_DIR/checkpoint-last.pth" --sample "data/$DATA"
fi
# shellcheck disable=SC2086  # LAUNCH is a command line (python, or torchrun and its flags); exec: signals reach it
exec $LAUNCH main_pretrain.py "${PY_ARGS[@]}" "$@"
