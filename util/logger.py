"""What a run writes as it goes: running means of the loss terms, throughput, ``log.txt`` and TensorBoard."""
from __future__ import annotations

import argparse
import datetime
import json
import time
from collections import defaultdict

import torch
from torch.utils.tensorboard import SummaryWriter

from util import config
from util.errors import best_effort
from util.runtime import Run


class MetricLogger:
    """Running sums of scalar tensors kept on the device; read (one host sync) only when printed."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = defaultdict(lambda: 0.0)
        self.counts: dict[str, int] = defaultdict(int)

    def update(self, **values: torch.Tensor | float) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums[name] + (value.detach() if torch.is_tensor(value) else value)
            self.counts[name] += 1

    def local_means(self) -> dict[str, torch.Tensor | float]:
        """Mean of each name over the updates since the last reset, in this process (tensors stay on the device)."""
        return {name: total / self.counts[name] for name, total in self.sums.items()}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()


class Throughput:
    """Images per second and time left, measured between calls."""

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.start = self.last = time.perf_counter()

    def tick(self, step: int, images: int) -> tuple[float, str]:
        """``step`` steps done so far, ``images`` since the last call -> (images/s, time left as H:MM:SS)."""
        now = time.perf_counter()
        rate = images / max(now - self.last, 1e-9)
        self.last = now
        per_step = (now - self.start) / max(step, 1)
        eta = datetime.timedelta(seconds=int(per_step * (self.total_steps - step)))
        return rate, str(eta)


def append_log(run: Run, record: dict) -> None:
    """Append one JSON line to ``output_dir/log.txt`` (rank 0)."""
    if run.is_main:
        path = run.output_dir / "log.txt"

        def write():
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

        best_effort(path, write)


def summary_writer(run: Run, args: argparse.Namespace) -> SummaryWriter | None:
    """Rank 0: write ``config.yaml`` and open the TensorBoard writer (``--log_dir`` or the output folder)."""
    if not run.is_main:
        return None
    best_effort(run.output_dir / "config.yaml", lambda: config.save_config(args, run.output_dir / "config.yaml"))
    return SummaryWriter(args.log_dir or str(run.output_dir))
