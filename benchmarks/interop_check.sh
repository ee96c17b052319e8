#!/usr/bin/env bash
# Do torchgeo and TerraTorch load this project's exports with every tensor, and fine-tune them? (not in CI)
#
#   bash benchmarks/interop_check.sh                  # builds two environments once (~10 GB, slow), then checks
#   ENVS=/path/to/envs OUT=/tmp/interop bash benchmarks/interop_check.sh
#
# torchgeo >= 0.9 and TerraTorch need Python >= 3.12, and TerraTorch 1.2.13 pins torchgeo < 0.10: two environments,
# made with PYTHON312 (default: pyenv's 3.12.1) under ENVS (default .interop-envs, git-ignored):
#   torchgeo:   torchgeo==0.10.1  (with torch 2.14.1, torchvision 0.29.1, timm 1.0.29, as this project)
#   terratorch: terratorch==1.2.13 (which brings torchgeo 0.9.0)
# This project's environment (PYTHON, default python) writes the exports and reference features to OUT
# (benchmarks/interop_check.py prepare); each environment then runs its checks. The summary goes to
# OUT/interop_check.log; docs/weights_elsewhere.md shows the last run's. Exit status: the number of failed checks.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
PYTHON312=${PYTHON312:-$HOME/.pyenv/versions/3.12.1/bin/python}
ENVS=${ENVS:-.interop-envs}
OUT=${OUT:-output/interop_check}
PINS=(torch==2.14.1 torchvision==0.29.1 timm==1.0.29 safetensors)

make_env() {  # make_env NAME PACKAGE...: a Python 3.12 venv with PACKAGES (once; its pip freeze beside it)
  local env=$ENVS/$1
  shift
  if [[ -x $env/bin/python && -f $env.freeze.txt ]]; then return 0; fi
  [[ -x $PYTHON312 ]] || { echo "error: no Python 3.12 at $PYTHON312 (set PYTHON312)" >&2; exit 1; }
  echo "== building $env ($*): this downloads several GB once"
  "$PYTHON312" -m venv "$env" && "$env/bin/pip" install -q --progress-bar off "${PINS[@]}" "$@" \
    && "$env/bin/pip" freeze > "$env.freeze.txt" || { echo "error: could not build $env" >&2; exit 1; }
}

make_env torchgeo torchgeo==0.10.1
make_env terratorch terratorch==1.2.13
mkdir -p "$OUT"
LOG=$OUT/interop_check.log
{
  echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(uname -sm), $(nproc) CPU cores"
  "$PYTHON" benchmarks/interop_check.py prepare "$OUT"
} 2>&1 | tee "$LOG"
[[ ${PIPESTATUS[0]} -eq 0 ]] || { echo "error: prepare failed" >&2; exit 1; }
failed=0
for tool in torchgeo terratorch; do
  # the checks' own lines (and tool versions) go to the log; everything else to OUT/TOOL.out
  "$ENVS/$tool/bin/python" benchmarks/interop_check.py "$tool" "$OUT" > "$OUT/$tool.out" 2>&1
  failed=$((failed + $?))
  grep -E "^(PASS|FAIL|torchgeo |terratorch )" "$OUT/$tool.out" | tee -a "$LOG"
done
echo "$failed check(s) failed" | tee -a "$LOG"
exit "$failed"
