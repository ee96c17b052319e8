"""tools/sample_eval.py: the quick start's evaluation (spatial folds over location blocks, block bootstrap)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import sample_eval

from util.config import DEFAULT_TRAIN_CSV
from util.data.datasets import build_dataset

BLOCKS, FOLDS = 25, 5  # 15 x 15 tiles in blocks of 3 x 3; tools/make_sample_data.py's split


def test_every_tile_is_in_one_fold_and_fold_0_is_the_shipped_validation_split():
    splits = {
        name: [p for p, _ in build_dataset(DEFAULT_TRAIN_CSV.parent / f"{name}.csv").samples]
        for name in ("train", "val")
    }
    blocks = sample_eval.tile_blocks(splits["train"] + splits["val"])
    assert len(np.unique(blocks)) == BLOCKS
    folds = np.array([sample_eval.fold_of(b) for b in blocks])
    assert sorted(np.unique(folds)) == list(range(FOLDS))
    assert (folds[len(splits["train"]) :] == 0).all() and (folds[: len(splits["train"])] != 0).all()


def test_the_bootstrap_resamples_blocks_not_tiles():
    blocks = np.repeat(np.arange(BLOCKS), 9)
    all_right = {"constant": np.ones(len(blocks), dtype=bool)}
    assert sample_eval.bootstrap(all_right, blocks)["constant"] == (100.0, 100.0, 100.0)
    one_block_wrong = {"one": blocks != 0}  # 9 correlated tiles: the interval must be as wide as one block's weight
    mean, low, high = sample_eval.bootstrap(one_block_wrong, blocks)["one"]
    assert mean == 96.0 and low <= 88.0 and high == 100.0


def test_main_writes_the_table_for_a_checkpoint_and_its_random_init(pretrained, tmp_path, capsys):
    sample_eval.main(sample_eval.get_args_parser().parse_args([str(pretrained), "--output_dir", str(tmp_path)]))
    table = (tmp_path / "sample_eval.md").read_text()
    assert f"| {pretrained} |" in table and "| random init |" in table and "gain over random init" in table
    results = json.loads((tmp_path / "sample_eval.json").read_text())
    assert set(results["reconstruction"]) == {str(pretrained), "random init"}
    assert 0 <= results["accuracy"]["majority class"][0] <= 100


def write_raster_sample(folder: Path, bands: int = 4, side: int = 9, size: int = 32) -> Path:
    """A labelled sample of ``side`` x ``side`` uint16 tiles rRR_cCC.tif (3 x 3-tile blocks, all five folds) with
    train.csv / val.csv split as tools/make_sample_data.py splits and a band_stats.json."""
    import tifffile

    from tools.band_stats import band_stats

    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = {"train": [], "val": []}
    for row in range(side):
        for col in range(side):
            label = (row + col) % 3
            tile = rng.integers(1000, 1500, (bands, size, size)) + 500 * label * np.arange(1, bands + 1)[:, None, None]
            name = f"images/r{row:02d}_c{col:02d}.tif"
            tifffile.imwrite(folder / name, tile.astype(np.uint16), photometric="minisblack", planarconfig="separate")
            rows["val" if sample_eval.fold_of((row // 3) * 100 + col // 3) == 0 else "train"].append(f"{label},{name}")
    for split, lines in rows.items():
        (folder / f"{split}.csv").write_text("label,image_path\n" + "\n".join(lines) + "\n")
    paths = [folder / line.split(",")[1] for line in rows["train"]]
    (folder / "band_stats.json").write_text(json.dumps(band_stats(paths)))
    return folder


def raster_checkpoint(path: Path, in_chans: int) -> Path:
    import torch

    from models_cross_scale_mae import create_model
    from util.run import checkpoint

    torch.manual_seed(0)
    mae = create_model("cross_scale_mae_vit_tiny", input_size=32, patch_size=8, in_chans=in_chans)
    checkpoint.save_checkpoint({"model": mae.state_dict(), "model_config": mae.model_config, "epoch": 0}, path)
    return path


def test_multispectral_checkpoints_on_a_raster_sample(tmp_path):
    sample = write_raster_sample(tmp_path / "ms")
    four = raster_checkpoint(tmp_path / "four.pth", 4)
    sample_eval.main(
        sample_eval.get_args_parser().parse_args(
            [str(four), "--sample", str(sample), "--output_dir", str(tmp_path / "a")]
        )
    )
    results = json.loads((tmp_path / "a" / "sample_eval.json").read_text())
    assert results["sample"] == str(sample) and set(results["reconstruction"]) == {str(four), "random init"}
    assert f"on {sample} (81 tiles, 9 blocks" in (tmp_path / "a" / "sample_eval.md").read_text()
    three = raster_checkpoint(tmp_path / "three.pth", 3)  # an RGB-only model on three of the bands
    sample_eval.main(
        sample_eval.get_args_parser().parse_args(
            [str(three), "--sample", str(sample), "--bands", "2", "1", "0", "--output_dir", str(tmp_path / "b")]
        )
    )
    assert json.loads((tmp_path / "b" / "sample_eval.json").read_text())["bands"] == [2, 1, 0]


def test_raster_tiles_are_normalised_by_the_sample_band_statistics(tmp_path):
    import tifffile

    stats = {"bands": [0, 1, 2, 3], "mean": [100.0, 200.0, 300.0, 400.0], "std": [10.0, 20.0, 30.0, 40.0]}
    (tmp_path / "band_stats.json").write_text(json.dumps(stats))
    tile = np.array([130, 180, 300, 480], np.uint16)[:, None, None] * np.ones((4, 40, 40), np.uint16)
    tifffile.imwrite(tmp_path / "r00_c00.tif", tile, photometric="minisblack", planarconfig="separate")
    (tmp_path / "train.csv").write_text("label,image_path\n0,r00_c00.tif\n")
    args = sample_eval.get_args_parser().parse_args(["x.pth", "--sample", str(tmp_path), "--bands", "3", "1", "0"])
    image = build_dataset(tmp_path / "train.csv", "auto", **sample_eval.sample_reading(args, 32, 3))[0][0]
    assert image.shape == (3, 32, 32)
    np.testing.assert_allclose(
        image.mean((1, 2)).numpy(), [2.0, -1.0, 3.0], rtol=1e-6
    )  # (value - mean) / std, bands 3 1 0


def test_band_mismatches_are_one_line_errors(tmp_path):
    from util.run.process import run_entry_point

    sample = write_raster_sample(tmp_path / "ms", side=6)
    four = raster_checkpoint(tmp_path / "four.pth", 4)
    for argv, expected in (
        ([str(four), "--sample", str(sample), "--bands", "2", "1", "0"], "--bands names 3 band(s) but --in_chans is 4"),
        ([str(four)], "has no band_stats.json: 8-bit RGB only, but the checkpoints take 4 band(s)"),
    ):
        with pytest.raises(SystemExit) as info:
            run_entry_point(
                sample_eval.main, sample_eval.get_args_parser().parse_args(argv + ["--output_dir", str(tmp_path)])
            )
        assert str(info.value).startswith("error: ") and expected in str(info.value) and "\n" not in str(info.value)


def test_the_sample_band_statistics_no_data_value_is_applied(tmp_path):
    import tifffile

    stats = {"bands": [0, 1], "mean": [100.0, 200.0], "std": [10.0, 20.0], "dtype": "uint16", "nodata": 0}
    (tmp_path / "band_stats.json").write_text(json.dumps(stats))
    tile = np.array([130, 180], np.uint16)[:, None, None] * np.ones((2, 40, 40), np.uint16)
    tile[:, :20] = 0  # no-data: filled with the band mean, 0 after normalisation
    tifffile.imwrite(tmp_path / "r00_c00.tif", tile, photometric="minisblack", planarconfig="separate")
    (tmp_path / "train.csv").write_text("label,image_path\n0,r00_c00.tif\n")
    args = sample_eval.get_args_parser().parse_args(["x.pth", "--sample", str(tmp_path)])
    image = build_dataset(tmp_path / "train.csv", "auto", **sample_eval.sample_reading(args, 40, 2))[0][0]
    np.testing.assert_allclose(image[:, :15].abs().max().item(), 0.0, atol=1e-6)
    np.testing.assert_allclose(image[:, 25:].mean((1, 2)).numpy(), [3.0, -1.0], rtol=1e-6)
