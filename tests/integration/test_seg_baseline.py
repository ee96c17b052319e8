"""tools/seg_baseline.py: the per-pixel logistic regression equals scikit-learn's, draws its pixels as told, and
goes through main_segment's evaluation (scales, block interval, tables)."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(REPO / "tools"))
import seg_baseline
from test_main_segment import write_split

from util import config
from util.errors import DataError


@pytest.mark.parametrize("classes", [(0, 2), (0, 1, 3)])
def test_pixel_logistic_equals_sklearn_and_never_predicts_unseen_classes(classes):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3)).astype(np.float32)
    y = np.array(classes)[rng.integers(0, len(classes), 300)]
    fitted = LogisticRegression().fit(x + y[:, None], y)
    model = seg_baseline.PixelLogistic(fitted, 4)
    image = torch.from_numpy(x.T.reshape(1, 3, 20, 15))
    probs = model(image).softmax(1)  # [1, 4, 20, 15]
    expected = fitted.predict_proba(x)  # [300, len(classes)]
    got = probs[0].flatten(1).T.detach().numpy()
    np.testing.assert_allclose(got[:, list(classes)], expected, rtol=1e-4, atol=1e-6)
    assert (got[:, [k for k in range(4) if k not in classes]] == 0).all()


def test_training_pixels_spread_the_budget_and_skip_ignored_pixels():
    class Two:
        ignore_index, source = 255, "two"

        def __len__(self):
            return 2

        def __getitem__(self, i):
            mask = torch.full((4, 5), i, dtype=torch.long)
            mask[0] = 255
            return torch.full((3, 4, 5), float(i)), mask

    features, labels = seg_baseline.training_pixels(Two(), 20, 0)
    assert len(labels) == 20 and np.bincount(labels).tolist() == [10, 10] and (features[:, 0] == labels).all()
    features, labels = seg_baseline.training_pixels(Two(), 1000, 0)
    assert len(labels) == 2 * 15  # every non-ignored pixel, none twice
    with pytest.raises(DataError, match="one class only"):
        seg_baseline.fit(features[labels == 0], labels[labels == 0], 1.0, 100)


def test_main_fits_the_colours_and_writes_the_interval(tmp_path):
    train = write_split(tmp_path / "train", 6, 0)
    val = write_split(tmp_path / "val", 5, 1, ["r00_c00", "r00_c01", "r03_c00", "r03_c03", "r06_c00"])
    out = tmp_path / "out"
    argv = [
        "--train_path",
        str(train),
        "--test_path",
        str(val),
        "--palette",
        "none",
        "--class_names",
        "left",
        "right",
        "--num_workers",
        "0",
        "--scales",
        "0.25",
        "1.0",
        "--bootstrap",
        "200",
        "--pixels",
        "3000",
        "--output_dir",
        str(out),
    ]
    seg_baseline.main(config.parse_args(seg_baseline.get_args_parser(), argv))
    with open(out / "seg_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["scale"]) for r in rows] == [0.25, 1.0]
    assert float(rows[1]["mIoU"]) > 90.0  # reddish vs bluish: colour alone separates them
    assert float(rows[1]["mIoU_low"]) <= float(rows[1]["mIoU"]) <= float(rows[1]["mIoU_high"])
    assert "4 location blocks of the 5 images" in (out / "seg_results.md").read_text()
    assert json.loads((out / "seg_baseline.json").read_text())["pixels"] == 3000


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--std", "0", "1", "1"], "--std must be > 0"),
        (["--mean", "nan", "0", "0"], "--mean must be finite"),
        (["--input_size", "0"], "--input_size must be at least 1"),
        (["--seed", "-1"], "--seed must be in"),
        (["--max_iter", "0"], "--max_iter must be at least 1, got 0"),  # was: an unfitted model evaluated, exit 0
        (["--pixels", "0"], "--pixels must be at least 1, got 0"),
        (["--C", "inf"], "--C must be finite and > 0, got inf"),
        (["--C", "nan"], "--C must be > 0, got nan"),
    ],
)
def test_out_of_range_flags_are_usage_errors_before_any_reading(tmp_path, flags, message):
    argv = ["--train_path", str(tmp_path / "none"), "--test_path", str(tmp_path / "none"), *flags]
    with pytest.raises(config.UsageError, match=message):
        seg_baseline.main(config.parse_args(seg_baseline.get_args_parser(), argv))
