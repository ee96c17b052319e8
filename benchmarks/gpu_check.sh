#!/usr/bin/env bash
# One-GPU acceptance check (about 6 minutes on one H100): the CUDA-marked tests, the pretraining step of the paper
# model with and without --compile (MFU against the GPU's datasheet peak and against a matmul measured in the same
# run, speed-up over upstream execution), the fast CUDA paths (native bf16, flash SDPA at the encoder's and the
# decoder's attention shape, fused AdamW, pinned memory; benchmarks/cuda_paths.py) and the on-device packed-array
# data path, the real training loop (main_pretrain.py on a synthetic packed array: logged img/s against the bare
# step's), and a 1-process torchrun (NCCL) pretraining run, compiled, with --accum_iter 2 (DDP's no_sync), stopped by
# SIGTERM to its process group and resumed (eagerly: a compiled run's checkpoint must load there).
#
#   bash benchmarks/gpu_check.sh            # on a CUDA machine: the real check
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: every stage at toy size on the CPU (what CI runs)
#
# Without CUDA (torch.cuda.is_available() false) it says so and does the dry run. It prints the environment first
# (Python, torch / torchvision / timm / segmentation-models-pytorch versions, GPU, driver, clocks), then one summary
# table (stage, status, seconds, result), and exits non-zero when any stage failed; the log of a failed stage is
# printed. On a CUDA machine every stage runs with --device cuda and checks that it really ran on the GPU, and a
# CUDA-marked test that was skipped fails its stage (a skip there is a check that did not happen). The dry run runs
# the CUDA-marked tests on the CPU (CUDA_TESTS_ON_CPU=1: the tests' `cuda_device` fixture is then the CPU), so that
# the tests themselves are proven before a GPU meets them; only those that need CUDA's own API skip there. The dry
# run starts the 1-process job with torchrun's environment but without its agent (a 1-process gloo group).
#
# Results: summary.txt (environment + table + what one GPU cannot verify) and gpu_check_logs.tar.gz (every stage's
# log, no checkpoints or data) in GPU_CHECK_OUT, else $OUT (the lent machines' result folder), else a new temporary
# folder. Scratch files (synthetic data, checkpoints) go to a temporary folder removed at the end.
#
# Environment: PYTHON (default: python, or python3 where there is no python), GPU_CHECK_OUT, GPU_CHECK_STAGE_TIMEOUT
# (seconds per stage; default 240 on a GPU, 120 in the dry run), GPU_CHECK_IMAGES (images of the synthetic packed
# array of stage pretrain_loop; default 16384 on a GPU). segmentation-models-pytorch (UperNet) is not installed
# everywhere: without it the segmentation test skips, which fails stage pytest_cuda on a GPU; put it on PYTHONPATH
# (`pip install --no-deps --target DIR segmentation-models-pytorch==0.6.0`, DIR carried along) to check it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# anything but --dry-run is refused: a typo (--dryrun) ran the full check on a GPU, or a dry run was silently taken
if (( $# > 1 )) || [[ $# == 1 && "$1" != --dry-run ]]; then
  echo "error: unknown argument(s) $*; usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2
  exit 2
fi
# paths the caller gave are the caller's: resolved before the cd below (a relative OUT landed inside the repository)
absolute() { if [[ "$1" == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }
if [[ -z "${PYTHON:-}" ]]; then
  if command -v python > /dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
elif [[ "$PYTHON" == */* ]]; then
  PYTHON="$(absolute "$PYTHON")"
fi
RESULTS="${GPU_CHECK_OUT:-${OUT:-}}"
[[ -z "$RESULTS" ]] || RESULTS="$(absolute "$RESULTS")"
cd "$REPO"
# before any stage: a missing interpreter, or one without torch, read as "CUDA is not available" (a dry run on a GPU)
command -v "$PYTHON" > /dev/null 2>&1 || { echo "error: PYTHON=$PYTHON: no such interpreter (set PYTHON)" >&2; exit 1; }
"$PYTHON" -c 'import torch' 2> /dev/null \
  || { echo "error: PYTHON=$PYTHON cannot import torch (set PYTHON to the project's interpreter)" >&2; exit 1; }
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONUNBUFFERED=1

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
elif [[ "$("$PYTHON" -c 'import torch; print(torch.cuda.is_available())')" != "True" ]]; then
  echo "gpu_check: CUDA is not available on this machine; running every stage as a tiny CPU dry run"
  DRY_RUN=1
fi

[[ -n "$RESULTS" ]] || RESULTS="$(mktemp -d -t gpu_check.XXXXXX)"
# found now, not after minutes of stages (tee's "Permission denied" at the end, the logs gone with the scratch folder)
if ! mkdir -p "$RESULTS" 2> /dev/null || ! touch "$RESULTS/.gpu_check_probe" 2> /dev/null; then
  echo "error: results folder $RESULTS (GPU_CHECK_OUT / OUT) cannot be written" >&2
  exit 1
fi
rm -f "$RESULTS/.gpu_check_probe"
WORK="$(mktemp -d -t gpu_check_work.XXXXXX)"  # data and checkpoints: never copied into the results
trap 'rm -rf "$WORK"' EXIT
LOGS="$WORK/logs"
mkdir -p "$LOGS"

if (( DRY_RUN )); then
  DEVICE=cpu
  STAGE_TIMEOUT="${GPU_CHECK_STAGE_TIMEOUT:-120}"
  BENCH=(--model cross_scale_mae_vit_tiny --input_size 32 --patch_size 8 --steps 1 --warmup 0 --matmul_size 128
         --amp none --device cpu --compile --datasheet_device "NVIDIA H100 80GB HBM3")  # the GPU run's MFU path
  BATCHES=(4)
  PATHS=(--device cpu --batch_size 8 --input_size 32 --repeats 2)
  SYNTH=(--count "${GPU_CHECK_IMAGES:-32}" --size 32 --distinct 8)
  LOOP_BATCH=8
  LOOP=(--model cross_scale_mae_vit_tiny --input_size 32 --patch_size 8 --num_workers 1 --amp none
        --device cpu --log_every 1)
  TRAIN=(--model cross_scale_mae_vit_tiny --input_size 32 --patch_size 8 --batch_size 4 --num_workers 0
         --amp none --device cpu --blr 1e-3 --log_every 1 --accum_iter 2)
  TRAIN_DATA="$WORK/synthetic/train.json"  # stage pretrain_loop's array: 8 steps per epoch
  # what torchrun sets for a 1-process job, without its agent (a second interpreter's start-up): a 1-process gloo
  # group, DDP-wrapped; the GPU run launches torchrun itself
  LAUNCH=(env RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1
          MASTER_PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
          "$PYTHON")
  export TORCH_COMPILE_DISABLE=1  # compiling takes minutes on a CPU: the --compile paths run with TorchDynamo off
else
  DEVICE=cuda
  STAGE_TIMEOUT="${GPU_CHECK_STAGE_TIMEOUT:-240}"
  BENCH=(--model cross_scale_mae_vit_base --input_size 128 --steps 5 --warmup 2 --device cuda --compile)
  BATCHES=(512 384 256 128)  # the paper's per-GPU batch, or the largest below it that fits
  PATHS=(--device cuda --batch_size 512 --input_size 128)
  SYNTH=(--count "${GPU_CHECK_IMAGES:-16384}" --size 128)
  LOOP_BATCH=""  # the batch stage bench_pretrain found to fit: 512, the paper's, where it does
  LOOP=(--model cross_scale_mae_vit_base --input_size 128 --num_workers 4 --device cuda
        --log_every 4)
  TRAIN=(--model cross_scale_mae_vit_tiny --input_size 64 --patch_size 8 --batch_size 8 --num_workers 2
         --device cuda --blr 1e-3 --log_every 1 --accum_iter 2)
  TRAIN_DATA=data/sentinel2_rgb/train.csv  # JPEGs decoded by workers: the other input path; 22 steps per epoch
  LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1)
fi

environment() {
  "$PYTHON" - << 'PY'
import platform
from importlib.metadata import PackageNotFoundError, version

import torch

print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
pins = dict(line.strip().split("==") for line in open("requirements.txt") if "==" in line)
found = []
for name, pinned in pins.items():
    try:
        installed = version(name)
        found.append(f"{name} {installed}" + ("" if installed.split("+")[0] == pinned else f" (pinned {pinned})"))
    except PackageNotFoundError:
        found.append(f"{name} NOT INSTALLED")
print(", ".join(found))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(
        f"GPU {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}, "
        f"{torch.cuda.device_count()} visible, cuDNN {torch.backends.cudnn.version()}"
    )
else:
    print("GPU: none (CUDA not available)")
PY
  if command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu \
      --format=csv || true
  else
    echo "nvidia-smi: not found"
  fi
}
echo "gpu_check: environment"
environment 2>&1 | tee "$LOGS/environment.txt"
echo "gpu_check: results in $RESULTS"

# ------------------------------------------------------------------------------------------- stages
# Each stage runs in a subshell with `set -e`, its output in $LOGS/<stage>.log; it writes a one-line
# result to $LOGS/<stage>.result and fails (non-zero) on any error or missing evidence.

fail() { echo "CHECK FAILED: $*" >&2; echo "$*" > "$LOGS/$STAGE.result"; exit 1; }
result() { echo "$*" > "$LOGS/$STAGE.result"; }
py() { timeout --signal=TERM --kill-after=15 "$STAGE_TIMEOUT" "$PYTHON" "$@"; }
count() { grep -Eo "[0-9]+ $1" <<< "$2" | grep -Eo '[0-9]+' || echo 0; }

stage_pytest_cuda() {
  local files rc=0
  mapfile -t files < <(grep -rlE --include='test_*.py' '^@pytest\.mark\.cuda' tests | sort)
  (( ${#files[@]} )) || fail "no test file holds a cuda-marked test"
  echo "test files with cuda-marked tests: ${files[*]}"
  "$PYTHON" -c "import pytest" 2> /dev/null || fail "pytest is not installed for $PYTHON (put it on PYTHONPATH)"
  (( DRY_RUN )) && export CUDA_TESTS_ON_CPU=1
  py -m pytest -m cuda -rs -p no:cacheprovider "${files[@]}" || rc=$?
  local summary passed skipped
  summary="$(grep -E '[0-9]+ (passed|failed|skipped|deselected|errors?)' "$LOGS/$STAGE.log" | tail -1)"
  passed="$(count passed "$summary")" skipped="$(count skipped "$summary")"
  (( rc == 0 )) || fail "pytest -m cuda exited $rc: $summary"
  (( passed > 0 )) || fail "no cuda-marked test passed: $summary"
  if (( skipped > 0 )) && [[ "$DEVICE" == cuda ]]; then
    fail "$skipped cuda-marked test(s) skipped on CUDA (checks that did not happen): $(grep -E '^SKIPPED' "$LOGS/$STAGE.log" | cut -c1-160 | tr '\n' ' ')"
  fi
  result "$passed passed, $skipped skipped$( (( DRY_RUN )) && echo ' (on the CPU: only tests needing CUDA itself skip)') in ${#files[@]} files"
}

stage_bench_pretrain() {
  local log="$LOGS/bench_pretrain.out" batch rc  # the successful attempt's output, read by later stages too
  for batch in "${BATCHES[@]}"; do
    rc=0
    py benchmarks/bench_pretrain.py "${BENCH[@]}" --batch_size "$batch" > "$log" 2>&1 || rc=$?
    cat "$log"
    (( rc == 0 )) && break
    grep -q "out of memory" "$log" || fail "bench_pretrain exited $rc"
    echo "--- batch $batch does not fit: trying a smaller one"
  done
  (( rc == 0 )) || fail "no batch size fits"
  echo "$batch" > "$LOGS/bench_pretrain.batch"
  grep -q "device $DEVICE" "$log" || fail "bench_pretrain did not run on $DEVICE"
  grep -q "compiled" "$log" || fail "the benchmark did not report a compiled model"
  local lines eager compiled speedup target=""
  lines="$(grep -E '^  MFU' "$log")"
  eager="$(sed -n 1p <<< "$lines" | sed -E 's/^  MFU +//')"
  compiled="$(sed -n 2p <<< "$lines" | sed -E 's/^  MFU +//')"
  speedup="$(grep -Eo 'speed-up over upstream execution: [0-9.]+x' "$log" | grep -Eo '[0-9.]+x' || true)"
  [[ -n "$eager" && -n "$speedup" ]] || fail "no MFU or speed-up line"
  # issue target: ViT-B 128 px bf16 >= 45 % of the datasheet peak on an H100/H200 (the dry run: an H100's fp32 peak)
  grep -q "of the datasheet" <<< "$eager" || fail "no datasheet peak for this GPU: add it to DATASHEET_TFLOPS"
  local best
  best="$(sed -n '1,2p' <<< "$lines" | grep -Eo '[0-9.]+ % of the datasheet' | grep -Eo '^[0-9.]+' | sort -g | tail -1)"
  target="$(awk -v m="$best" 'BEGIN { print (m >= 45) ? "; target >= 45 % of the datasheet peak met" : "; target >= 45 % of the datasheet peak NOT met" }')"
  result "batch $batch, MFU ${eager}; compiled: ${compiled:-?}$( (( DRY_RUN )) && echo ' (TorchDynamo off)')${target}; speed-up over upstream ${speedup}"
}

stage_cuda_paths() {
  py benchmarks/cuda_paths.py "${PATHS[@]}" || fail "$(grep FAILED "$LOGS/$STAGE.log" | tr '\n' ' ')"
  local rate consumed
  rate="$(grep -Eo 'packed-array path on [a-z:0-9]+: [0-9]+ img/s' "$LOGS/$STAGE.log" | grep -Eo '[0-9]+ img/s')"
  consumed="$(grep -Eo '\(([0-9.]+) img/s\)' "$LOGS/bench_pretrain.out" | head -1 | tr -d '()' || true)"
  if [[ "$DEVICE" == cuda ]]; then
    grep -q "flash attention, decoder: flash SDPA ran" "$LOGS/$STAGE.log" || fail "no flash check at the decoder's shape"
  fi
  result "on-device data path ${rate} (target >= 10000 per GPU), the bare step consumes ${consumed:-?}"
}

stage_pretrain_loop() {
  local log="$LOGS/$STAGE.log" bench="$LOGS/bench_pretrain.out" batch="$LOOP_BATCH"
  [[ -n "$batch" ]] || batch="$(cat "$LOGS/bench_pretrain.batch" 2> /dev/null)" \
    || fail "no batch size: stage bench_pretrain found none that fits"
  py benchmarks/synthetic_packed.py "$WORK/synthetic/train" "${SYNTH[@]}" || fail "could not write the synthetic packed array"
  py main_pretrain.py "${LOOP[@]}" --batch_size "$batch" --train_path "$WORK/synthetic/train.json" --output_dir "$WORK/loop" --epochs 1 \
    --warmup_epochs 0 || fail "main_pretrain.py exited $?"
  grep -q "device $DEVICE" "$log" || fail "main_pretrain.py did not run on $DEVICE"
  grep -q "crops, flips and normalisation run on $DEVICE" "$log" || fail "the packed array did not take the on-device path"
  local rates logged bare per_image peak_gflops mfu
  rates="$(grep -E '^epoch 0 \[' "$log" | grep -Eo '[0-9.]+ img/s' | grep -Eo '^[0-9.]+' | tail -n +2)"  # the first: start-up
  [[ -n "$rates" ]] || fail "fewer than two logged intervals"
  logged="$(sort -g <<< "$rates" | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')"
  bare="$(grep -Eo '\(([0-9.]+) img/s\)' "$bench" | head -1 | grep -Eo '[0-9.]+')"
  per_image="$(grep -Eo 'FLOPs per image +[0-9.]+' "$bench" | head -1 | grep -Eo '[0-9.]+$')"
  # the datasheet peak of the autocast dtype where the table knows the GPU, else the matmul measured in the benchmark
  peak_gflops="$(grep -Eo '^datasheet peak, .*: [0-9.]+ TFLOP/s' "$bench" | head -1 | grep -Eo '[0-9.]+ TFLOP/s' | awk '{ print $1 * 1000 }' || true)"
  local against="the datasheet peak"
  if [[ -z "$peak_gflops" ]]; then
    peak_gflops="$(grep -Eo '^dense .* matmul, .*: [0-9.]+ GFLOP/s' "$bench" | head -1 | grep -Eo '[0-9.]+ GFLOP/s' | grep -Eo '^[0-9.]+')"
    against="the measured matmul"
  fi
  mfu="$(awk -v r="$logged" -v f="$per_image" -v p="$peak_gflops" 'BEGIN { printf "%.1f", 100 * r * f / p }')"
  result "batch $batch: logged ${logged} img/s (median of $(wc -l <<< "$rates") intervals) vs the bare step's ${bare} img/s ($(awk -v l="$logged" -v b="$bare" 'BEGIN { printf "%.0f", 100 * l / b }') %); end-to-end MFU ${mfu} % of ${against}"
}

stage_torchrun_resume() {
  local out="$WORK/pretrain_run" first="$LOGS/pretrain_first.log" second="$LOGS/pretrain_resumed.log"
  local cmd=("${LAUNCH[@]}" main_pretrain.py "${TRAIN[@]}"
             --train_path "$TRAIN_DATA" --output_dir "$out")
  [[ -f "$TRAIN_DATA" ]] || fail "no $TRAIN_DATA (written by stage pretrain_loop)"
  # its own process group, signalled as a whole: what SLURM (scancel) does before pre-emption
  # compiled (DDP + torch.compile + no_sync); the resumed run is eager: a compiled run's checkpoint must load there
  setsid "${cmd[@]}" --compile --epochs 50 --warmup_epochs 1 > "$first" 2>&1 &
  local pid=$! waited=0
  until grep -q "\[3/" "$first"; do
    kill -0 "$pid" 2>/dev/null || { cat "$first"; fail "training ended before its third step"; }
    (( waited++ < STAGE_TIMEOUT * 5 )) || { kill -KILL -- -"$pid"; cat "$first"; fail "no third step within ${STAGE_TIMEOUT}s"; }
    sleep 0.2
  done
  kill -TERM -- -"$pid"
  local rc=0
  wait "$pid" || rc=$?
  cat "$first"
  echo "--- interrupted run exited $rc"
  local stopped
  stopped="$(grep -Eo 'SIGTERM: stopped at epoch [0-9]+ step [0-9]+' "$first" | head -1)" || fail "no 'SIGTERM: stopped' message"
  [[ -f "$out/checkpoint-last.pth" ]] || fail "no checkpoint-last.pth after SIGTERM"
  if [[ "$DEVICE" == cuda ]]; then grep -q "device cuda" "$first" || fail "pretraining did not run on cuda"; fi
  local epoch step
  read -r epoch step <<< "$(sed -E 's/.*epoch ([0-9]+) step ([0-9]+)/\1 \2/' <<< "$stopped")"
  (( step % 2 == 0 )) || fail "stopped at step $step, inside an accumulation group of --accum_iter 2"
  timeout --kill-after=15 "$STAGE_TIMEOUT" "${cmd[@]}" --epochs $((epoch + 1)) --warmup_epochs 1 --resume auto --allow_changed_flags > "$second" 2>&1 \
    || { cat "$second"; fail "the resumed run failed"; }
  cat "$second"
  grep -q "resumed from .*checkpoint-last.pth, continuing at epoch $epoch" "$second" || fail "no resume message"
  result "compiled, --accum_iter 2: stopped at epoch $epoch step $step, resumed eagerly: $(grep -Eo "continuing at epoch [0-9]+( step [0-9]+)?" "$second" | head -1)"
}

# ------------------------------------------------------------------------------------------- driver

STAGES=(pytest_cuda bench_pretrain cuda_paths pretrain_loop torchrun_resume)

run_stage() {  # STAGE -> $LOGS/STAGE.{log,result,status,seconds}
  local STAGE=$1 start=$SECONDS rc=0
  ( set -euo pipefail; "stage_$STAGE" ) > "$LOGS/$STAGE.log" 2>&1 || rc=$?
  echo $((SECONDS - start)) > "$LOGS/$STAGE.seconds"
  if (( rc == 0 )); then
    echo PASS > "$LOGS/$STAGE.status"
  else
    echo FAIL > "$LOGS/$STAGE.status"
    [[ -s "$LOGS/$STAGE.result" ]] || echo "exit status $rc" > "$LOGS/$STAGE.result"
  fi
}

if (( DRY_RUN )); then
  # the tests run beside the other stages (they share nothing; timings mean nothing on a CPU anyway); on a GPU every
  # stage runs alone, so that no measurement is disturbed
  echo "=== pytest_cuda (in the background)"
  run_stage pytest_cuda &
  TESTS_PID=$!
  for STAGE in "${STAGES[@]:1}"; do echo "=== $STAGE"; run_stage "$STAGE"; done
  wait "$TESTS_PID"
else
  for STAGE in "${STAGES[@]}"; do echo "=== $STAGE"; run_stage "$STAGE"; done
fi
FAILED=0
for STAGE in "${STAGES[@]}"; do
  if [[ "$(cat "$LOGS/$STAGE.status")" != PASS ]]; then
    FAILED=1
    echo "--- $STAGE failed; last lines of its log:"
    tail -n 60 "$LOGS/$STAGE.log"
  fi
done

summary() {
  echo "gpu_check summary ($( (( DRY_RUN )) && echo "CPU dry run" || echo "device cuda" ), $(date -u '+%Y-%m-%d %H:%M UTC'))"
  cat "$LOGS/environment.txt"
  echo
  printf '%-16s | %-6s | %7s | %s\n' stage status seconds result
  printf '%-16s-+-%-6s-+-%7s-+-%s\n' "----------------" "------" "-------" "------"
  for STAGE in "${STAGES[@]}"; do
    printf '%-16s | %-6s | %7s | %s\n' "$STAGE" "$(cat "$LOGS/$STAGE.status")" "$(cat "$LOGS/$STAGE.seconds")" \
      "$(cat "$LOGS/$STAGE.result" 2>/dev/null || true)"
  done
  echo
  echo "Not verified by one GPU: collectives across ranks on NCCL (gathered negatives, synced BatchNorm across ranks in"
  echo "pretraining (--sync_bn) and segmentation, all_reduce_mean and the evaluation gathers of several processes);"
  echo "these ran as 2-process gloo jobs on the CPU only (tests/integration/test_distributed.py)."
}
echo
summary | tee "$RESULTS/summary.txt"
tar -czf "$RESULTS/gpu_check_logs.tar.gz" -C "$WORK" logs
echo "gpu_check: wrote $RESULTS/summary.txt and $RESULTS/gpu_check_logs.tar.gz"
exit "$FAILED"
