"""util/eval/figures.py: the prediction figure with a legend, per-class IoU bars, mIoU against scale."""

from __future__ import annotations

import math

import torch
from PIL import Image

from util.data.segmentation import ISPRS
from util.eval import figures


def test_figures_are_written(tmp_path):
    truth = torch.randint(0, 6, (2, 24, 24))
    truth[0, :3] = 255
    examples = [(torch.randn(3, 24, 24), truth[i], torch.randint(0, 6, (24, 24))) for i in range(2)]
    figures.save_examples(examples, ISPRS, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2), tmp_path / "ex.png", "title")
    with Image.open(tmp_path / "ex.png") as img:
        assert img.size[0] > 500 and img.size[1] > 400
    row = {"scale": 1.0, "mIoU": 50.0, **{f"IoU_{n}": v for n, v in zip(ISPRS.names, [10, 20, math.nan, 40, 50, 60])}}
    figures.save_per_class_iou(row, ISPRS.names, tmp_path / "iou.png")
    figures.save_miou_vs_scale([{**row, "scale": s} for s in (0.25, 0.5, 1.0)], tmp_path / "scale.png", "x")
    assert (tmp_path / "iou.png").stat().st_size > 1000 and (tmp_path / "scale.png").stat().st_size > 1000


def test_default_palette_gives_distinct_colours_for_many_classes():
    palette = figures.default_palette([f"c{i}" for i in range(30)])
    assert len(set(palette.colors)) == 30
