"""How many intra-op CPU threads torch should use on a machine it may share with other jobs.

torch's default (the OpenMP runtime's) is one thread per core of the machine, which ignores the container's CPU
quota, the other jobs on a shared machine and the other processes of a DDP run on the same node. On a shared 2-core
machine that oversubscription turned a 3-minute run into 22 minutes.

:func:`configure_threads` uses, in order:

1. ``OMP_NUM_THREADS`` when set: torch already read it at start-up; it is reported and nothing is called.
2. Otherwise the CPUs this process may run on, ``len(os.sched_getaffinity(0))`` (Linux ``sched_getaffinity(2)``;
   SLURM's ``--cpus-per-task`` and ``taskset`` act here), capped by the cgroup CPU bandwidth quota (Docker
   ``--cpus``, Kubernetes CPU limits), floored to a whole number, at least 1, divided by the processes on this node
   (``LOCAL_WORLD_SIZE``, set by torchrun), at least 1.

cgroup quota files (https://docs.kernel.org/admin-guide/cgroup-v2.html#cpu-interface-files and
https://docs.kernel.org/scheduler/sched-bwc.html), both in microseconds of CPU time per period:

- cgroup v2 ``cpu.max``: ``"$MAX $PERIOD"``, e.g. ``"150000 100000"`` = 1.5 CPUs; ``"max 100000"`` = no limit.
- cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``: quota ``-1`` = no limit.

The limit in CPUs is quota / period. The cgroup of this process (``/proc/self/cgroup``) and each of its ancestors
are read, and the smallest limit wins (a parent's quota bounds its children).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


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


def affinity_cpus() -> int:
    """CPUs this process may run on (``sched_getaffinity``; ``os.cpu_count()`` where that does not exist)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def configure_threads(
    world_size_on_node: int | None = None,
    *,
    cgroup_root: Path = CGROUP_ROOT,
    proc_cgroup: Path = PROC_CGROUP,
    environ: Mapping[str, str] | None = None,
) -> str:
    """Set ``torch.set_num_threads`` to this process's share of the CPUs; returns one line describing the choice
    (for rank 0 to print), e.g. ``threads: 2 (2 CPUs allowed by affinity, cgroup quota none; OMP_NUM_THREADS unset)``.

    Args:
        world_size_on_node: processes sharing this node's CPUs (default: ``LOCAL_WORLD_SIZE``, else 1).
        cgroup_root, proc_cgroup: where the cgroup files are read (tests pass fake ones).
        environ: the environment to read (default: ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp:
        return f"threads: {torch.get_num_threads()} (OMP_NUM_THREADS={omp})"
    if world_size_on_node is None:
        try:
            world_size_on_node = int(environ.get("LOCAL_WORLD_SIZE", "1"))
        except ValueError:
            world_size_on_node = 1
    processes = max(1, world_size_on_node)
    affinity = affinity_cpus()
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    cpus = max(1, math.floor(min(affinity, quota) if quota is not None else affinity))
    threads = max(1, cpus // processes)
    torch.set_num_threads(threads)
    quota_text = "none" if quota is None else f"{quota:g} CPUs"
    share = f", {processes} processes on this node" if processes > 1 else ""
    return (
        f"threads: {threads} ({affinity} CPUs allowed by affinity, cgroup quota {quota_text}{share}; "
        f"OMP_NUM_THREADS unset)"
    )
