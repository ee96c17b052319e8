"""util.run.threads: the thread count from affinity, the cgroup CPU quota, the other work on the CPUs,
OMP_NUM_THREADS and the local world size."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from util.run import threads


@pytest.fixture(autouse=True)
def restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch):
    """No other work on the CPUs unless a test says otherwise (the real machine's load must not decide a test)."""
    monkeypatch.setattr(threads, "measured_once", lambda cpus: 0.0)


@pytest.fixture
def cgroup(tmp_path: Path):
    """configure_threads on a fake cgroup v2 root (cpu.max = the text given) and /proc/self/cgroup."""
    root = tmp_path / "cgroup"
    root.mkdir()
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("0::/\n")

    def configure(cpu_max: str | None = None, **environ: str) -> str:
        if cpu_max is not None:
            (root / "cpu.max").write_text(cpu_max + "\n")
        return threads.configure_threads(cgroup_root=root, proc_cgroup=proc, environ=environ)

    return configure


@pytest.fixture
def eight_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)


@pytest.mark.parametrize(
    "text, cpus", [("max 100000", None), ("150000 100000", 1.5), ("250000 100000", 2.5), ("50000 100000", 0.5)]
)
def test_parse_cpu_max(text, cpus):
    assert threads.parse_cpu_max(text) == cpus


def test_parse_cfs_v1():
    assert threads.parse_cfs("-1\n", "100000\n") is None
    assert threads.parse_cfs("200000\n", "100000\n") == 2.0


@pytest.mark.parametrize(
    "cpu_max, expected",
    [("max 100000", 8), ("150000 100000", 1), ("250000 100000", 2), ("50000 100000", 1), ("1600000 100000", 8)],
)
def test_quota_caps_affinity(cgroup, eight_cpus, cpu_max, expected):
    line = cgroup(cpu_max)
    assert torch.get_num_threads() == expected
    quota = "none" if cpu_max.startswith("max") else f"{int(cpu_max.split()[0]) / 100000:g} CPUs"
    assert line == f"threads: {expected} (8 CPUs allowed by affinity, cgroup quota {quota}; OMP_NUM_THREADS unset)"


