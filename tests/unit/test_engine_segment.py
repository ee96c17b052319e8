"""engine_segment.py: result rows per scale, CSV / Markdown tables (n/a for a class absent from both), and
evaluation of a whole set into one confusion matrix per scale."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

import engine_segment
from util.errors import NonFiniteOutputError
from util.run import process


def test_results_table_and_files_report_each_scale_and_mark_absent_classes(tmp_path, capsys):
    confusions = {
        1.0: torch.tensor([[[3, 1, 0], [0, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 2, 0], [0, 0, 0]]]),  # two images each
        0.5: torch.tensor([[[4, 0, 0], [0, 0, 0], [0, 0, 0]], [[0, 0, 0], [2, 0, 0], [0, 0, 0]]]),
    }
    rows = engine_segment.results_table(confusions, ["a", "b", "c"])
    assert [r["scale"] for r in rows] == [0.5, 1.0]
    assert rows[1]["mIoU"] == pytest.approx((75.0 + 200 / 3) / 2) and math.isnan(rows[1]["IoU_c"])
    assert rows[0]["IoU_b"] == 0.0 and rows[0]["pixels"] == 6  # b is in the ground truth but never predicted
    csv_path, md_path = engine_segment.write_tables(rows, tmp_path, "note")
    with open(csv_path) as f:
        assert [r["scale"] for r in csv.DictReader(f)] == ["0.5", "1.0"]
    markdown = md_path.read_text()
    assert "| 1 | 70.83 | 82.86 | 83.33 | 6 | 75.00 | 66.67 | n/a |" in markdown and markdown.endswith("note\n")
    assert "| scale | mIoU |" in capsys.readouterr().out


def test_results_table_interval_resamples_blocks_of_images():
    good, bad = torch.tensor([[5, 0], [0, 5]]), torch.tensor([[0, 5], [5, 0]])
    per_image = torch.stack([good, good, good, bad])
    rows = engine_segment.results_table({1.0: per_image}, ["a", "b"], image_block=np.array([0, 0, 1, 1]), resamples=200)
    assert rows[0]["mIoU"] == pytest.approx(60.0)  # a: TP 15, FP 5, FN 5 -> 15 / 25; b alike
    # resamples: block 0 twice (100), block 1 twice (good + bad twice: 5 / 15 per class), one of each (60)
    assert rows[0]["mIoU_low"] == pytest.approx(100 / 3) and rows[0]["mIoU_high"] == 100.0
    per_pixel_view = engine_segment.results_table(
        {1.0: per_image}, ["a", "b"], image_block=np.array([0, 1, 2, 3]), resamples=200
    )
    assert per_pixel_view[0]["mIoU_low"] != rows[0]["mIoU_low"]  # the blocks, not the images, are resampled
    assert "mIoU_low" not in engine_segment.results_table({1.0: per_image}, ["a", "b"])[0]


class Constant(torch.nn.Module):
    """Predicts class 1 everywhere."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 2, *x.shape[-2:])
        logits[:, 1] = 1.0
        return logits


def test_evaluate_counts_every_non_ignored_pixel_once_per_scale():
    run = process.Run(0, 1, 0, torch.device("cpu"), None, None)
    masks = [torch.zeros(1, 40, 50, dtype=torch.long), torch.ones(1, 20, 20, dtype=torch.long)]
    masks[0][0, :5] = 255
    loader = [(torch.randn(1, 3, *m.shape[-2:]), m) for m in masks]
    evaluation = engine_segment.Protocol(crop=16, scales=(0.5, 1.0))
    confusions, examples = engine_segment.evaluate(Constant(), loader, run, 2, evaluation, keep=2)
    for scale in (0.5, 1.0):
        assert confusions[scale].tolist() == [
            [[0, 35 * 50], [0, 0]],
            [[0, 0], [0, 400]],
        ]  # one matrix per image, in order
    assert len(examples) == 2 and examples[1][2].shape == (20, 20)


def test_evaluate_leaves_out_ground_truth_near_class_boundaries_when_asked():
    run = process.Run(0, 1, 0, torch.device("cpu"), None, None)
    mask = torch.zeros(1, 20, 20, dtype=torch.long)
    mask[:, :, 10:] = 1  # one vertical boundary between columns 9 and 10
    evaluation = engine_segment.Protocol(crop=20, ignore_boundary=3)
    confusions, _ = engine_segment.evaluate(Constant(), [(torch.randn(1, 3, 20, 20), mask)], run, 2, evaluation)
    assert confusions[1.0][0].tolist() == [[0, 7 * 20], [0, 7 * 20]]  # columns 7-12 are within 3 px of the other class


class NaNAt(torch.nn.Module):
    """Class 1 everywhere, but NaN scores for images whose first value is above 100."""

    def forward(self, x):
        logits = Constant()(x)
        return torch.where(x[:, :1, :1, :1] > 100, torch.nan, logits)


def test_non_finite_scores_anywhere_in_the_set_refuse_the_evaluation_once_it_ends():
    run = process.Run(0, 1, 0, torch.device("cpu"), None, None)
    images = [torch.zeros(1, 3, 16, 16), torch.full((1, 3, 16, 16), 200.0), torch.zeros(1, 3, 16, 16)]
    loader = [(image, torch.zeros(1, 16, 16, dtype=torch.long)) for image in images]
    evaluation = engine_segment.Protocol(crop=16, scales=(0.5, 1.0))
    with pytest.raises(NonFiniteOutputError, match=r"NaN/inf class scores \(512 value\(s\) at scale 0.5, 512 value"):
        engine_segment.evaluate(NaNAt(), loader, run, 2, evaluation)
    confusions, _ = engine_segment.evaluate(NaNAt(), [loader[0], loader[2]], run, 2, evaluation)
    assert confusions[1.0].tolist() == [[[0, 256], [0, 0]]] * 2


def test_the_default_palette_on_your_own_masks_is_said_with_how_to_name_yours(tmp_path, capsys):
    """A newcomer's 3-class index masks were reported as water / vegetation / other_land without a word."""
    import main_segment
    from util import config

    def classes(*argv):
        flags = config.parse_args(main_segment.get_args_parser(), list(argv))
        names = engine_segment.classes_of(flags)[0]
        return names, capsys.readouterr().out

    names, out = classes("--train_path", str(tmp_path))
    assert names == ["water", "vegetation", "other_land"]
    assert "note: classes: the embedded sample's water, vegetation, other_land (--palette default" in out
    assert "--class_names NAME ... (index 0 first), --palette none --nb_classes N" in out
    assert classes("--train_path", str(tmp_path), "--class_names", "a", "b", "c")[1] == ""
    assert classes("--train_path", str(tmp_path), "--palette", "none", "--nb_classes", "4")[1] == ""
    assert classes()[1] == ""  # the sample itself
