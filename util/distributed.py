"""Process group membership and the collectives the training and evaluation loops use.

Every function works unchanged in a single process (no process group): collectives become identities.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from util.errors import ReportableError
from util.rng import rng_state


def init_distributed(timeout_minutes: float = 30.0) -> tuple[int, int, int]:
    """Join the process group that torchrun or SLURM describes; returns (rank, world_size, local_rank).

    Single-process runs (no ``RANK``/``WORLD_SIZE``, no multi-task SLURM job) return (0, 1, 0).
    Collectives time out after ``timeout_minutes``, so a dead rank ends the job instead of hanging it.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "MASTER_ADDR" in os.environ:
        rank, world_size = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        local_rank = int(os.environ.get("SLURM_LOCALID", 0))
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
        os.environ.setdefault("MASTER_PORT", "29500")
    else:
        return 0, 1, 0
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return rank, world_size, local_rank


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def main_print(*args, **kwargs) -> None:
    """``print`` on rank 0 only, flushed (so SLURM logs show lines as they happen)."""
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def mean_over_ranks(values: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """Average each value over ranks: one collective for all of them, and every rank sees a bad value."""
    names = sorted(values)
    stacked = torch.tensor([float(values[n]) for n in names], dtype=torch.float64)
    if is_distributed():
        dist.all_reduce(stacked)
        stacked /= world_size()
    return dict(zip(names, stacked.tolist()))


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows; ranks hold every world_size-th sample (as ``util.loaders.eval_loader``
    shards), and the dataset order is restored."""
    if not is_distributed():
        return tensor
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, tensor.cpu())
    out = torch.empty((sum(len(p) for p in parts), *tensor.shape[1:]), dtype=tensor.dtype)
    for index, part in enumerate(parts):
        out[index::world_size()] = part
    return out


def gather_rng_states() -> list[dict]:
    """The RNG states of every rank, index = rank (collective: every rank must call it)."""
    if not is_distributed():
        return [rng_state()]
    states: list = [None] * world_size()
    dist.all_gather_object(states, rng_state())
    return states


def check_replicas_in_sync(model: torch.nn.Module) -> str:
    """Compare per-tensor checksums of the weights across ranks (collective); a one-line verdict, or an error."""
    checksums = torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()
    gathered = [torch.zeros_like(checksums) for _ in range(world_size())]
    dist.all_gather_object(gathered, checksums)
    differing = [r for r, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
    if differing:
        raise ReportableError(f"weights of rank(s) {differing} differ from rank 0 after training")
    return f"weights identical on all {world_size()} processes"