def test_affinity_caps_without_quota(cgroup, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert cgroup() == "threads: 3 (3 CPUs allowed by affinity, cgroup quota none; OMP_NUM_THREADS unset)"
    assert torch.get_num_threads() == 3


def test_nested_cgroup_and_v1(tmp_path, eight_cpus):
    root, proc = tmp_path / "cg", tmp_path / "proc"
    (root / "job" / "step").mkdir(parents=True)
    (root / "job" / "cpu.max").write_text("300000 100000\n")  # the parent's quota bounds the child
    (root / "job" / "step" / "cpu.max").write_text("max 100000\n")
    proc.write_text("0::/job/step\n")
    assert threads.cgroup_cpu_quota(root, proc) == 3.0
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("4:cpu,cpuacct:/\n")
    assert threads.cgroup_cpu_quota(v1, proc) == 2.0


def test_omp_num_threads_is_honoured(cgroup, eight_cpus):
    torch.set_num_threads(3)
    assert cgroup("100000 100000", OMP_NUM_THREADS="3") == "threads: 3 (OMP_NUM_THREADS=3)"
    assert torch.get_num_threads() == 3  # not changed to the quota's 1


@pytest.mark.parametrize(
    "local, cpu_max, expected",
    [("2", "max 100000", 4), ("3", "max 100000", 2), ("4", "150000 100000", 1), ("16", "max 100000", 1)],
)
def test_divided_by_local_processes(cgroup, eight_cpus, local, cpu_max, expected):
    line = cgroup(cpu_max, LOCAL_WORLD_SIZE=local)
    assert torch.get_num_threads() == expected
    assert f", {local} processes on this node;" in line and line.startswith(f"threads: {expected} (")


def test_explicit_world_size_wins_over_environment(tmp_path, eight_cpus):
    proc = tmp_path / "proc"
    proc.write_text("")
    threads.configure_threads(2, cgroup_root=tmp_path, proc_cgroup=proc, environ={"LOCAL_WORLD_SIZE": "8"})
    assert torch.get_num_threads() == 4


# The decision table: (CPUs allowed by affinity, cgroup quota, other work in CPUs, processes on the node,
# OMP_NUM_THREADS) -> threads. Other work takes idle CPUs away, rounded half up; never below one thread.
@pytest.mark.parametrize(
    "affinity, quota, load, processes, omp, expected",
    [
        (2, None, 0.0, 1, None, 2),  # a quiet 2-core machine: both
        (2, None, 0.4, 1, None, 2),  # background noise leaves 1.6 idle: rounds to 2
        (2, None, 0.6, 1, None, 1),  # one other job's worth of work: 1 thread
        (2, None, 1.0, 1, None, 1),
        (2, None, 3.5, 1, None, 1),  # oversubscribed: still 1
        (2, None, None, 1, None, 2),  # load unknown (not Linux): affinity and quota only
        (8, 2.0, 5.0, 1, None, 2),  # the quota binds before the 3 idle CPUs do
        (8, None, 5.0, 1, None, 3),
        (8, None, 5.0, 2, None, 1),  # 3 idle CPUs shared by 2 DDP processes
        (8, None, 0.0, 2, None, 4),
        (16, None, 0.0, 32, None, 1),
        (2, None, 1.9, 1, "2", None),  # OMP_NUM_THREADS wins, whatever the load
        (2, None, 0.0, 1, " ", 2),  # blank counts as unset
    ],
)
def test_decision_table(affinity, quota, load, processes, omp, expected):
    chosen, reason = threads.choose_threads(affinity, quota, load, processes, omp)
    assert chosen == expected
    if omp and omp.strip():
        assert reason == f"OMP_NUM_THREADS={omp}"
    else:
        assert reason.startswith(f"{affinity} CPUs allowed by affinity") and reason.endswith("OMP_NUM_THREADS unset")
        busy = load is not None and chosen < max(1, int(min(affinity, quota or affinity)) // processes)
        assert ("busy at start-up" in reason) == busy  # said exactly when it decided the count
        assert not busy or f"other work kept {load:.1f} of them busy at start-up: {chosen} thread" in reason


def test_a_busy_machine_gets_fewer_threads_and_the_line_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    proc = tmp_path / "proc"
    proc.write_text("")
    line = threads.configure_threads(cgroup_root=tmp_path, proc_cgroup=proc, environ={}, load=lambda cpus: 1.7)
    assert torch.get_num_threads() == 1
    assert line == (
        "threads: 1 (2 CPUs allowed by affinity, cgroup quota none; other work kept 1.7 of them busy at start-up: "
        "1 thread; OMP_NUM_THREADS unset)"
    )


@pytest.mark.parametrize(
    ("affinity", "quota", "load", "processes", "expected"),
    [
        (2, None, 0.0, 1, 1),  # this machine: one CPU for the step, one worker
        (1, None, None, 1, 1),  # at least one worker: reading overlaps the step
        (16, None, 0.0, 8, 1),  # 8 GPUs on 16 cores: was 8 workers each, 4.5 processes per core
        (96, None, 0.0, 8, 11),  # 12 CPUs per GPU: 11 workers and the training process
        (96, 24.0, 0.0, 8, 2),  # the quota binds
        (32, None, 20.0, 1, 11),  # 12 idle CPUs: other work counts as for threads
        (32, None, None, 1, 31),
    ],
)
def test_default_workers_are_the_cpu_share_less_one(affinity, quota, load, processes, expected):
    workers, reason = threads.choose_workers(affinity, quota, load, processes)
    share, share_reason = threads.cpu_share(affinity, quota, load, processes)
    assert workers == expected == max(1, share - 1)
    assert reason.startswith(share_reason) and reason.endswith("one left to the training process")


def test_default_workers_read_this_machine_and_ignore_omp_num_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    proc = tmp_path / "proc"
    proc.write_text("")
    environ = {"LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "1"}
    workers, reason = threads.default_workers(cgroup_root=tmp_path, proc_cgroup=proc, environ=environ, load=lambda c: 0)
    assert workers == 3 and reason.startswith(
        "16 CPUs allowed by affinity, cgroup quota none, 4 processes on this node"
    )
    (tmp_path / "cpu.max").write_text("800000 100000")  # a container of 8 CPUs
    assert threads.default_workers(cgroup_root=tmp_path, proc_cgroup=proc, environ=environ, load=lambda c: 0)[0] == 1


def test_the_load_is_not_measured_when_omp_num_threads_decides(tmp_path):
    def measure(cpus):
        raise AssertionError("measured")

    proc = tmp_path / "proc"
    proc.write_text("")
    line = threads.configure_threads(
        cgroup_root=tmp_path, proc_cgroup=proc, environ={"OMP_NUM_THREADS": "1"}, load=measure
    )
    assert line == f"threads: {torch.get_num_threads()} (OMP_NUM_THREADS=1)"


def stat(*cpus: tuple[int, int, int, int]) -> str:
    """/proc/stat text of CPUs given as (user, idle, iowait, steal) ticks."""
    lines = ["cpu  1 2 3 4 5 6 7 8 0 0"]  # the all-CPU line is not read
    lines += [
        f"cpu{i} {user} 0 0 {idle} {iowait} 0 0 {steal} 0 0" for i, (user, idle, iowait, steal) in enumerate(cpus)
    ]
    return "\n".join([*lines, "intr 1 2", "", "ctxt 3"]) + "\n"


def test_cpu_ticks_count_only_the_cpus_given():
    text = stat((30, 70, 0, 0), (10, 80, 5, 5))
    assert threads.cpu_ticks(text, {0}) == (30, 100)
    assert threads.cpu_ticks(text, {1}) == (15, 100)  # steal is busy, iowait idle
    assert threads.cpu_ticks(text, {0, 1}) == (45, 200)
    assert threads.cpu_ticks(text, {7}) == (0, 0)


class Snapshots:
    """A /proc/stat that reads as each text in turn."""

    def __init__(self, *texts):
        self.texts = list(texts)

    def read_text(self):
        return self.texts.pop(0)


def test_other_work_is_busy_time_over_elapsed_ticks_less_this_process(monkeypatch):
    before = stat((0, 0, 0, 0), (0, 0, 0, 0))
    after = stat((100, 0, 0, 0), (40, 50, 0, 10))  # cpu0 busy throughout, cpu1 half (steal counts as busy)
    clocks = {"process_time": iter([0.0, 0.5]), "monotonic": iter([0.0, 1.0])}  # this process: half a CPU for 1 s
    for name, values in clocks.items():
        monkeypatch.setattr(threads.time, name, lambda values=values: next(values))
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: None)
    assert threads.other_work({0, 1}, 1.0, Snapshots(before, after)) == pytest.approx(1.5 - 0.5)
    assert threads.other_work({0}, 0.0, Path("/nonexistent/stat")) is None  # not Linux: unknown


@pytest.mark.parametrize(
    "now, load_average, expected",
    [
        (1.8, 0.1, 0.1),  # a burst (another process starting): the load average hardly moved
        (0.1, 2.5, 0.1),  # a previous run just ended: the CPUs are idle now
        (1.6, 1.9, 1.6),  # another job running all along
        (None, 1.9, None),  # /proc/stat unreadable: unknown
    ],
)
def test_only_work_that_lasts_counts(monkeypatch, now, load_average, expected):
    monkeypatch.undo()  # the real measured_once, not the quiet machine's
    monkeypatch.setattr(threads, "_MEASURED", {})
    monkeypatch.setattr(threads, "other_work", lambda cpus: now)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load_average, 0.0, 0.0))
    assert threads.measured_once({0, 1}) == expected
    monkeypatch.setattr(threads, "other_work", lambda cpus: 9.9)
    assert threads.measured_once({0, 1}) == expected  # once per process
