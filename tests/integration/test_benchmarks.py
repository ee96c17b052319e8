import importlib.util
import subprocess
import sys

import pytest
import torch
from conftest import HANG_GUARD_S, REPO


def test_pretrain_benchmark_prints_every_field_and_the_speed_up():
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_pretrain.py",
            "--model",
            "cross_scale_mae_vit_tiny",
            "--input_size",
            "32",
            "--patch_size",
            "8",
            "--batch_size",
            "4",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--matmul_size",
            "128",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for field in (
        "matmul",
        "median step",
        "img/s",
        "peak memory",
        "FLOPs per image",
        "achieved",
        "MFU",
        "upstream execution",
        "speed-up over upstream execution",
    ):
        assert field in out, field
    per_image = [float(line.split()[3]) for line in out.splitlines() if "FLOPs per image" in line]
    assert len(per_image) == 2 and 0.7 < per_image[0] < 0.9  # the same model, whichever execution
    assert abs(per_image[0] - per_image[1]) / per_image[1] < 0.03


def test_data_benchmark_reports_each_pipeline_before_and_now():
    tiny = ["--input_size", "32", "--tiles", "4", "--large_size", "64", "--batch_size", "4", "--seconds", "0.05"]
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_data.py", *tiny, "--rounds", "1", "--streaming"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr
    rows = {line[:42].strip(): line[42:].split() for line in result.stdout.splitlines()}
    for pipeline in ("JPEG, pre-resized (32 px)", "JPEG, large (64 px, PIL draft)", "GeoTIFF uint16 13-band (zlib)"):
        before, now, ratio, copied, workers = rows[pipeline]
        assert before == now and float(now) > 0 and ratio == "one-path" and float(copied) > 0 and int(workers) >= 1
    for pipeline in ("packed uint8 RGB", "shards uint8 RGB", "packed uint16 13-band", "shards uint16 13-band"):
        before, now, ratio, copied, workers = rows[pipeline]
        assert float(before) > 0 and float(now) > 0 and ratio.endswith("x") and float(copied) > 0 and int(workers) >= 1
    assert "delivered to the training process by a DataLoader of 1 worker" in result.stdout
    for stream in ("shards streamed by webdataset, local disk", "shards streamed by webdataset, http://127.0.0.1"):
        assert stream in result.stdout


@pytest.mark.parametrize(
    "name, dtype, part, tflops",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, "H100 SXM", 989.0),
        ("NVIDIA H100 PCIe", torch.bfloat16, "H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", torch.float16, "H100 NVL", 835.0),
        ("NVIDIA H200", torch.bfloat16, "H200 SXM", 989.0),
        ("NVIDIA GH200 480GB", torch.bfloat16, "GH200", 989.0),
        ("NVIDIA H100 80GB HBM3", torch.float32, "H100 SXM", 67.0),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, "A100", 312.0),
    ],
)
def test_mfu_is_judged_against_the_datasheet_peak_of_the_named_gpu(name, dtype, part, tflops):
    spec = importlib.util.spec_from_file_location("bench_pretrain", REPO / "benchmarks" / "bench_pretrain.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.datasheet_peak(name, dtype) == (part, tflops * 1e12)
    assert bench.datasheet_peak("Tesla V100-SXM2-32GB", dtype) is None  # not in the table: the measured matmul only


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--workers", "0"], "error: --workers must be at least 1, got 0"),  # was a ZeroDivisionError at the end
        (["--seconds", "0"], "error: --seconds must be > 0, got 0.0"),
        (["--source", "EMPTY"], "no .jpg images in it"),  # was preprocess's CalledProcessError traceback
    ],
)
def test_data_benchmark_refuses_flags_it_cannot_measure_with_in_one_line(tmp_path, flags, error):
    flags = [str(tmp_path) if flag == "EMPTY" else flag for flag in flags]
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_data.py", "--input_size", "16", "--tiles", "2", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 1 and error in result.stderr, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--size", "0"], "error: --size must be at least 1, got 0"),  # was an array of 0-px images, exit 0
        (["--distinct", "0"], "error: --distinct must be at least 1, got 0"),  # was a ZeroDivisionError
        (["--nodata", "300"], "error: --nodata 300 is outside the range of uint8"),
    ],
)
def test_synthetic_packed_array_refuses_what_it_cannot_write(tmp_path, flags, error):
    result = subprocess.run(
        [sys.executable, "benchmarks/synthetic_packed.py", str(tmp_path / "x"), "--count", "4", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 1 and result.stderr == error + "\n", result.stderr
    assert not (tmp_path / "x.json").exists()
