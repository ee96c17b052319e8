"""engine_segment.py: result rows per scale, CSV / Markdown tables (n/a for a class absent from both), and
evaluation of a whole set into one confusion matrix per scale."""
from __future__ import annotations

import csv
import math

import pytest
import torch

import engine_segment
from util import runtime


def test_results_table_and_files_report_each_scale_and_mark_absent_classes(tmp_path, capsys):
    confusions = {1.0: torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]]), 0.5: torch.tensor([[4, 0, 0], [2, 0, 0], [0, 0, 0]])}
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


class Constant(torch.nn.Module):
    """Predicts class 1 everywhere."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 2, *x.shape[-2:])
        logits[:, 1] = 1.0
        return logits


def test_evaluate_counts_every_non_ignored_pixel_once_per_scale():
    run = runtime.Run(0, 1, 0, torch.device("cpu"), None, None)
    masks = [torch.zeros(1, 40, 50, dtype=torch.long), torch.ones(1, 20, 20, dtype=torch.long)]
    masks[0][0, :5] = 255
    loader = [(torch.randn(1, 3, *m.shape[-2:]), m) for m in masks]
    confusions, examples = engine_segment.evaluate(Constant(), loader, run, 2, crop=16, scales=(0.5, 1.0), keep=2)
    for scale in (0.5, 1.0):
        assert confusions[scale].tolist() == [[0, 35 * 50], [0, 400]]
    assert len(examples) == 2 and examples[1][2].shape == (20, 20)
