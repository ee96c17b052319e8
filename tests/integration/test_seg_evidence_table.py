"""benchmarks/seg_evidence_table.py: one Markdown table of the runs, intervals and paired gains over random init."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import seg_evidence_table

from util.errors import DataError

IMAGES = [f"r0{i}_c00.png" for i in range(6)]  # rows 0-2 and 3-5: two blocks


def write_run(folder: Path, per_image: list, images=IMAGES) -> None:
    folder.mkdir(parents=True)
    total = [[sum(m[r][c] for m in per_image) for c in range(2)] for r in range(2)]
    miou = 100 * sum(total[k][k] / (sum(total[k]) + sum(row[k] for row in total) - total[k][k]) for k in range(2)) / 2
    with open(folder / "seg_results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["scale", "mIoU"])
        writer.writeheader()
        writer.writerow({"scale": "1.0", "mIoU": miou})
    (folder / "seg_confusion.json").write_text(
        json.dumps({"images": images, "blocks": [0, 0, 0, 1, 1, 1], "per_image": {"1": per_image}})
    )


def test_rows_follow_the_fixed_order_and_the_gain_is_paired(tmp_path):
    good, poor = [[9, 1], [1, 9]], [[5, 5], [5, 5]]
    write_run(tmp_path / "random_finetuned", [poor] * 6)
    write_run(tmp_path / "csmae_finetuned", [good] * 6)
    write_run(tmp_path / "logistic", [good] * 3 + [poor] * 3)
    text = seg_evidence_table.table(tmp_path, resamples=100)
    lines = [line for line in text.splitlines() if line.startswith("| tiny") or line.startswith("| per-pixel")]
    assert [line.split(" |")[0] for line in lines] == [
        "| per-pixel logistic regression on the band values (`tools/seg_baseline.py`)",
        "| tiny, random initialisation, UperNet fine-tuned",
        "| tiny, Cross-Scale MAE (`train.sh`), UperNet fine-tuned",
    ]
    assert lines[2].endswith("| 48.5 [48.5, 48.5] |")  # 81.8 - 33.3 on every resample: no spread
    assert "6 evaluation images in 2 location blocks" in text


def test_runs_on_other_images_are_refused(tmp_path):
    write_run(tmp_path / "random_finetuned", [[[1, 0], [0, 1]]] * 6)
    write_run(tmp_path / "csmae_finetuned", [[[1, 0], [0, 1]]] * 6, images=IMAGES[::-1])
    with pytest.raises(DataError, match="other images"):
        seg_evidence_table.table(tmp_path, resamples=10)
    with pytest.raises(DataError, match="none of the run folders"):
        seg_evidence_table.table(tmp_path / "random_finetuned", resamples=10)
