"""Crashes, pre-emption, bad input and distributed failures, each with the message or state it must produce."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import HANG_GUARD_S, REPO, run_expecting_error, write_csv_dataset
from PIL import Image

import main_pretrain
from util import config
from util.run import checkpoint
from util.run.process import run_entry_point

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# 64 images of 64 px in batches of 4: 16 steps per epoch, slow enough to be interrupted mid-epoch
SLOW_RUN = [
    "main_pretrain.py",
    "--model",
    "cross_scale_mae_vit_tiny",
    "--input_size",
    "64",
    "--patch_size",
    "8",
    "--batch_size",
    "4",
    "--epochs",
    "2",
    "--warmup_epochs",
    "1",
    "--num_workers",
    "0",
    "--blr",
    "1e-3",
    "--log_every",
    "1",
    "--amp",
    "none",
]


@pytest.fixture(scope="module")
def slow_data(tmp_path_factory):
    return write_csv_dataset(tmp_path_factory.mktemp("slow"), 64, "train.csv", size=72)


def start(argv, out):
    return subprocess.Popen(
        [sys.executable, *argv, "--output_dir", str(out)],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(process, text):
    """Read the process's output until a line contains ``text``; returns everything read."""
    seen, deadline = [], time.time() + HANG_GUARD_S
    for line in process.stdout:
        seen.append(line)
        if text in line or time.time() > deadline:
            break
    return "".join(seen)


