"""tools/sample_eval.py: the quick start's evaluation (spatial folds over location blocks, block bootstrap)."""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import sample_eval  # noqa: E402

from util.datasets import DEFAULT_TRAIN_CSV, build_dataset  # noqa: E402

BLOCKS, FOLDS = 25, 5  # 15 x 15 tiles in blocks of 3 x 3; tools/make_sample_data.py's split


def test_every_tile_is_in_one_fold_and_fold_0_is_the_shipped_validation_split():
    splits = {name: [p for p, _ in build_dataset(DEFAULT_TRAIN_CSV.parent / f"{name}.csv").samples] for name in ("train", "val")}
    blocks = sample_eval.tile_blocks(splits["train"] + splits["val"])
    assert len(np.unique(blocks)) == BLOCKS
    folds = np.array([sample_eval.fold_of(b) for b in blocks])
    assert sorted(np.unique(folds)) == list(range(FOLDS))
    assert (folds[len(splits["train"]):] == 0).all() and (folds[:len(splits["train"])] != 0).all()


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
