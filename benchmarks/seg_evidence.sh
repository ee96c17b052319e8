#!/usr/bin/env bash
# The README's segmentation evidence on the embedded sample: segment.sh from random initialisation, from train.sh's
# Cross-Scale MAE checkpoint and from a plain-MAE checkpoint pretrained with the same budget (train.sh with
# MODEL=mae_vit_tiny, every other variable equal), each fine-tuned and on the frozen encoder, and the per-pixel
# logistic baseline (tools/seg_baseline.py); mIoU per scale with 95 % block-bootstrap intervals and paired gains
# over random init, collected by benchmarks/seg_evidence_table.py into $OUT/seg_evidence.md.
#
#   bash benchmarks/seg_evidence.sh        # 6 segment.sh runs (~2.5 min each on 2 free cores) + a missing checkpoint:
#                                          # train.sh's ~160 s each (README quick start)
#   OUT=output/seg_evidence_smoke SEG_ARGS="--epochs 1" PRETRAIN_ARGS="--epochs 1" \
#     CSMAE=output/smoke_csmae/checkpoint-last.pth MAE=output/smoke_mae/checkpoint-last.pth bash benchmarks/seg_evidence.sh
#
# Variables: OUT (one sub-folder per run; a run whose seg_results.csv exists is not repeated), CSMAE / MAE (the
# checkpoints; made with train.sh when missing), SEG_ARGS (extra flags of every segment.sh run), PRETRAIN_ARGS
# (extra flags of train.sh when it has to pretrain), SCALES (segment.sh's default).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-output/seg_evidence}
CSMAE=${CSMAE:-output/pretrain_tiny/checkpoint-last.pth}
MAE=${MAE:-output/pretrain_mae_tiny/checkpoint-last.pth}
SCALES=${SCALES:-0.125 0.25 0.5 1.0}
PYTHON=${PYTHON:-python}
read -r -a SEG <<< "${SEG_ARGS:-}"
read -r -a PRE <<< "${PRETRAIN_ARGS:-}"
read -r -a SCALE_LIST <<< "$SCALES"

pretrain() {  # pretrain MODEL CHECKPOINT: train.sh with its own budget unless CHECKPOINT exists
  # a finished train.sh run has written its timm export beside the checkpoint (an interrupted one has not)
  if [[ -f $2 && -f $(dirname "$2")/encoder.pth ]]; then echo "== $1: using $2"; return; fi
  echo "== $1: pretraining into $(dirname "$2")"
  MODEL=$1 OUTPUT_DIR=$(dirname "$2") SAMPLE_EVAL=0 bash train.sh "${PRE[@]}"
}

segment() {  # segment NAME FLAGS...: one segment.sh run into $OUT/NAME
  local name=$1
  shift
  if [[ -f $OUT/$name/seg_results.csv ]]; then echo "== $name: done before ($OUT/$name)"; return; fi
  echo "== $name"
  OUTPUT_DIR=$OUT/$name SCALES=$SCALES bash segment.sh "$@" "${SEG[@]}"
}

pretrain cross_scale_mae_vit_tiny "$CSMAE"
pretrain mae_vit_tiny "$MAE"

if [[ -f $OUT/logistic/seg_results.csv ]]; then
  echo "== logistic: done before ($OUT/logistic)"
else
  echo "== logistic"
  $PYTHON tools/seg_baseline.py --scales "${SCALE_LIST[@]}" --num_workers 0 --output_dir "$OUT/logistic"
fi
# random init: the architecture train.sh pretrains (ViT-tiny, patch 8), at segment.sh's crop
FROM_SCRATCH=(--finetune "" --model vit_tiny_patch16 --patch_size 8)
segment random_finetuned "${FROM_SCRATCH[@]}"
segment random_frozen "${FROM_SCRATCH[@]}" --freeze_encoder
segment mae_finetuned --finetune "$MAE"
segment mae_frozen --finetune "$MAE" --freeze_encoder
segment csmae_finetuned --finetune "$CSMAE"
segment csmae_frozen --finetune "$CSMAE" --freeze_encoder

$PYTHON benchmarks/seg_evidence_table.py "$OUT"
