"""How many intra-op CPU threads torch should use on a machine it may share with other jobs, and how many
DataLoader workers a process starts when ``--num_workers`` is not given (its share of the CPUs less one).

torch's default (the OpenMP runtime's) is one thread per core of the machine, which ignores the container's CPU
quota, the other jobs on a shared machine and the other processes of a DDP run on the same node. On a shared 2-core
machine that oversubscription turned a 3-minute run into 22 minutes; with 2 threads on 2 CPUs that other jobs kept
busy, steps took 44-230 s where one thread per process took ~24 s (issue 23): every parallel region waits for its
slowest thread, and on a busy CPU that thread waits for the scheduler.

:func:`cpu_share` and :func:`choose_threads` decide (pure functions: their decision table is tested),
:func:`configure_threads` gathers their inputs and sets torch's count; :func:`choose_workers` / :func:`default_workers`
take the same share for the data workers (rules 2-3):

1. ``OMP_NUM_THREADS`` when set: torch already read it at start-up; it is reported and wins.
2. Otherwise the CPUs this process may run on, ``len(os.sched_getaffinity(0))`` (Linux ``sched_getaffinity(2)``;
   SLURM's ``--cpus-per-task`` and ``taskset`` act here), capped by the cgroup CPU bandwidth quota (Docker
   ``--cpus``, Kubernetes CPU limits), floored to a whole number, at least 1, divided by the processes on this node
   (``LOCAL_WORLD_SIZE``, set by torchrun), at least 1.
3. Capped by the CPUs other work leaves idle: the CPU time every other process used on those CPUs over
   ``LOAD_SAMPLE_S`` at start-up (``/proc/stat``, minus this process's own), in CPUs, at most the 1-minute load
   average (``measured_once``: a burst or work that has just ended does not count); the idle ones, rounded to the
   nearest whole number and divided by the processes on this node, at least 1. Measured once per process: on a
   machine whose load changes during a long run, set ``OMP_NUM_THREADS`` (docs/pretraining.md, "CPU threads").

cgroup quota files (https://docs.kernel.org/admin-guide/cgroup-v2.html#cpu-interface-files and
https://docs.kernel.org/scheduler/sched-bwc.html), both in microseconds of CPU time per period:

- cgroup v2 ``cpu.max``: ``"$MAX $PERIOD"``, e.g. ``"150000 100000"`` = 1.5 CPUs; ``"max 100000"`` = no limit.
- cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``: quota ``-1`` = no limit.

The limit in CPUs is quota / period. The cgroup of this process (``/proc/self/cgroup``) and each of its ancestors
are read, and the smallest limit wins (a parent's quota bounds its children).

``/proc/stat`` (https://docs.kernel.org/filesystems/proc.html, "1.7 Miscellaneous kernel statistics"): one line per
CPU, ``cpuN user nice system idle iowait irq softirq steal guest guest_nice`` in clock ticks; busy = everything but
idle and iowait (steal included: time the hypervisor gave to another machine is not ours either).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import torch

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
PROC_STAT = Path("/proc/stat")
LOAD_SAMPLE_S = 0.3  # long enough for /proc/stat's 10 ms ticks to resolve a tenth of a CPU on 2 CPUs


def parse_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` line (``"max 100000"`` -> None, ``"150000 100000"`` -> 1.5)."""
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    period = int(fields[1]) if len(fields) > 1 else 100_000  # the kernel's default period, 100 ms
    return int(fields[0]) / period if period > 0 else None


def parse_cfs(quota_us: str, period_us: str) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1 -> None)."""
    quota, period = int(quota_us.strip()), int(period_us.strip())
    return quota / period if quota > 0 and period > 0 else None


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """The cgroup directories that may hold this process's CPU quota: its own cgroup and every ancestor
    (v2 unified hierarchy and v1 ``cpu`` controller), then ``root`` itself and its v1 ``cpu`` mounts."""
    dirs: list[Path] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:  # "hierarchy-ID:controller-list:path"
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            base = root  # v2
        elif "cpu" in controllers.split(","):
            base = root / controllers  # v1, e.g. /sys/fs/cgroup/cpu,cpuacct
        else:
            continue
        current = Path(path.strip())
        while True:
            dirs.append(base / str(current).lstrip("/"))
            if current == current.parent:
                break
            current = current.parent
    dirs += [root, root / "cpu", root / "cpu,cpuacct"]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The smallest CPU limit (in CPUs, may be fractional) of the cgroups above, or None when none is set."""
    limits = []
    for d in _cgroup_dirs(Path(cgroup_root), Path(proc_cgroup)):
        try:
            if (d / "cpu.max").is_file():
                limits.append(parse_cpu_max((d / "cpu.max").read_text()))
            elif (d / "cpu.cfs_quota_us").is_file():
                limits.append(parse_cfs((d / "cpu.cfs_quota_us").read_text(), (d / "cpu.cfs_period_us").read_text()))
        except (OSError, ValueError, IndexError):
            continue  # unreadable or malformed: no limit known from this file
    limits = [limit for limit in limits if limit is not None]
    return min(limits) if limits else None


