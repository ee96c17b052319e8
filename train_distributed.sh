#!/usr/bin/env bash
# Pretrain with DDP under torchrun: every visible GPU (NCCL), or CPU processes (gloo) where there is none.
# Takes the same variables and arguments as train.sh, which it runs.
#
#   bash train_distributed.sh                            # all GPUs of this node
#   NUM_GPUS=2 bash train_distributed.sh --epochs 1      # 2 processes (on a CPU-only machine: 2 gloo processes)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash train_distributed.sh   # on node0; NODE_RANK=1 on the other
#
# Under SLURM (one task per node), NNODES, NODE_RANK and MASTER_ADDR come from the job's environment.
# The batch size is per GPU: the effective batch is BATCH_SIZE x NUM_GPUS x NNODES (x --accum_iter).
set -euo pipefail
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
slurm_master() {
  [[ -n ${SLURM_JOB_NODELIST:-} ]] && command -v scontrol >/dev/null 2>&1 && scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1
}

NUM_GPUS=${NUM_GPUS:-$(visible_gpus)}
[[ $NUM_GPUS -gt 0 ]] || NUM_GPUS=1
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MASTER_ADDR=${MASTER_ADDR:-$(slurm_master || echo 127.0.0.1)}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}

export LAUNCH="$PYTHON -m torch.distributed.run --nnodes $NNODES --node_rank $NODE_RANK --nproc_per_node $NUM_GPUS --master_addr $MASTER_ADDR --master_port $MASTER_PORT"
exec bash train.sh "$@"
