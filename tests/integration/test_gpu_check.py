"""benchmarks/gpu_check.sh in its CPU dry run: every stage runs at toy size (the cuda-marked tests on the CPU), the
summary lists each as passed, and the results folder holds the summary and a log archive without checkpoints."""

import os
import subprocess
import sys
import tarfile

from conftest import HANG_GUARD_S, REPO

STAGES = ("pytest_cuda", "bench_pretrain", "cuda_paths", "pretrain_loop", "torchrun_resume")


def test_gpu_check_dry_run_passes_every_stage(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path)}
    env.pop("GPU_CHECK_OUT", None)
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-2000:]
    assert out.index("torch 2.") < out.index("=== pytest_cuda")  # the environment comes first
    summary = out[out.index("gpu_check summary") :]
    assert "CPU dry run" in summary and "timm " in summary and "torchvision " in summary
    rows = {
        line.split("|")[0].strip(): [cell.strip() for cell in line.split("|")[1:]]
        for line in summary.splitlines()
        if "|" in line
    }
    for stage in STAGES:
        status, seconds, description = rows[stage]
        assert status == "PASS", (stage, description, out[-4000:])
        assert description and int(seconds) >= 0
    assert "bench_data" not in rows  # CPU-only: no GPU time spent on it
    assert " passed" in rows["pytest_cuda"][2] and "0 passed" not in rows["pytest_cuda"][2]
    bench = rows["bench_pretrain"][2]
    assert "MFU" in bench and "compiled:" in bench and "speed-up over upstream" in bench
    assert "% of the datasheet float32 peak (67 TFLOP/s)" in bench and "target >= 45 % of the datasheet" in bench
    assert "on-device data path" in rows["cuda_paths"][2]
    assert "logged" in rows["pretrain_loop"][2] and "end-to-end MFU" in rows["pretrain_loop"][2]
    assert "of the datasheet peak" in rows["pretrain_loop"][2]  # the dry run takes the GPU run's path (an H100's)
    assert (
        "--accum_iter 2" in rows["torchrun_resume"][2]
        and "resumed eagerly: continuing at epoch" in rows["torchrun_resume"][2]
    )
    assert "Not verified by one GPU" in summary
    assert (tmp_path / "summary.txt").read_text().startswith("gpu_check summary")
    with tarfile.open(tmp_path / "gpu_check_logs.tar.gz") as archive:
        names = archive.getnames()
    assert "logs/pytest_cuda.log" in names and "logs/environment.txt" in names
    assert not [name for name in names if name.endswith((".pth", ".u8", ".u16"))]  # logs only


def _dry_run_start(cwd, *args, **env):
    """gpu_check.sh ``args`` (default: --dry-run) started from ``cwd`` with ``env`` over this environment (values
    None: unset)."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    full = {key: value for key, value in full.items() if value is not None}
    return subprocess.run(
        ["bash", str(REPO / "benchmarks/gpu_check.sh"), *(args or ["--dry-run"])],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )


def test_gpu_check_refuses_an_unwritable_results_folder_before_any_stage(tmp_path):
    (tmp_path / "a_file").write_text("")
    # relative to the caller's folder (the script changes to the repository's): resolved there, named in full
    result = _dry_run_start(tmp_path, PYTHON=sys.executable, OUT="a_file/results", GPU_CHECK_OUT=None)
    assert result.returncode == 1
    assert f"error: results folder {tmp_path}/a_file/results (GPU_CHECK_OUT / OUT) cannot be written" in result.stderr
    assert "=== " not in result.stdout  # no stage ran
    assert not (REPO / "a_file").exists()


def test_gpu_check_names_an_interpreter_it_cannot_use(tmp_path):
    result = _dry_run_start(tmp_path, PYTHON="venv/bin/python", OUT=str(tmp_path))
    assert result.returncode == 1
    assert f"error: PYTHON={tmp_path}/venv/bin/python: no such interpreter" in result.stderr
    torchless = tmp_path / "python"  # an interpreter without torch (a bare system python3): not "CUDA is not available"
    torchless.write_text("#!/bin/sh\nexec /bin/false\n")
    torchless.chmod(0o755)
    result = _dry_run_start(tmp_path, PYTHON=str(torchless), OUT=str(tmp_path))
    assert result.returncode == 1 and "cannot import torch" in result.stderr
    assert "CUDA is not available" not in result.stdout


def test_gpu_check_refuses_an_argument_it_does_not_know(tmp_path):
    for args in (["--dryrun"], ["--dry-run", "extra"]):  # a typo ran the full check on a GPU
        result = _dry_run_start(tmp_path, *args, PYTHON=sys.executable, OUT=str(tmp_path))
        assert result.returncode == 2 and "error: unknown argument(s)" in result.stderr, result.stderr
        assert "usage: bash benchmarks/gpu_check.sh [--dry-run]" in result.stderr and not result.stdout
