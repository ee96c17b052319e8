"""Collect the runs of ``benchmarks/seg_evidence.sh`` into one Markdown table: mIoU per scale with its 95 %
block-bootstrap interval, and each pretrained encoder's gain over random initialisation (same head and
protocol), bootstrapped paired over the same resampled location blocks.

    python benchmarks/seg_evidence_table.py output/seg_evidence        # writes output/seg_evidence/seg_evidence.md

Every run folder holds ``seg_results.csv`` and ``seg_confusion.json`` (per-image confusion matrices, the images'
names and blocks) written by ``main_segment.final_evaluation``; the intervals here are recomputed from those with
``util.eval.iou.block_bootstrap_mious`` (seed 0), so they equal the runs' own.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# before any third-party import: one error line where this Python lacks the requirements (util/__init__.py)
import util  # noqa: F401

# isort: split

import numpy as np
import torch

from util.errors import DataError
from util.eval import iou, location_blocks
from util.run.process import run_entry_point

# (folder, row label); the order of the table
RUNS = (
    ("logistic", "per-pixel logistic regression on the band values (`tools/seg_baseline.py`)"),
    ("random_finetuned", "tiny, random initialisation, UperNet fine-tuned"),
    ("random_frozen", "tiny, random initialisation, UperNet on the frozen encoder"),
    ("mae_finetuned", "tiny, plain MAE (same budget), UperNet fine-tuned"),
    ("mae_frozen", "tiny, plain MAE (same budget), UperNet on the frozen encoder"),
    ("csmae_finetuned", "tiny, Cross-Scale MAE (`train.sh`), UperNet fine-tuned"),
    ("csmae_frozen", "tiny, Cross-Scale MAE (`train.sh`), UperNet on the frozen encoder"),
)
BASELINE_OF = {
    "mae_finetuned": "random_finetuned",
    "mae_frozen": "random_frozen",
    "csmae_finetuned": "random_finetuned",
    "csmae_frozen": "random_frozen",
}


def load(folder: Path) -> tuple[list[dict], dict]:
    """(rows of seg_results.csv, seg_confusion.json) of one run.

    Raises:
        DataError: a file missing or unreadable.
    """
    try:
        with open(folder / "seg_results.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        return rows, json.loads((folder / "seg_confusion.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{folder}: no readable seg_results.csv / seg_confusion.json ({e})") from None


def fmt(value: float, low: float, high: float) -> str:
    return f"{value:.1f} [{low:.1f}, {high:.1f}]"


def table(root: Path, resamples: int = location_blocks.BOOTSTRAP) -> str:
    """The Markdown text. Runs whose folder is missing are left out; runs must share their evaluation images."""
    found = {name: load(root / name) for name, _ in RUNS if (root / name).is_dir()}
    if not found:
        raise DataError(f"{root}: none of the run folders {', '.join(n for n, _ in RUNS)}")
    first = next(iter(found.values()))[1]
    for name, (_, confusion) in found.items():
        if confusion["images"] != first["images"]:
            raise DataError(
                f"{root / name}: evaluated on other images than the other runs; a paired comparison needs the same"
            )
    scales = [row["scale"] for row in next(iter(found.values()))[0]]
    image_block = np.array(first["blocks"])
    lines = [
        f"mIoU % [95 % interval] on {len(first['images'])} evaluation images in {len(np.unique(image_block))} location "
        f"blocks (bootstrap over blocks, {resamples} resamples, seed 0), at each scale (images down-sampled by it "
        "and up-sampled back). Gain: over random initialisation with the same head and protocol, paired over the "
        "same resampled blocks.",
        "",
        "| encoder / model | "
        + " | ".join(f"scale {float(s):g}" for s in scales)
        + f" | gain at scale {float(scales[-1]):g} (points) |",
        "|---" * (len(scales) + 2) + "|",
    ]
    samples = {}
    for name, label in RUNS:
        if name not in found:
            continue
        rows, confusion = found[name]
        cells = []
        for row in rows:
            per_image = torch.tensor(confusion["per_image"][f"{float(row['scale']):g}"])
            samples[name, row["scale"]] = iou.block_bootstrap_mious(per_image, image_block, resamples=resamples)
            cells.append(fmt(float(row["mIoU"]), *location_blocks.percentile_interval(samples[name, row["scale"]])))
        gain = ""
        base = BASELINE_OF.get(name)
        if base in found:
            last = rows[-1]["scale"]
            difference = float(rows[-1]["mIoU"]) - float(found[base][0][-1]["mIoU"])
            gain = fmt(difference, *location_blocks.percentile_interval(samples[name, last] - samples[base, last]))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {gain} |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> None:
    text = table(Path(args.root), args.bootstrap)
    path = Path(args.root) / "seg_evidence.md"
    path.write_text(text)
    print(text + f"\nwritten: {path}", flush=True)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="the OUT folder of benchmarks/seg_evidence.sh (one sub-folder per run)")
    parser.add_argument(
        "--bootstrap", type=int, default=location_blocks.BOOTSTRAP, help="resamples (the runs used 2000)"
    )
    return parser


if __name__ == "__main__":
    run_entry_point(main, get_args_parser().parse_args())