def affinity_cpus() -> set[int]:
    """CPUs this process may run on (``sched_getaffinity``; every CPU of ``os.cpu_count()`` where that does not
    exist)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def cpu_ticks(text: str, cpus: Collection[int]) -> tuple[int, int]:
    """(busy, total) clock ticks of ``cpus`` summed from ``/proc/stat`` text (lines ``cpuN ...``)."""
    busy = total = 0
    for line in text.splitlines():
        name, *fields = line.split() or [""]
        if not name.startswith("cpu") or not name[3:].isdigit() or int(name[3:]) not in cpus:
            continue
        ticks = [int(f) for f in fields[:8]]  # guest time is counted in user already
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]  # idle, iowait
    return busy, total


_MEASURED: dict[frozenset[int], float | None] = {}  # once per process: a second run in it reuses the measurement


def measured_once(cpus: Collection[int]) -> float | None:
    """The other work on ``cpus`` that lasts, measured at the first call of this process only: ``other_work(cpus)``
    now, at most the 1-minute load average (``os.getloadavg``; runnable processes of the whole machine). The smaller
    of the two leaves out a burst of a fraction of a second (another process's start-up: high now, the load average
    hardly moved) and work that has just ended (a previous run: the load average still high, the CPUs idle now)."""
    key = frozenset(cpus)
    if key not in _MEASURED:
        now = other_work(key)
        try:
            recent = os.getloadavg()[0]
        except (AttributeError, OSError):
            recent = None
        _MEASURED[key] = now if now is None or recent is None else min(now, recent)
    return _MEASURED[key]


def other_work(cpus: Collection[int], seconds: float = LOAD_SAMPLE_S, proc_stat: Path = PROC_STAT) -> float | None:
    """CPUs' worth of work that other processes did on ``cpus`` over the next ``seconds`` (this process's own CPU
    time taken out); None where ``/proc/stat`` cannot be read (not Linux)."""
    try:
        before, own_before, wall_before = cpu_ticks(proc_stat.read_text(), cpus), time.process_time(), time.monotonic()
        time.sleep(seconds)
        after, own_after, wall_after = cpu_ticks(proc_stat.read_text(), cpus), time.process_time(), time.monotonic()
    except (OSError, ValueError, IndexError):
        return None
    ticks = after[1] - before[1]
    if ticks <= 0:
        return None
    busy_cpus = len(cpus) * (after[0] - before[0]) / ticks
    own_cpus = (own_after - own_before) / max(wall_after - wall_before, 1e-9)
    return max(0.0, busy_cpus - own_cpus)


def cpu_share(
    affinity: int, quota: float | None, load: float | None, processes: int, unit: str = "CPU"
) -> tuple[int, str]:
    """The CPUs one process of this run may keep busy (the module's rules 2-3) and why, as (cpus, reason).

    Args:
        affinity: CPUs this process may run on.
        quota: The cgroup CPU limit in CPUs (None: none).
        load: CPUs' worth of other work on those CPUs (``other_work``; None: unknown).
        processes: Processes of this run on this node (DDP), at least 1.
        unit: What the share is counted in, in the reason where the other work decided it (``... busy at
            start-up: 1 thread``).

    Returns:
        at least 1, and the reason, e.g. ``2 CPUs allowed by affinity, cgroup quota none``.
    """
    processes = max(1, processes)
    cpus = max(1, math.floor(min(affinity, quota) if quota is not None else affinity))
    share = max(1, cpus // processes)
    quota_text = "none" if quota is None else f"{quota:g} CPUs"
    per_process = f", {processes} processes on this node" if processes > 1 else ""
    reason = f"{affinity} CPUs allowed by affinity, cgroup quota {quota_text}{per_process}"
    if load is not None:
        idle = max(0, math.floor(affinity - load + 0.5))  # half up: 0.4 CPUs of other work leave 2 of 2 idle
        fits = max(1, idle // processes)
        if fits < share:
            share = fits
            reason += f"; other work kept {load:.1f} of them busy at start-up: {share} {unit}{'s' * (share > 1)}"
    return share, reason


def choose_threads(
    affinity: int, quota: float | None, load: float | None, processes: int, omp: str | None
) -> tuple[int | None, str]:
    """The intra-op thread count of one process and why (the module's rules 1-3), as (threads, reason): its CPU
    share (``cpu_share``), unless ``omp`` decides.

    Args:
        affinity, quota, load, processes: as ``cpu_share``.
        omp: ``OMP_NUM_THREADS`` as set ("" or None: unset).

    Returns:
        threads (None: ``OMP_NUM_THREADS`` decides, as torch read it at start-up) and the reason, e.g.
        ``2 CPUs allowed by affinity, cgroup quota none; OMP_NUM_THREADS unset``.
    """
    omp = (omp or "").strip()
    if omp:
        return None, f"OMP_NUM_THREADS={omp}"
    share, reason = cpu_share(affinity, quota, load, processes, unit="thread")
    return share, reason + "; OMP_NUM_THREADS unset"


def choose_workers(affinity: int, quota: float | None, load: float | None, processes: int) -> tuple[int, str]:
    """The default DataLoader worker count of one process and why, as (workers, reason): its CPU share
    (``cpu_share``) less one CPU for the training process itself (kernel launches, the pin-memory thread, or on a CPU
    the step), at least 1 so that reading overlaps the step. A fixed count per process oversubscribes a node: 8 GPUs x
    8 workers on 16 cores is 4.5 processes per core (issue 26). ``OMP_NUM_THREADS`` sets threads, not processes:
    it plays no part."""
    share, reason = cpu_share(affinity, quota, load, processes)
    workers = max(1, share - 1)
    return workers, f"{reason}; {share} CPU{'s' * (share > 1)} per process, one left to the training process"


def _machine(
    world_size_on_node: int | None,
    cgroup_root: Path,
    proc_cgroup: Path,
    environ: Mapping[str, str],
    load: Callable[[Collection[int]], float | None] | None,
    measure: bool,
) -> tuple[int, float | None, float | None, int]:
    """(affinity, quota, load, processes) as ``cpu_share`` takes them, read from this machine (``measure``: the other
    work is measured; else None)."""
    if world_size_on_node is None:
        try:
            world_size_on_node = int(environ.get("LOCAL_WORLD_SIZE", "1"))
        except ValueError:
            world_size_on_node = 1
    cpus = affinity_cpus()
    measured = (load or measured_once)(cpus) if measure else None
    return len(cpus), cgroup_cpu_quota(cgroup_root, proc_cgroup), measured, world_size_on_node


def configure_threads(
    world_size_on_node: int | None = None,
    *,
    cgroup_root: Path = CGROUP_ROOT,
    proc_cgroup: Path = PROC_CGROUP,
    environ: Mapping[str, str] | None = None,
    load: Callable[[Collection[int]], float | None] | None = None,
) -> str:
    """Set ``torch.set_num_threads`` to this process's share of the CPUs (``choose_threads``); returns one line
    describing the choice (for rank 0 to print), e.g. ``threads: 2 (2 CPUs allowed by affinity, cgroup quota none;
    OMP_NUM_THREADS unset)``.

    Args:
        world_size_on_node: processes sharing this node's CPUs (default: ``LOCAL_WORLD_SIZE``, else 1).
        cgroup_root, proc_cgroup: where the cgroup files are read (tests pass fake ones).
        environ: the environment to read (default: ``os.environ``).
        load: measures the other work on the CPUs given (default: ``measured_once``; tests pass a fake one).
    """
    environ = os.environ if environ is None else environ
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    # the other work is only measured when it can decide anything
    machine = _machine(world_size_on_node, cgroup_root, proc_cgroup, environ, load, measure=not omp)
    threads, reason = choose_threads(*machine, omp)
    if threads is not None:
        torch.set_num_threads(threads)
    return f"threads: {torch.get_num_threads()} ({reason})"


def default_workers(
    world_size_on_node: int | None = None,
    *,
    cgroup_root: Path = CGROUP_ROOT,
    proc_cgroup: Path = PROC_CGROUP,
    environ: Mapping[str, str] | None = None,
    load: Callable[[Collection[int]], float | None] | None = None,
) -> tuple[int, str]:
    """DataLoader workers per process where ``--num_workers`` is not given (``choose_workers``) and why; the
    arguments as ``configure_threads``."""
    environ = os.environ if environ is None else environ
    return choose_workers(*_machine(world_size_on_node, cgroup_root, proc_cgroup, environ, load, measure=True))
