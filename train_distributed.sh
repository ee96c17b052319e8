#!/usr/bin/env bash
# Run a launcher with DDP under torchrun: every visible GPU (NCCL), or CPU processes (gloo) where there is none.
# LAUNCHER chooses which: train.sh (default: pretraining), finetune.sh, linprobe.sh, knn.sh or segment.sh; this script
# takes that launcher's variables and arguments and runs it with LAUNCH set to torchrun.
#
#   bash train_distributed.sh                            # pretrain on all GPUs of this node
#   NUM_GPUS=2 bash train_distributed.sh --epochs 1      # 2 processes (on a CPU-only machine: 2 gloo processes)
#   LAUNCHER=finetune.sh WEIGHTS=weights/cross_scale_mae_base_pretrain.pth bash train_distributed.sh --epochs 100
#   LAUNCHER=knn.sh bash train_distributed.sh none weights/cross_scale_mae_base_pretrain.pth
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash train_distributed.sh   # on node0; NODE_RANK=1 on the other
#
# Under SLURM (one task per node), NNODES, NODE_RANK and MASTER_ADDR come from the job's environment (MASTER_ADDR: the
# first node of SLURM_JOB_NODELIST, by scontrol or, where it is missing, parsed here), and
# MASTER_PORT (when not set) from the job id: 20000 + SLURM_JOB_ID % 20000, so jobs sharing a node do not both
# take torchrun's 29500. Outside SLURM the default is 29500.
# Ask SLURM for an early pre-emption warning in the batch script:
#   #SBATCH --signal=B:USR1@120
#   exec bash train_distributed.sh --resume auto         # one node; several: exec srun bash train_distributed.sh ...
# (SIGUSR1 to the batch shell 120 s before the time limit). Schedulers send SIGKILL about 30 s after SIGTERM,
# too little to write a ViT-L checkpoint; the Python side treats USR1 like SIGTERM (save, then exit).
# B: signals only the batch shell, hence the exec: the launchers exec in turn, so the signal reaches torchrun
# (srun relays the signals it receives to its tasks). torchrun forwards USR1 to the workers
# (PET_SIGNALS_TO_HANDLE below) and waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (here 120, torch's 30) for them
# to save before it kills them.
# The batch size is per GPU: the effective batch is BATCH_SIZE x NUM_GPUS x NNODES (x --accum_iter).
# Several nodes: NCCL_SOCKET_IFNAME (e.g. =ib0 or eth) also chooses the interface of the small gloo group on which the
# ranks agree to stop (GLOO_SOCKET_IFNAME, unless set; docs/pretraining.md).
set -euo pipefail
export LAUNCHER_CALLER_DIR=${LAUNCHER_CALLER_DIR:-$PWD}  # the user's relative paths start here (tools/launcher_lib.sh)
cd "$(dirname "$0")"

visible_gpus() {
  if [[ -n ${CUDA_VISIBLE_DEVICES+x} ]]; then
    tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . || true
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}
# The first host of a SLURM node list, without scontrol (absent inside Apptainer / enroot containers): the entry up to
# the first comma outside brackets, each bracket replaced by its first value, zero padding kept:
# gpu[01-02] -> gpu01, alpha,beta -> alpha, node[001,003-004] -> node001, rack[2-3]-n[07-08] -> rack2-n07.
first_host() {
  local list=$1 entry="" depth=0 i c re='^([^[]*)\[([^],-]+)[^]]*](.*)$'
  for ((i = 0; i < ${#list}; i++)); do
    c=${list:i:1}
    case $c in
      '[') depth=$((depth + 1)) ;;
      ']') depth=$((depth - 1)) ;;
      ,) ((depth == 0)) && break ;;
    esac
    entry+=$c
  done
  while [[ $entry =~ $re ]]; do entry=${BASH_REMATCH[1]}${BASH_REMATCH[2]}${BASH_REMATCH[3]}; done
  [[ $entry =~ ^[A-Za-z0-9._-]+$ ]] && echo "$entry"
}
slurm_master() {  # scontrol where it works; a container may bind it without slurm.conf (it fails): parsed here then
  [[ -n ${SLURM_JOB_NODELIST:-} ]] || return 1
  local host=""
  if command -v scontrol >/dev/null 2>&1; then
    host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1) || host=""
  fi
  if [[ -n $host ]]; then echo "$host"; else first_host "$SLURM_JOB_NODELIST"; fi
}

NUM_GPUS=${NUM_GPUS:-$(visible_gpus)}
[[ $NUM_GPUS -gt 0 ]] || NUM_GPUS=1
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
if [[ -z ${MASTER_ADDR:-} ]]; then
  MASTER_ADDR=$(slurm_master || true)
  if [[ -z $MASTER_ADDR && $NNODES -gt 1 ]]; then  # 127.0.0.1 would leave every node waiting on itself
    echo "error: NNODES=$NNODES but no MASTER_ADDR, and the first node of SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}' cannot be told: export MASTER_ADDR (the first node's host name)" >&2
    exit 1
  fi
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
fi
if [[ -z ${MASTER_PORT:-} ]]; then
  if [[ ${SLURM_JOB_ID:-} =~ ^[0-9]+$ ]]; then MASTER_PORT=$((20000 + 10#$SLURM_JOB_ID % 20000)); else MASTER_PORT=29500; fi
fi
PYTHON=${PYTHON:-python}
LAUNCHER=${LAUNCHER:-train.sh}
case $LAUNCHER in
  train.sh | finetune.sh | linprobe.sh | knn.sh | segment.sh) ;;
  *) echo "error: LAUNCHER=$LAUNCHER: expected train.sh, finetune.sh, linprobe.sh, knn.sh or segment.sh" >&2; exit 1 ;;
esac

# torchrun is a module of torch: a Python without it would fail there, before util's one line naming what it lacks
$PYTHON -c "import util" >/dev/null || exit 1  # unquoted, as LAUNCH: PYTHON may be a command with arguments
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}  # torchrun --signals_to_handle
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
export LAUNCH="$PYTHON -m torch.distributed.run --nnodes $NNODES --node_rank $NODE_RANK --nproc_per_node $NUM_GPUS --master_addr $MASTER_ADDR --master_port $MASTER_PORT"
exec bash "$LAUNCHER" "$@"
