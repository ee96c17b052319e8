import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import HANG_GUARD_S, REPO
from PIL import Image

import main_pretrain
from model_loading import load_mae
from models_cross_scale_mae import create_model
from util import config
from util.eval.figures import MIN_CELL_PX
from util.run.checkpoint import read_checkpoint, save_checkpoint
from util.run.process import run_entry_point

TINY_RUN = [
    "--model",
    "cross_scale_mae_vit_tiny",
    "--input_size",
    "32",
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
]


def run(argv):
    main_pretrain.main(config.parse_args(main_pretrain.get_args_parser(), argv))


def test_two_epochs_write_checkpoints_logs_plots_and_export(csv_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    run(
        [
            *TINY_RUN,
            "--train_path",
            str(csv_dataset),
            "--output_dir",
            str(out),
            "--save_every",
            "1",
            "--plot_every",
            "2",
            "--knn_eval_every",
            "2",
            "--knn_train_path",
            str(csv_dataset),
            "--knn_test_path",
            str(csv_dataset),
        ]
    )
    names = {p.name for p in out.iterdir()}
    assert {
        "checkpoint-0.pth",
        "checkpoint-1.pth",
        "checkpoint-last.pth",
        "config.yaml",
        "log.txt",
        "encoder.pth",
        "encoder",
    } <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert [p.name for p in (out / "plots").iterdir()] == ["reconstruction_epoch0001.png"]
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert "run_start" in log[0] and log[0]["resumed_from"] is None  # run boundaries are marked
    log = log[1:]
    assert [entry["epoch"] for entry in log] == [0, 1]
    assert set(log[0]) >= {"train_loss", "train_rec_orig", "train_rec_crop", "train_cross_pred", "train_cross_cons"}
    assert "knn_weighted_0.125" not in log[0] and 0 <= log[1]["knn_majority_1"] <= 100
    state = read_checkpoint(out / "checkpoint-last.pth")
    assert state["epoch"] == 1 and isinstance(state["args"], dict) and "rng_per_rank" in state
    model, report = load_mae(out / "checkpoint-last.pth")
    assert report.model_name == "cross_scale_mae_vit_tiny" and report.layout == "ours"
    printed = capsys.readouterr().out
    assert "epoch 1 [2/2] loss" in printed and "img/s" in printed and "eta" in printed
    # 2 steps timed: too few for an ETA (tests/unit/run/test_loop.py checks the numbers once there are enough)
    assert re.search(
        r"^epoch 0 done in \d:\d\d:\d\d\.\d \(.* over 2 steps\); run eta estimating \(1 of 2 epochs left\)$",
        printed,
        re.M,
    )
    assert re.search(r"^training time \d:\d\d:\d\d\.\d \(2 epoch\(s\) in this run\)$", printed, re.M)
    assert "kNN evaluation features: 0/" in printed  # progress of kNN feature extraction, as plain lines (no terminal)
    assert Image.open(out / "plots" / "reconstruction_epoch0001.png").size[0] == 6 * MIN_CELL_PX  # 6 titled columns
    exported = json.loads((out / "encoder" / "config.json").read_text())  # timm's layout, with the run's metadata
    assert exported["model_args"]["depth"] == 4 and exported["remote_sensing"]["model"]["epochs"] == 2
    assert [b["name"] for b in exported["remote_sensing"]["bands"]] == ["RED", "GREEN", "BLUE"]  # the 8-bit RGB path
    assert "timm: create_model('local-dir:" in printed
    assert "epoch 1 kNN top-1: weighted_0.125" in printed


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(csv_dataset, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run([*TINY_RUN, "--train_path", str(csv_dataset), "--output_dir", str(straight)])
    run([*TINY_RUN, "--train_path", str(csv_dataset), "--output_dir", str(interrupted), "--save_every", "1"])
    resumed = tmp_path / "resumed"
    run(
        [
            *TINY_RUN,
            "--train_path",
            str(csv_dataset),
            "--output_dir",
            str(resumed),
            "--resume",
            str(interrupted / "checkpoint-0.pth"),
        ]
    )
    expected = read_checkpoint(straight / "checkpoint-last.pth")["model"]
    got = read_checkpoint(resumed / "checkpoint-last.pth")["model"]
    assert read_checkpoint(resumed / "checkpoint-last.pth")["epoch"] == 1
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_resume_auto_continues_where_the_last_run_stopped(csv_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    run([*TINY_RUN, "--train_path", str(csv_dataset), "--output_dir", str(out), "--epochs", "1"])
    run([*TINY_RUN, "--train_path", str(csv_dataset), "--output_dir", str(out), "--epochs", "1", "--resume", "auto"])
    assert "continuing at epoch 1" in capsys.readouterr().out
    assert read_checkpoint(out / "checkpoint-last.pth")["epoch"] == 0  # nothing left to train


def test_init_from_an_rgb_checkpoint_pretrains_a_four_band_model_from_epoch_0(tmp_path, capsys):
    import numpy as np
    import tifffile

    torch.manual_seed(0)
    rgb = create_model("cross_scale_mae_vit_tiny", input_size=32, patch_size=8)
    save_checkpoint({"model": rgb.state_dict(), "model_config": rgb.model_config, "epoch": 399}, tmp_path / "rgb.pth")
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        tifffile.imwrite(
            tiles / f"t{i}.tif", rng.integers(0, 3000, (4, 40, 40)).astype(np.uint16), photometric="minisblack"
        )
    out = tmp_path / "out"
    argv = [
        *TINY_RUN,
        "--epochs",
        "1",
        "--in_chans",
        "4",
        "--mean",
        *["1500"] * 4,
        "--std",
        *["900"] * 4,
        "--train_path",
        str(tiles),
        "--output_dir",
        str(out),
        "--init",
        str(tmp_path / "rgb.pth"),
    ]
    with pytest.raises(SystemExit) as info:
        run_entry_point(main_pretrain.main, config.parse_args(main_pretrain.get_args_parser(), argv))
    assert str(info.value).startswith(f"error: {tmp_path / 'rgb.pth'}: the checkpoint takes 3 input bands, the model 4")
    assert "--rgb_bands" in str(info.value) and "\n" not in str(info.value)

    run([*argv, "--rgb_bands", "2", "1", "0"])
    printed = capsys.readouterr().out
    assert "adapted patch_embed.proj: 3 RGB filters -> bands 2 1 0 of 4, other 1 band zero" in printed
    assert "adapted decoder_pred: 3 RGB outputs -> bands 2 1 0 of 4, other 1 band zero" in printed
    state = read_checkpoint(out / "checkpoint-last.pth")
    assert state["epoch"] == 0  # initialisation, not a resume of the checkpoint's 400 epochs
    assert state["model"]["encoder.patch_embed.proj.weight"].shape == (128, 4, 8, 8)
    log = json.loads((out / "log.txt").read_text().splitlines()[0])
    assert log["initialised_from"] == str(tmp_path / "rgb.pth") and log["start_epoch"] == 0

    run([*argv, "--rgb_bands", "2", "1", "0", "--resume", "auto"])  # a relaunch continues its own weights
    assert (
        f"note: --init {tmp_path / 'rgb.pth'} ignored: resumed from {out / 'checkpoint-last.pth'}"
        in capsys.readouterr().out
    )


def test_config_file_values_are_defaults_that_flags_override(csv_dataset, tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        yaml.safe_dump({"epochs": 1, "batch_size": 8, "mask_ratio": 0.5, "train_path": str(csv_dataset)})
    )
    out = tmp_path / "run"
    args = config.parse_args(
        main_pretrain.get_args_parser(), [*TINY_RUN, "--config", str(config_file), "--output_dir", str(out)]
    )
    assert (args.epochs, args.batch_size, args.mask_ratio) == (2, 4, 0.5)
    main_pretrain.main(args)
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["mask_ratio"] == 0.5 and resolved["batch_size"] == 4
    assert resolved["lr"] is None  # derived from --blr: what the user gave, so the linear scaling rule keeps applying
    again = config.parse_args(
        main_pretrain.get_args_parser(), ["--config", str(out / "config.yaml"), "--batch_size", "8"]
    )
    assert config.training_schedule(again, 1).lr == pytest.approx(1e-3 * 8 / 256)


def test_unknown_config_key_is_named(tmp_path, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("epoch: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        config.parse_args(main_pretrain.get_args_parser(), ["--config", str(config_file)])
    assert str(exit_info.value) == f"error: --config {config_file}: unknown key(s) epoch"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--input_size", "30"], "--input_size 30 is not divisible by --patch_size 8"),
        (["--mask_ratio", "1.0"], "--mask_ratio must be in (0, 1)"),
        (["--batch_size", "1"], "--batch_size must be at least 2 per device"),
        (["--accum_iter", "0"], "--accum_iter must be at least 1"),
        (["--loss_weights", "contrast=1"], "--loss_weights: unknown term(s) contrast; known: rec, cross_pred"),
        (["--batch_size", "64"], "--batch_size 64 x 1 process(es) is more than the 8 training images"),
        (["--clip_grad", "-1"], "--clip_grad must be > 0 (or left out: no clipping), got -1.0"),
        (["--clip_grad", "0"], "--clip_grad must be > 0 (or left out: no clipping), got 0.0"),
    ],
)
def test_bad_flags_give_one_line_errors(csv_dataset, tmp_path, flags, message):
    argv = [*TINY_RUN, "--train_path", str(csv_dataset), "--output_dir", str(tmp_path / "o"), *flags]
    with pytest.raises(SystemExit) as exit_info:
        run_entry_point(main_pretrain.main, config.parse_args(main_pretrain.get_args_parser(), argv))
    assert str(exit_info.value).startswith(f"error: {message}")
    assert "\n" not in str(exit_info.value)


def test_nan_loss_stops_with_step_and_term(csv_dataset, tmp_path, monkeypatch):
    import engine_pretrain

    original = engine_pretrain.models_mae.cross_scale_contrastive_loss

    def broken(*args, **kwargs):
        return original(*args, **kwargs) * float("nan")

    monkeypatch.setattr(engine_pretrain.models_mae, "cross_scale_contrastive_loss", broken)
    argv = [*TINY_RUN, "--train_path", str(csv_dataset), "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=r"error: epoch 0, steps 0-0: loss term\(s\) loss, cross_cons became nan"):
        run_entry_point(main_pretrain.main, config.parse_args(main_pretrain.get_args_parser(), argv))


def test_two_process_gloo_run_ends_with_identical_weights(csv_dataset, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "main_pretrain.py",
            *TINY_RUN,
            "--batch_size",
            "2",
            "--train_path",
            str(csv_dataset),
            "--output_dir",
            str(out),
            "--gather_negatives",
            "--sync_bn",
            "--accum_iter",
            "2",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "weights identical on all 2 processes" in result.stdout
    assert "2 process(es)" in result.stdout and "[2/2]" in result.stdout  # 8 images / (2 x 2) = 2 steps
    assert "effective batch 8" in result.stdout  # 2 per process x 2 processes x --accum_iter 2
    assert len(read_checkpoint(out / "checkpoint-last.pth")["rng_per_rank"]) == 2


@pytest.mark.cuda
def test_one_epoch_on_the_gpu_with_bf16_autocast(csv_dataset, tmp_path, capsys, cuda_device):
    run(
        [
            *TINY_RUN,
            "--epochs",
            "1",
            "--device",
            str(cuda_device),
            "--amp",
            "bf16",
            "--train_path",
            str(csv_dataset),
            "--output_dir",
            str(tmp_path / "gpu"),
        ]
    )
    printed = capsys.readouterr().out
    assert f"device {cuda_device}" in printed and "autocast torch.bfloat16" in printed
    state = read_checkpoint(tmp_path / "gpu" / "checkpoint-last.pth")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
