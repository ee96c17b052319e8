"""What a run writes as it goes: running means of the loss terms, throughput, the run's clock (epoch times,
whole-run ETA), progress of long non-training work, ``log.txt`` and TensorBoard."""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator

import torch
from torch.utils.tensorboard import SummaryWriter

from util import config
from util.files import best_effort
from util.run import distributed
from util.run.process import Run


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


# An ETA is printed once this many steps were timed in this process (before: "estimating"): a run resumed at an
# epoch's last step would otherwise extrapolate its whole remaining time from one step, the slow first one.
ETA_MIN_STEPS = 5


def eta_text(per_step: float, measured_steps: int, steps_left: int) -> str:
    """``per_step`` seconds x ``steps_left`` as H:MM:SS.s, or ``estimating`` while fewer than ``ETA_MIN_STEPS``
    steps were measured (and some are left)."""
    if measured_steps < ETA_MIN_STEPS and steps_left > 0:
        return "estimating"
    return format_duration(per_step * steps_left)


class Throughput:
    """Images per second and time left, measured between calls."""

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.start = self.last = time.perf_counter()
        self.per_step = 0.0
        self.steps = 0

    def tick(self, step: int, images: int) -> tuple[float, str]:
        """``step`` steps done so far, ``images`` since the last call -> (images/s, time left in these
        ``total_steps`` as H:MM:SS.s, or ``estimating``: ``eta_text``)."""
        now = time.perf_counter()
        rate = images / max(now - self.last, 1e-9)
        self.last, self.steps = now, step
        self.per_step = (now - self.start) / max(step, 1)
        return rate, self.eta(self.total_steps - step)

    def eta(self, steps_left: int) -> str:
        """Time for ``steps_left`` more steps at the pace measured so far (``eta_text``)."""
        return eta_text(self.per_step, self.steps, steps_left)


def format_duration(seconds: float) -> str:
    """H:MM:SS.s (tenths, so that short test runs read non-zero)."""
    tenths = max(0, round(seconds * 10))
    hours, rest = divmod(tenths, 36000)
    minutes, rest = divmod(rest, 600)
    return f"{hours}:{minutes:02d}:{rest // 10:02d}.{rest % 10}"


class RunClock:
    """Epoch times and the whole run's ETA: time per step measured so far in this process x steps left in the
    run (a resumed run counts only the steps it trained itself, from its mid-epoch start; ``estimating`` until
    ``ETA_MIN_STEPS`` steps were timed)."""

    def __init__(self, steps_per_epoch: int, epochs: int, start_epoch: int, start_step: int) -> None:
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.start_epoch, self.start_step = start_epoch, start_step
        self.start = self.epoch_start = time.perf_counter()

    def steps_done(self, epoch: int) -> int:
        """Steps this process trained up to the end of ``epoch``."""
        return (epoch + 1 - self.start_epoch) * self.steps_per_epoch - self.start_step

    def end_epoch(self, epoch: int) -> str:
        """The line for the end of ``epoch``: its time and the ETA of the whole run."""
        now = time.perf_counter()
        took, self.epoch_start = now - self.epoch_start, now
        done = max(self.steps_done(epoch), 1)
        per_step = (now - self.start) / done
        left = (self.epochs - epoch - 1) * self.steps_per_epoch
        return (
            f"epoch {epoch} done in {format_duration(took)} ({per_step:.3f} s/step over {done} steps); "
            f"run eta {eta_text(per_step, done, left)} ({self.epochs - epoch - 1} of {self.epochs} epochs left)"
        )

    def total(self, last_epoch: int) -> str:
        """The line at the end of the run."""
        epochs = last_epoch + 1 - self.start_epoch
        return f"training time {format_duration(time.perf_counter() - self.start)} ({epochs} epoch(s) in this run)"


PLAIN_PROGRESS_EVERY_S = 30.0  # without a terminal (SLURM logs): one line this often, and one at the end


def progress(
    items: Iterable, desc: str, total: int | None = None, unit: str = "batch", enabled: bool | None = None
) -> Iterator:
    """``items``, reporting progress of long non-training work (inference, feature caching, preprocessing).

    A tqdm bar on stderr when it is a terminal; otherwise plain lines on stdout (start, every
    ``PLAIN_PROGRESS_EVERY_S`` seconds, end), which read well in a log file. Only rank 0 reports (``enabled``
    defaults to that).
    """
    if enabled is None:
        enabled = distributed.rank() == 0
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None
    if not enabled:
        yield from items
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, total=total, unit=unit, dynamic_ncols=True, mininterval=1.0)
        return
    yield from _plain_progress(items, desc, total, unit)


def _plain_progress(items: Iterable, desc: str, total: int | None, unit: str) -> Iterator:
    start = last = time.perf_counter()
    of = f"/{total}" if total is not None else ""
    print(f"{desc}: 0{of} {unit}es" if unit.endswith("ch") else f"{desc}: 0{of} {unit}s", flush=True)
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= PLAIN_PROGRESS_EVERY_S:
            last = now
            eta = f", eta {format_duration((now - start) / done * (total - done))}" if total else ""
            print(f"{desc}: {done}{of} ({format_duration(now - start)}{eta})", flush=True)
    print(f"{desc}: {done}{of} done in {format_duration(time.perf_counter() - start)}", flush=True)


def append_log(run: Run, record: dict) -> None:
    """Append one JSON line to ``output_dir/log.txt`` (rank 0)."""
    if run.is_main:
        path = run.output_dir / "log.txt"

        def write():
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

        best_effort(path, write)


class EventWriter:
    """A TensorBoard ``SummaryWriter`` whose write failures (disk full, permissions; the event file is written by
    a background thread and its error surfaces at a later call) are reported once with the folder and the reason,
    after which events are dropped and training goes on."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.writer: SummaryWriter | None = None
        self._call("open", lambda: setattr(self, "writer", SummaryWriter(log_dir)))

    def _call(self, what: str, fn) -> None:
        ok = best_effort(f"TensorBoard events in {self.log_dir} ({what})", fn)
        if not ok:
            self.writer = None  # stop writing: every later event would fail the same way

    def __getattr__(self, name: str):
        """``add_scalar``, ``add_image``, ``flush``, ``close``…: forwarded while the writer works, no-ops after."""

        def call(*args, **kwargs) -> None:
            if self.writer is not None:
                self._call(name, lambda: getattr(self.writer, name)(*args, **kwargs))

        return call


def start_logs(run: Run, flags: config.Flags, log_dir: str | None = None) -> EventWriter | None:
    """Rank 0: write the flags to ``config.yaml`` (``--config`` of it reproduces the run) and open the TensorBoard
    writer (``log_dir``, default the output folder); None on other ranks."""
    if not run.is_main:
        return None
    best_effort(run.output_dir / "config.yaml", lambda: config.save_config(flags, run.output_dir / "config.yaml"))
    return EventWriter(log_dir or str(run.output_dir))
