#!/usr/bin/env bash
# One command per row of the paper's evaluation (benchmarks/paper_rows.yaml; docs/reproducing.md):
#
#   bash benchmarks/paper.sh --list                                   # the rows
#   bash benchmarks/paper.sh knn-resisc45 weights/cross_scale_mae_large_pretrain.pth
#   bash benchmarks/paper.sh finetune-fmow weights/cross_scale_mae_base_pretrain.pth --epochs 50   # flags win
#   bash benchmarks/paper.sh pretrain-vitb --dry_run                  # the command and its GPU-hours only
#   BENCHMARK_ROOT=/data/benchmarks bash benchmarks/paper.sh segment-potsdam WEIGHTS
#
# Data: tools/prepare_benchmark.py NAME --archive ... writes $BENCHMARK_ROOT/NAME (default data/benchmarks).
# Options and outputs: benchmarks/paper.py --help.
set -euo pipefail
PYTHON=${PYTHON:-python}
exec "$PYTHON" "$(dirname "$0")/paper.py" "$@"
