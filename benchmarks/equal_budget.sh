#!/usr/bin/env bash
# The paper's central claim at the quick start's budget: Cross-Scale MAE against the two-scale, reconstruction-only
# ablation (mae_vit_tiny_MsLd) and plain MAE (mae_vit_tiny), SEEDS pretraining seeds each with train.sh's recipe (tiny,
# 64 px, patch 8, 60 epochs, --norm_pix_loss, --blr 1e-2), one run at a time, then evaluated together by
# tools/sample_eval.py (kNN, linear probe and multi-scale kNN under 5-fold spatial cross-validation over the 225 tiles,
# 95 % intervals from a bootstrap over location blocks and seeds, paired gains between every two models).
#
#   bash benchmarks/equal_budget.sh                  # 3 models x 5 seeds into output/budget/; table in output/budget/report/
#   SEEDS="0 1 2" bash benchmarks/equal_budget.sh     # fewer seeds
#   bash benchmarks/equal_budget.sh --num_workers 0  # extra flags go to every train.sh run
#
# A finished run is not trained again (--resume auto finds its last checkpoint); a stopped one continues. Each run
# takes about 160 s on a 2-core AVX512-BF16 CPU and 4-10 min on a 2-core AVX2-only one (docs/results.md).
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${MODELS:-"cross_scale_mae_vit_tiny mae_vit_tiny_MsLd mae_vit_tiny"}
SEEDS=${SEEDS:-"0 1 2 3 4"}
OUT=${OUT:-output/budget}
PYTHON=${PYTHON:-python}
checkpoints=()
for seed in $SEEDS; do
  for model in $MODELS; do
    run=$OUT/${model}_seed$seed
    bash train.sh --model "$model" --seed "$seed" --output_dir "$run" --resume auto "$@"
    checkpoints+=("$run/checkpoint-last.pth")
  done
done
$PYTHON tools/sample_eval.py "${checkpoints[@]}" --output_dir "$OUT/report"
