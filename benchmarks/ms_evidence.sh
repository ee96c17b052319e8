#!/usr/bin/env bash
# The README's multispectral evidence on the embedded 13-band sample (data/sentinel2_ms): kNN / linear-probe top-1
# (tools/sample_eval.py: 5-fold spatial CV, block bootstrap, each checkpoint against random init of its band set) of
#   rgb      RGB-only pretraining (bands 3 2 1 of the tiles), train.sh's budget (60 epochs)
#   all      all-band pretraining (13 bands), the same budget
#   adapted  RGB pretraining for half the budget (30 epochs), its weights adapted to 13 bands (--init, --rgb_bands
#            3 2 1: RGB filters copied, the other bands' zero) and pretrained on all bands for the other half
# Tables: $OUT/rgb/sample_eval.md (3 bands) and $OUT/all/sample_eval.md (13 bands: all and adapted, one random init).
#
#   bash benchmarks/ms_evidence.sh          # 4 train.sh runs (~2.5 + 2.5 + 1.3 + 1.3 min on 2 free cores) + evaluation
#   OUT=output/ms_smoke PRETRAIN_ARGS="--epochs 2" bash benchmarks/ms_evidence.sh   # a smoke run (numbers mean nothing)
#
# Variables: OUT (a finished run, one with encoder.pth, is not repeated), PRETRAIN_ARGS (extra flags of every
# train.sh run; the adapted run's halves are --epochs 30 each unless HALF is set).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-output/ms_evidence}
HALF=${HALF:-30}
PYTHON=${PYTHON:-python}
read -r -a PRE <<< "${PRETRAIN_ARGS:-}"

pretrain() {  # pretrain NAME FLAGS...: train.sh on the 13-band sample into $OUT/NAME, unless done before
  local name=$1
  shift
  # encoder.pth is written when a run ends (checkpoint-last.pth after every epoch: an interrupted run has one)
  if [[ -f $OUT/$name/encoder.pth ]]; then echo "== $name: done before ($OUT/$name)"; return; fi
  echo "== $name"
  DATA=sentinel2_ms SAMPLE_EVAL=0 OUTPUT_DIR=$OUT/$name bash train.sh "$@" "${PRE[@]}"
}

pretrain rgb --in_chans 3 --bands 3 2 1 --rgb_bands 0 1 2
pretrain all
pretrain rgb_half --in_chans 3 --bands 3 2 1 --rgb_bands 0 1 2 --epochs "$HALF"
pretrain adapted --init "$OUT/rgb_half/checkpoint-last.pth" --rgb_bands 3 2 1 --epochs "$HALF"

# labelled: the all-band and adapted runs are one model name (cross_scale_mae_vit_tiny), not two seeds of it
$PYTHON tools/sample_eval.py "RGB only=$OUT/rgb/checkpoint-last.pth" --sample data/sentinel2_ms --bands 3 2 1
$PYTHON tools/sample_eval.py "all bands=$OUT/all/checkpoint-last.pth" "RGB adapted=$OUT/adapted/checkpoint-last.pth" \
  --sample data/sentinel2_ms
