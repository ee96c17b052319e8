"""util.run.threads: the thread count from affinity, the cgroup CPU quota, OMP_NUM_THREADS and the local world size."""

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
