"""main_segment.py / engine_segment.py end to end on an easy synthetic task: left of a random column class 0
(reddish), right of it class 1 (bluish); a short run must beat chance by far and write its outputs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import HANG_GUARD_S, REPO
from PIL import Image

pytest.importorskip("segmentation_models_pytorch")  # UperNet: every test here builds a segmenter

import main_segment
from util import config
from util.data import segmentation
from util.run import checkpoint

COMMON = [
    "--input_size",
    "32",
    "--batch_size",
    "8",
    "--num_workers",
    "0",
    "--log_every",
    "2",
    "--warmup_epochs",
    "1",
    "--palette",
    "none",
    "--class_names",
    "left",
    "right",
    "--decoder_channels",
    "32",
    "--drop_path",
    "0",
]


def write_split(root, count, seed, names=None, size=32):
    """``count`` image / mask pairs of ``size`` px named 000.png, ... (or ``names``)."""
    rng = np.random.default_rng(seed)
    for name in names or [f"{i:03d}" for i in range(count)]:
        column = int(rng.integers(8, 25))
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[:, column:] = 1
        mask[0, :4] = 255  # a few ignored pixels
        image = np.where(mask[..., None] == 1, [60, 80, 200], [200, 70, 60]) + rng.normal(0, 20, (size, size, 3))
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"{name}.png")
        segmentation.write_mask(root / "masks" / f"{name}.png", mask)
    return root


@pytest.fixture
def split(tmp_path):
    return write_split(tmp_path / "train", 24, 0), write_split(tmp_path / "val", 8, 1)


def run(argv):
    main_segment.main(config.parse_args(main_segment.get_args_parser(), argv))


def flags(split, pretrained, out):
    return [
        *COMMON,
        "--train_path",
        str(split[0]),
        "--test_path",
        str(split[1]),
        "--finetune",
        str(pretrained),
        "--output_dir",
        str(out),
    ]


def last_log(out):
    return json.loads((out / "log.txt").read_text().splitlines()[-1])


def test_short_upernet_run_beats_chance_and_writes_tables_and_figures(split, pretrained, tmp_path, capsys):
    out = tmp_path / "seg"
    run([*flags(split, pretrained, out), "--epochs", "4", "--blr", "1e-2", "--scales", "0.25", "1.0"])
    printed = capsys.readouterr().out
    assert "blocks [0, 1, 2, 3]" in printed and "loaded 54 tensors" in printed
    assert last_log(out)["test_mIoU"] > 80.0  # chance: about 33 (one class everywhere) to 50
    with open(out / "seg_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["scale"]) for r in rows] == [0.25, 1.0]
    assert float(rows[1]["mIoU"]) == pytest.approx(last_log(out)["test_mIoU"], abs=0.01)
    assert int(rows[1]["pixels"]) == 8 * (32 * 32 - 4)  # ignored pixels are not counted
    assert {
        "checkpoint-best.pth",
        "checkpoint-last.pth",
        "seg_results.md",
        "seg_examples.png",
        "per_class_iou.png",
        "miou_vs_scale.png",
        "seg_confusion.json",
        "config.yaml",
    } <= {p.name for p in out.iterdir()}
    assert (
        "| scale | mIoU | mIoU_low | mIoU_high | mF1 | OA | pixels | IoU_left | IoU_right |"
        in (out / "seg_results.md").read_text()
    )

    run(
        [*flags(split, pretrained, out), "--eval", "--resume", str(out / "checkpoint-last.pth")]
    )  # --eval reproduces it
    with open(out / "eval" / "seg_results.csv") as f:
        assert float(next(csv.DictReader(f))["mIoU"]) == pytest.approx(float(rows[1]["mIoU"]), abs=0.01)


@pytest.mark.cuda
def test_upernet_trains_and_evaluates_on_the_gpu_under_bf16(pretrained, tmp_path, capsys, cuda_device):
    """Training under bf16 autocast, then evaluation in float32 with sliding windows (48 px images, 32 px crops: 4
    windows per image) at two scales, and the metric code (confusion matrices, bootstrap), all on the device."""
    split = write_split(tmp_path / "train", 8, 0), write_split(tmp_path / "val", 3, 1, size=48)
    out = tmp_path / "gpu"
    run(
        [
            *flags(split, pretrained, out),
            "--epochs",
            "1",
            "--device",
            str(cuda_device),
            "--amp",
            "bf16",
            "--scales",
            "0.5",
            "1.0",
        ]
    )
    printed = capsys.readouterr().out
    assert f"device {cuda_device}" in printed and "autocast torch.bfloat16" in printed
    with open(out / "seg_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["scale"]) for r in rows] == [0.5, 1.0]
    assert all(int(r["pixels"]) == 3 * (48 * 48 - 4) for r in rows)  # every counted pixel once, windows overlapping
    assert all(0 <= float(r["mIoU"]) <= 100 for r in rows)
    state = checkpoint.read_checkpoint(out / "checkpoint-last.pth")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_frozen_encoder_linear_probe_trains_only_its_head_and_beats_chance(split, pretrained, tmp_path):
    out = tmp_path / "lin"
    run([*flags(split, pretrained, out), "--epochs", "5", "--blr", "5e-2", "--head", "linear", "--freeze_encoder"])
    assert last_log(out)["test_mIoU"] > 60.0
    state = checkpoint.read_checkpoint(out / "checkpoint-last.pth")["model"]
    original = checkpoint.read_checkpoint(pretrained)["model"]["encoder.blocks.0.attn.qkv.weight"]
    assert torch.equal(state["encoder.blocks.0.attn.qkv.weight"], original)


def test_resume_continues_where_the_first_run_stopped(split, pretrained, tmp_path, capsys):
    out = tmp_path / "seg"
    run([*flags(split, pretrained, out), "--epochs", "1"])
    run([*flags(split, pretrained, out), "--epochs", "2", "--resume", "auto", "--allow_changed_flags"])
    assert "continuing at epoch 1" in capsys.readouterr().out
    assert last_log(out)["epoch"] == 1


def test_a_stop_during_an_epochs_last_step_ends_that_epoch_then_stops_with_its_eta(
    split, pretrained, tmp_path, monkeypatch, capsys
):
    """As pretraining and classification (``util.run.loop.end_epoch`` / ``epochs``): a stop (SIGTERM) arriving during
    the last step of epoch 0 lets it complete (evaluation, log record, checkpoint) and the run stops before epoch 1,
    its ETA line printed."""
    from util.run import loop

    checks = []

    def stop_after_the_first_check(run):  # steps 0-1 of 3 check without a stop; the stop arrives during step 2
        checks.append(1)
        return len(checks) > 2

    monkeypatch.setattr(loop, "stop_requested", stop_after_the_first_check)
    out = tmp_path / "seg"
    run([*flags(split, pretrained, out), "--epochs", "3"])  # 24 images, batch 8: 3 steps per epoch
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in records if "epoch" in r] == [0] and "test_mIoU" in records[-1]
    assert checkpoint.training_position(checkpoint.read_checkpoint(out / "checkpoint-last.pth")) == (1, 0)
    printed = capsys.readouterr().out
    assert "epoch 0 done in" in printed and "run eta" in printed and "stopped at epoch 1 step 0" in printed
    assert not (out / "seg_results.csv").exists()  # no final evaluation of a stopped run


def test_bad_inputs_are_refused_with_the_flag(split, pretrained, tmp_path):
    from util.errors import UsageError

    with pytest.raises(UsageError, match="--class_weights: 1 weights for 2 classes"):
        run([*flags(split, pretrained, tmp_path / "x"), "--class_weights", "1.0"])
    with pytest.raises(UsageError, match="give the classes"):
        run([*flags(split, pretrained, tmp_path / "x"), "--class_names", "only"])


def test_segment_sh_passes_the_sample_defaults_and_lets_flags_win(tmp_path):
    import subprocess

    repo = REPO
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    env = {"PATH": "/usr/bin:/bin", "PYTHON": "echo", "WEIGHTS": str(weights)}
    out = subprocess.run(
        ["bash", str(repo / "segment.sh"), "--epochs", "1", "--scales", "0.5", "1.0"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[0] == "main_segment.py" and out[out.index("--finetune") + 1] == str(weights)
    assert out[out.index("--train_path") + 1] == "data/sentinel2_rgb/seg_train.csv"
    assert out.count("--epochs") == 1 and out[out.index("--epochs") + 1] == "1"
    assert out.count("--scales") == 1 and out[-3:] == ["--scales", "0.5", "1.0"]
    missing = subprocess.run(
        ["bash", str(repo / "segment.sh")],
        env={**env, "WEIGHTS": str(tmp_path / "none.pth")},
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1 and "no weights at" in missing.stderr


def test_two_process_evaluation_equals_one_process_exactly(split, pretrained, tmp_path):
    """torchrun, 2 processes (gloo): 5 evaluation tiles in 3 location blocks, so the ranks get 3 and 2 images;
    the per-image and summed confusion matrices and the block-bootstrap interval equal one process's."""
    import os
    import subprocess
    import sys

    names = [
        "r00_c00",
        "r00_c01",
        "r02_c05",
        "r03_c00",
        "r05_c05",
    ]  # 3 x 3-tile blocks (0, 0) twice, (0, 1), (1, 0), (1, 1)
    val = write_split(tmp_path / "tiles", len(names), 2, names)
    out = tmp_path / "seg"
    run([*flags(split, pretrained, out), "--epochs", "1"])
    repo = REPO
    argv = [
        "main_segment.py",
        *COMMON,
        "--test_path",
        str(val),
        "--eval",
        "--resume",
        str(out / "checkpoint-last.pth"),
        "--scales",
        "0.5",
        "1.0",
        "--bootstrap",
        "300",
        "--examples",
        "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    for procs in (1, 2):
        launch = [sys.executable] + (
            ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if procs == 2 else []
        )
        done = subprocess.run(
            [*launch, *argv, "--output_dir", str(tmp_path / f"p{procs}")],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=HANG_GUARD_S,
        )
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        folder = tmp_path / f"p{procs}" / "eval"
        results[procs] = (
            json.loads((folder / "seg_confusion.json").read_text()),
            (folder / "seg_results.csv").read_text(),
        )
    (confusion_1, table_1), (confusion_2, table_2) = results[1], results[2]
    assert confusion_2 == confusion_1 and table_2 == table_1
    assert confusion_1["images"] == [f"{n}.png" for n in names] and len(set(confusion_1["blocks"])) == 4
    assert len(confusion_1["per_image"]["1"]) == 5 and "mIoU_low" in table_1


def test_four_band_uint16_rasters_train_one_epoch_with_band_statistics(tmp_path):
    """Multispectral input: 4-band uint16 .npy images [C, H, W] (values in the thousands), per-band statistics from
    a band_stats file, joint float augmentation; class 1 where band 3 is bright."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 3)):
        for i in range(count):
            mask = np.zeros((32, 32), dtype=np.uint8)
            mask[:, int(rng.integers(8, 25)) :] = 1
            bands = rng.normal(3000, 300, (4, 32, 32))
            bands[3] += 4000.0 * mask
            (tmp_path / split / "images").mkdir(parents=True, exist_ok=True)
            np.save(tmp_path / split / "images" / f"r00_c{i:02d}.npy", bands.clip(0, 65535).astype(np.uint16))
            segmentation.write_mask(tmp_path / split / "masks" / f"r00_c{i:02d}.png", mask)
    stats = tmp_path / "stats.json"
    stats.write_text(
        json.dumps({"mean": [3000, 3000, 3000, 5000], "std": [300, 300, 300, 2000], "bands": [0, 1, 2, 3]})
    )
    out = tmp_path / "seg"
    run(
        [
            *COMMON,
            "--train_path",
            str(tmp_path / "train"),
            "--test_path",
            str(tmp_path / "val"),
            "--finetune",
            "",
            "--model",
            "vit_tiny_patch16",
            "--patch_size",
            "8",
            "--in_chans",
            "4",
            "--band_stats",
            str(stats),
            "--epochs",
            "1",
            "--output_dir",
            str(out),
        ]
    )
    with open(out / "seg_results.csv") as f:
        row = next(csv.DictReader(f))
    assert int(row["pixels"]) == 3 * (32 * 32)
    assert {"seg_examples.png", "checkpoint-last.pth"} <= {p.name for p in out.iterdir()}
    state = checkpoint.read_checkpoint(out / "checkpoint-last.pth")
    assert state["model"]["encoder.patch_embed.proj.weight"].shape[1] == 4
    with pytest.raises(
        config.UsageError, match="per-band statistics"
    ):  # uint16 without statistics: refused, not scaled as 8-bit
        run(
            [
                *COMMON,
                "--train_path",
                str(tmp_path / "train"),
                "--test_path",
                str(tmp_path / "val"),
                "--finetune",
                "",
                "--model",
                "vit_tiny_patch16",
                "--in_chans",
                "4",
                "--output_dir",
                str(tmp_path / "x"),
            ]
        )
    with pytest.raises(
        config.UsageError, match="was trained with other band flags: --bands 3 2 1 0 \\(checkpoint: None\\)"
    ):
        run(
            [
                *COMMON,
                "--test_path",
                str(tmp_path / "val"),
                "--eval",
                "--resume",
                str(out / "checkpoint-last.pth"),
                "--in_chans",
                "4",
                "--bands",
                "3",
                "2",
                "1",
                "0",
                "--band_stats",
                str(stats),
                "--output_dir",
                str(tmp_path / "e"),
            ]
        )


def test_block_pattern_problems_are_found_before_training(split, pretrained, tmp_path):
    out = tmp_path / "x"
    with pytest.raises(config.UsageError, match="not integers"):
        run([*flags(split, pretrained, out), "--block_pattern", r"(?P<row>\d)(?P<col>\D*)"])
    assert not (out / "log.txt").exists()


def test_one_location_block_gives_no_zero_width_interval(split, pretrained, tmp_path, capsys):
    out = tmp_path / "x"
    run([*flags(split, pretrained, out), "--block_pattern", "z*", "--epochs", "1", "--bootstrap", "50"])
    assert "into 1 location block: no bootstrap interval" in capsys.readouterr().out
    with open(out / "seg_results.csv") as f:
        assert "mIoU_low" not in next(csv.DictReader(f))


def test_the_users_pairs_are_never_evaluated_on_the_sample(tmp_path):
    from util.errors import UsageError

    (tmp_path / "pairs" / "images").mkdir(parents=True)
    (tmp_path / "pairs" / "masks").mkdir()
    mine = config.parse_args(main_segment.get_args_parser(), ["--train_path", str(tmp_path / "pairs")])
    with pytest.raises(UsageError, match=rf"^--test_path missing: give the evaluation set of --train_path {tmp_path}"):
        main_segment.check(mine)
    split = config.parse_args(
        main_segment.get_args_parser(), ["--train_path", str(tmp_path / "pairs"), "--test_path", "split"]
    )
    with pytest.raises(UsageError, match=r"^--test_path split: this task cannot split --train_path"):
        main_segment.check(split)
    sample = config.parse_args(main_segment.get_args_parser(), [])  # the sample's pairs: its seg_val.csv
    assert config.evaluation_path(sample.train_path, sample.test_path, split=False).endswith("seg_val.csv")
