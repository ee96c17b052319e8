"""Distributed set-up, device and precision choice, seeding, and metric logging."""
from __future__ import annotations

import datetime
import os
import random
import time
from collections import defaultdict
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist


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


def is_main_process() -> bool:
    return rank() == 0


def main_print(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs, flush=True)


class ReportableError(Exception):
    """An error whose message alone tells the user what is wrong; entry points print it without a traceback."""


class UsageError(ReportableError, ValueError):
    """A flag value that cannot work; the message names the flag."""


def run_entry_point(main, args) -> None:
    """Call ``main(args)``; a ``ReportableError`` (also one re-raised from a DataLoader worker) exits with one line."""
    try:
        main(args)
    except ReportableError as e:
        message = str(e).strip().splitlines()[-1]  # a worker's error arrives with its traceback in front
        message = message.removeprefix(f"{type(e).__module__}.{type(e).__name__}: ")
        raise SystemExit(f"error: {message}") from None


def check_replicas_in_sync(model: torch.nn.Module) -> str:
    """Compare per-tensor checksums of the weights across ranks (collective); a one-line verdict, or an error."""
    checksums = torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()
    gathered = [torch.zeros_like(checksums) for _ in range(world_size())]
    dist.all_gather_object(gathered, checksums)
    differing = [r for r, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
    if differing:
        raise ReportableError(f"weights of rank(s) {differing} differ from rank 0 after training")
    return f"weights identical on all {world_size()} processes"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU where CUDA exists, else the CPU; anything else is used as given."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``--amp``: ``auto`` = bf16 where the device computes it natively, else fp32 (None).

    fp16 on a CPU is refused: it runs about 100x slower there than fp32.
    """
    if mode == "none":
        return None
    if mode == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        native_bf16 = device.type == "cpu" and torch.cpu._is_avx512_bf16_supported()
        return torch.bfloat16 if native_bf16 else None
    if mode == "fp16" and device.type == "cpu":
        raise UsageError("--amp fp16: fp16 is emulated and very slow on CPUs; use --amp bf16 or none")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def gather_rng_states() -> list[dict]:
    """The RNG states of every rank, index = rank (collective: every rank must call it)."""
    if not is_distributed():
        return [rng_state()]
    states: list = [None] * world_size()
    dist.all_gather_object(states, rng_state())
    return states


def rng_state() -> dict:
    """Every random generator the training loop draws from, as tensors and plain types."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), position, has_gauss, cached),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_state(state["python"]))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(state):
    """``random.setstate`` wants tuples; a checkpoint round trip may give lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


class MetricLogger:
    """Running sums of scalar tensors kept on the device; read (one host sync) only when printed."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = defaultdict(lambda: 0.0)
        self.counts: dict[str, int] = defaultdict(int)

    def update(self, **values: torch.Tensor | float) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums[name] + (value.detach() if torch.is_tensor(value) else value)
            self.counts[name] += 1

    def means(self) -> dict[str, float]:
        return {name: float(total) / self.counts[name] for name, total in self.sums.items()}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()


class Throughput:
    """Images per second and time left, measured between calls."""

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.start = self.last = time.perf_counter()

    def tick(self, step: int, images: int) -> tuple[float, str]:
        now = time.perf_counter()
        rate = images / max(now - self.last, 1e-9)
        self.last = now
        per_step = (now - self.start) / max(step, 1)
        eta = datetime.timedelta(seconds=int(per_step * (self.total_steps - step)))
        return rate, str(eta)
