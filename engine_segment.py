"""Segmentation: evaluation over the whole evaluation set (sliding window, one confusion matrix per image and
scale, gathered over ranks), intervals over location blocks, and the result tables. Training epochs are
``engine_finetune.train_one_epoch``'s: per-pixel classification is classification with a [B, K, H, W] output."""
from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from util.eval import inference, iou
from util.run.distributed import main_print
from util.errors import NonFiniteError
from util.run.process import Run


class NonFiniteOutputError(NonFiniteError):
    """The model's outputs are NaN or infinite: no mIoU can be computed from them."""


@torch.no_grad()
def evaluate(model: nn.Module, loader, run: Run, num_classes: int, crop: int, scales: Sequence[float] = (1.0,),
             overlap: float = 1 / 3, ignore_index: int = 255, keep: int = 0,
             ignore_boundary: int = 0) -> tuple[dict[float, torch.Tensor], list]:
    """Per-image confusion matrices [N, K, K] per scale over the whole evaluation set (gathered from every rank,
    in dataset order), and up to ``keep`` (image, ground truth, prediction at the largest scale) triples of this
    rank for figures, spread over its images. Sum over the images for the set's confusion matrix; keep them apart
    for intervals over location blocks (``iou.block_bootstrap_miou``).

    Each image goes through ``inference.degrade`` (down-sample by the scale, up-sample back) and sliding-window
    inference at the crop size. ``loader`` yields images (any size) with their masks, sharded over ranks as
    ``util.data.loaders.eval_loader`` does (rank r: images r, r + W, ...). ``ignore_boundary`` > 0: ground-truth pixels
    within that many px of another class are not counted (``iou.ignore_boundaries``; ISPRS: 3).

    Raises:
        NonFiniteOutputError: NaN / inf scores.
    """
    model.eval()
    per_image = {s: [] for s in scales}
    examples = []
    every = max(len(loader) // keep, 1) if keep else 1  # figure examples spread over the set
    for index, (image, mask) in enumerate(loader):
        image = image.to(run.device, non_blocking=True)
        mask = iou.ignore_boundaries(mask.to(run.device, non_blocking=True), ignore_boundary, num_classes, ignore_index)
        for scale in scales:
            with run.autocast():
                probs = inference.sliding_window(model, inference.degrade(image, scale), num_classes, crop, overlap)
            if not torch.isfinite(probs).all():
                raise NonFiniteOutputError(f"evaluation: NaN/inf class scores at scale {scale:g} (image {index} of this rank); "
                                           "refusing to report an mIoU")
            pred = probs.argmax(1)
            per_image[scale] += [iou.confusion_matrix(p, m, num_classes, ignore_index) for p, m in zip(pred, mask)]
            if scale == max(scales) and len(examples) < keep and index % every == 0:
                examples += [(image[i].cpu(), mask[i].cpu(), pred[i].cpu()) for i in range(min(len(image), keep - len(examples)))]
    empty = torch.zeros(0, num_classes, num_classes, dtype=torch.long, device=run.device)  # a rank without images
    return {s: iou.gather_confusions(torch.stack(c) if c else empty) for s, c in per_image.items()}, examples


def results_table(confusions: dict[float, torch.Tensor], class_names: Sequence[str], exclude: Sequence[int] = (),
                  image_block: np.ndarray | None = None, resamples: int = 0) -> list[dict]:
    """One row per scale: scale, mIoU, mF1, OA, pixels counted and each class's IoU (%; NaN: class absent from
    both) of the set (its images' confusions [N, K, K] summed). With ``image_block`` ([N] block of each image) and
    ``resamples`` > 0, also mIoU_low / mIoU_high: the 95 % block-bootstrap interval (``iou.block_bootstrap_miou``)."""
    rows = []
    for scale, per_image in sorted(confusions.items()):
        confusion = per_image.sum(0)
        s = iou.scores(confusion, exclude)
        interval = {}
        if image_block is not None and resamples:
            low, high = iou.block_bootstrap_miou(per_image, image_block, exclude, resamples)
            interval = {"mIoU_low": low, "mIoU_high": high}
        rows.append({"scale": scale, "mIoU": s["mIoU"], **interval, "mF1": s["mF1"], "OA": s["OA"], "pixels": int(confusion.sum()),
                     **{f"IoU_{name}": v for name, v in zip(class_names, s["IoU"])}})
    return rows


def _fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def write_tables(rows: list[dict], directory: Path, note: str = "") -> tuple[Path, Path]:
    """``seg_results.csv`` and ``seg_results.md`` (one row per scale); the Markdown also goes to stdout."""
    directory.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    csv_path, md_path = directory / "seg_results.csv", directory / "seg_results.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row[c]) if c != "scale" else f"{row[c]:g}" for c in columns) + " |" for row in rows]
    text = "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")
    md_path.write_text(text)
    main_print(text)
    return csv_path, md_path


def report(rows: list[dict], count: int, what: str, best: float | None = None) -> None:
    """One line per scale (rank 0); the block-bootstrap interval in brackets when the rows have one."""
    for row in rows:
        interval = f" [{_fmt(row['mIoU_low'])}, {_fmt(row['mIoU_high'])}]" if "mIoU_low" in row else ""
        line = (f"{what}: {count} images, scale {row['scale']:g}: mIoU {_fmt(row['mIoU'])}%{interval}, mF1 {_fmt(row['mF1'])}%, "
                f"OA {_fmt(row['OA'])}%")
        if best is not None and row["scale"] == 1.0:
            line += f" (best mIoU {best:.2f}%)"
        main_print(line)