def finish(argv, out):
    result = subprocess.run(
        [sys.executable, *argv, "--output_dir", str(out)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-1500:]
    return result.stdout


def final_weights(out):
    return checkpoint.read_checkpoint(out / "checkpoint-last.pth")["model"]


@pytest.fixture(scope="module")
def uninterrupted(slow_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    finish([*SLOW_RUN, "--train_path", str(slow_data)], out)
    return final_weights(out)


def assert_same_weights(got, expected):
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_sigterm_saves_at_the_next_step_and_resume_continues_identically(slow_data, uninterrupted, tmp_path):
    argv = [*SLOW_RUN, "--train_path", str(slow_data)]
    process = start(argv, tmp_path)
    wait_for(process, "epoch 1 [3/16]")
    process.send_signal(signal.SIGTERM)
    output = process.stdout.read()
    assert process.wait(timeout=HANG_GUARD_S) == 128 + signal.SIGTERM, output  # stopped early: never status 0
    assert "SIGTERM: stopped at epoch 1 step" in output and "(exit status 143)" in output
    state = checkpoint.read_checkpoint(tmp_path / "checkpoint-last.pth")
    assert state["epoch"] == 0 and 3 <= state["next_step"] < 16
    resumed = finish([*argv, "--resume", "auto"], tmp_path)
    assert f"continuing at epoch 1 step {state['next_step']}" in resumed
    assert_same_weights(final_weights(tmp_path), uninterrupted)


def test_sigkill_then_resume_auto_skips_half_written_files_and_ends_identically(slow_data, uninterrupted, tmp_path):
    argv = [*SLOW_RUN, "--train_path", str(slow_data), "--save_every", "1"]
    process = start(argv, tmp_path)
    wait_for(process, "epoch 1 [5/16]")
    process.kill()
    process.wait(timeout=HANG_GUARD_S)
    good = tmp_path / "checkpoint-last.pth"
    (tmp_path / ".checkpoint-last.pth.abc123.tmp").write_bytes(good.read_bytes()[:1000])  # a write cut short
    (tmp_path / "checkpoint-7.pth").write_bytes(good.read_bytes()[:5000])  # a newer, truncated file
    resumed = finish([*argv, "--resume", "auto"], tmp_path)
    assert "resume: skipping" in resumed and "checkpoint-7.pth: not a readable PyTorch checkpoint" in resumed
    assert "continuing at epoch 1" in resumed
    assert_same_weights(final_weights(tmp_path), uninterrupted)


def test_failed_checkpoint_write_is_reported_and_keeps_the_previous_file(csv_dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    flags = [
        "--model",
        "mae_vit_tiny",
        "--input_size",
        "32",
        "--patch_size",
        "8",
        "--batch_size",
        "4",
        "--num_workers",
        "0",
        "--train_path",
        str(csv_dataset),
        "--output_dir",
        str(out),
    ]
    main_pretrain.main(config.parse_args(main_pretrain.get_args_parser(), [*flags, "--epochs", "1"]))
    before = (out / "checkpoint-last.pth").read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if str(getattr(f, "name", f)).endswith(".tmp"):  # a path or an open file (the export's .pth)
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit, match=r"error: could not write .*encoder.pth: No space left on device"):
        run_entry_point(
            main_pretrain.main,
            config.parse_args(
                main_pretrain.get_args_parser(), [*flags, "--epochs", "2", "--resume", "auto", "--allow_changed_flags"]
            ),
        )
    assert (
        "warning: could not write " + str(out / "checkpoint-last.pth") + ": No space left on device"
        in capsys.readouterr().out
    )
    assert (out / "checkpoint-last.pth").read_bytes() == before
    assert not list(out.glob(".*.tmp"))


TINY = ["--model", "mae_vit_tiny", "--input_size", "32", "--patch_size", "8", "--batch_size", "4", "--epochs", "1"]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_corrupt_image_names_file_and_row_and_can_be_skipped(csv_dataset, tmp_path, capfd, workers):
    image = csv_dataset.parent / "images" / "train_3.jpg"
    image.write_bytes(image.read_bytes()[:100])
    argv = [*TINY, "--num_workers", workers, "--train_path", str(csv_dataset), "--output_dir", str(tmp_path / "o")]
    message = run_expecting_error(argv)
    assert "train_3.jpg (row 5 of" in message and "cannot read image" in message
    main_pretrain.main(config.parse_args(main_pretrain.get_args_parser(), [*argv, "--skip_bad_images"]))
    assert "warning: skipped " in capfd.readouterr().err and (tmp_path / "o" / "checkpoint-last.pth").exists()


def test_missing_image_and_empty_dataset(tmp_path):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("label,path\n0,gone.jpg\n")
    assert "gone.jpg" in run_expecting_error(
        [*TINY, "--train_path", str(csv_path), "--output_dir", str(tmp_path / "o")]
    )
    (tmp_path / "empty").mkdir()
    assert "no images found" in run_expecting_error(
        [*TINY, "--train_path", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o")]
    )


def test_small_grayscale_rgba_and_16_bit_images_train(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("L", (20, 20), 90).save(folder / "gray_small.png")
    Image.new("RGBA", (48, 40), (1, 2, 3, 4)).save(folder / "rgba.png")
    Image.fromarray((torch.arange(48 * 48).reshape(48, 48) * 20).numpy().astype("uint16")).save(folder / "sixteen.png")
    Image.new("RGB", (10, 30), (200, 10, 10)).save(folder / "tiny.jpg")
    main_pretrain.main(
        config.parse_args(
            main_pretrain.get_args_parser(),
            [
                *TINY,
                "--num_workers",
                "0",
                "--stretch",
                "--train_path",
                str(folder),
                "--output_dir",
                str(tmp_path / "o"),
            ],
        )
    )
    assert (tmp_path / "o" / "checkpoint-last.pth").exists()


def test_resuming_from_a_checkpoint_of_another_size_is_refused(csv_dataset, tmp_path):
    other = tmp_path / "other"
    main_pretrain.main(
        config.parse_args(
            main_pretrain.get_args_parser(),
            [*TINY, "--num_workers", "0", "--train_path", str(csv_dataset), "--output_dir", str(other)],
        )
    )
    argv = [
        *TINY,
        "--model",
        "mae_vit_small",
        "--num_workers",
        "0",
        "--train_path",
        str(csv_dataset),
        "--output_dir",
        str(tmp_path / "o"),
        "--resume",
        str(other / "checkpoint-last.pth"),
    ]
    assert "checkpoint-last.pth: cannot resume this run from it" in run_expecting_error(argv)


def test_truncated_resume_checkpoint_is_named(csv_dataset, tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"PK\x03\x04 not really")
    argv = [
        *TINY,
        "--num_workers",
        "0",
        "--train_path",
        str(csv_dataset),
        "--output_dir",
        str(tmp_path / "o"),
        "--resume",
        str(broken),
    ]
    assert "broken.pth: not a readable PyTorch checkpoint" in run_expecting_error(argv)


def test_unusable_device_and_amp_flags(csv_dataset, tmp_path):
    base = [*TINY, "--num_workers", "0", "--train_path", str(csv_dataset), "--output_dir", str(tmp_path / "o")]
    if not torch.cuda.is_available():
        assert "--device cuda: CUDA is not available" in run_expecting_error([*base, "--device", "cuda"])
        assert "--amp fp16: fp16 is emulated and very slow on CPUs" in run_expecting_error([*base, "--amp", "fp16"])
    assert "--device gpu0: not a device name" in run_expecting_error([*base, "--device", "gpu0"])


def torchrun(argv, out):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            *argv,
            "--output_dir",
            str(out),
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )


def test_a_failing_rank_ends_the_whole_job_with_its_error(tmp_path):
    data = write_csv_dataset(tmp_path / "data", 8, "train.csv", size=32)
    for i in range(8):
        if i % 2:
            image = data.parent / "images" / f"train_{i}.jpg"
            image.write_bytes(b"not a jpeg")
    result = torchrun(
        [*SLOW_RUN[:1], *TINY, "--batch_size", "2", "--num_workers", "0", "--train_path", str(data)], tmp_path / "o"
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "cannot read image" in output
    # ended by the failing rank itself, not by the other rank's collective timing out (--dist_timeout, 30 minutes)
    assert "timed out" not in output.lower() and "timeout" not in output.lower()


def test_two_process_run_resumed_from_a_checkpoint_continues_identically(tmp_path):
    data = write_csv_dataset(tmp_path / "data", 16, "train.csv", size=32)
    argv = [
        *SLOW_RUN[:1],
        "--model",
        "cross_scale_mae_vit_tiny",
        "--input_size",
        "32",
        "--patch_size",
        "8",
        "--batch_size",
        "2",
        "--epochs",
        "2",
        "--warmup_epochs",
        "1",
        "--num_workers",
        "0",
        "--train_path",
        str(data),
        "--save_every",
        "1",
    ]
    straight = torchrun(argv, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    resumed = torchrun([*argv, "--resume", str(tmp_path / "straight" / "checkpoint-0.pth")], tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "continuing at epoch 1" in resumed.stdout
    assert_same_weights(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "straight"))


def test_sigterm_to_the_whole_process_group_with_workers_checkpoints_and_resumes(slow_data, tmp_path):
    """What SLURM does: every process of the job step, DataLoader workers included, gets SIGTERM."""
    argv = [*SLOW_RUN, "--train_path", str(slow_data), "--num_workers", "2"]
    process = subprocess.Popen(
        [sys.executable, *argv, "--output_dir", str(tmp_path)],
        cwd=REPO,
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    seen = wait_for(process, "epoch 0 [3/16]")
    os.killpg(process.pid, signal.SIGTERM)
    output = seen + process.stdout.read()
    assert process.wait(timeout=HANG_GUARD_S) == 128 + signal.SIGTERM, output[-2000:]
    assert "SIGTERM: stopped at epoch 0 step" in output and "Traceback" not in output
    resumed = finish([*argv, "--resume", "auto", "--epochs", "1", "--allow_changed_flags"], tmp_path)
    assert "continuing at epoch 0 step" in resumed
