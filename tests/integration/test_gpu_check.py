"""benchmarks/gpu_check.sh in its CPU dry run: every stage runs at toy size and the summary lists it as passed."""

import os
import subprocess
import sys

from conftest import HANG_GUARD_S, REPO

STAGES = ("pytest_cuda", "bench_pretrain", "bench_pretrain_compile", "cuda_paths", "bench_data", "torchrun_resume")


def test_gpu_check_dry_run_passes_every_stage(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "GPU_CHECK_LOGS": str(tmp_path)}
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
    summary = out[out.index("gpu_check summary") :]
    assert "CPU dry run" in summary
    rows = {
        line.split("|")[0].strip(): [cell.strip() for cell in line.split("|")[1:]]
        for line in summary.splitlines()
        if "|" in line
    }
    for stage in STAGES:
        status, seconds, description = rows[stage]
        assert status == "PASS", (stage, description, out[-4000:])
        assert description and int(seconds) >= 0
    assert "MFU" in rows["bench_pretrain"][2] and "speed-up over upstream" in rows["bench_pretrain"][2]
    assert "img/s" in rows["bench_data"][2] and "on-device data path" in rows["cuda_paths"][2]
    assert "resumed: continuing at epoch" in rows["torchrun_resume"][2]
