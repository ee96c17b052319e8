"""Segmentation metrics and inference: a confusion matrix accumulated over the whole evaluation set (and summed
over ranks, on the device), IoU / F1 / overall accuracy from it, sliding-window inference for images larger than
the crop, and the resolution-degradation protocol (down-sample, up-sample back) for mIoU against scale.

Means over classes (mIoU, mean F1) leave out a class absent from both the ground truth and the predictions of
the whole set (its IoU is 0 / 0: undefined, reported as NaN) and the classes given in ``exclude`` (e.g. ISPRS
clutter). A class present in the ground truth but never predicted counts with IoU 0, and so does a class
predicted but absent from the ground truth.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from util import distributed


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """[K, K] int64 counts (rows = true class, columns = predicted) of the pixels whose target is not ignored."""
    valid = target != ignore_index
    index = target[valid] * num_classes + pred[valid]
    return torch.bincount(index.flatten(), minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def all_reduce_confusion(confusion: torch.Tensor) -> torch.Tensor:
    """Sum of every rank's confusion matrix (a tensor on the training device: NCCL or gloo)."""
    if distributed.is_distributed() and distributed.world_size() > 1:
        confusion = confusion.clone()
        dist.all_reduce(confusion)
    return confusion


def scores(confusion: torch.Tensor, exclude: Sequence[int] = ()) -> dict:
    """mIoU, mean F1, overall accuracy (%) and per-class IoU / F1 (%, NaN for a class absent from both ground truth
    and predictions) of a confusion matrix [K, K].

    IoU_k = TP / (TP + FP + FN), F1_k = 2 TP / (2 TP + FP + FN); overall accuracy = trace / all counted pixels.
    Means are over the classes present (in ground truth or predictions) and not in ``exclude``.
    """
    confusion = confusion.double().cpu()
    tp = confusion.diagonal()
    gt, predicted = confusion.sum(1), confusion.sum(0)
    union = gt + predicted - tp
    present = union > 0
    nan = torch.full_like(tp, math.nan)
    iou = torch.where(present, tp / union.clamp(min=1), nan)
    f1 = torch.where(present, 2 * tp / (gt + predicted).clamp(min=1), nan)
    counted = present.clone()
    counted[list(exclude)] = False
    total = confusion.sum()
    return {
        "mIoU": 100 * iou[counted].mean().item() if counted.any() else math.nan,
        "mF1": 100 * f1[counted].mean().item() if counted.any() else math.nan,
        "OA": 100 * (tp.sum() / total).item() if total > 0 else math.nan,
        "IoU": (100 * iou).tolist(),
        "F1": (100 * f1).tolist(),
        "classes_counted": int(counted.sum()),
    }


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Window origins along one side: every ``stride`` px, the last one flush with the end (no window overhangs)."""
    if size <= crop:
        return [0]
    starts = list(range(0, size - crop, stride))
    return starts + [size - crop]


@torch.no_grad()
def sliding_window(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, num_classes: int, crop: int,
                   overlap: float = 1 / 3, batch: int = 8) -> torch.Tensor:
    """Class scores [B, K, H, W] (float32, mean softmax of the windows covering each pixel) of images [B, C, H, W].

    Windows of ``crop`` px with ``overlap`` (fraction of the crop) between neighbours; an image smaller than the
    crop on a side is padded with zeros (the padded region's scores are dropped). With H = W = crop this is one
    forward pass of the whole image.
    """
    b, _, h, w = image.shape
    pad_h, pad_w = max(crop - h, 0), max(crop - w, 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h))
    H, W = image.shape[-2:]
    stride = max(int(crop * (1 - overlap)), 1)
    boxes = [(y, x) for y in window_starts(H, crop, stride) for x in window_starts(W, crop, stride)]
    scores_sum = torch.zeros(b, num_classes, H, W, device=image.device)
    counts = torch.zeros(1, 1, H, W, device=image.device)
    for first in range(0, len(boxes), batch):
        chunk = boxes[first:first + batch]
        windows = torch.cat([image[..., y:y + crop, x:x + crop] for y, x in chunk])
        probs = model(windows).float().softmax(1)
        for i, (y, x) in enumerate(chunk):
            scores_sum[..., y:y + crop, x:x + crop] += probs[i * b:(i + 1) * b]
            counts[..., y:y + crop, x:x + crop] += 1
    return (scores_sum / counts)[..., :h, :w]


def degrade(image: torch.Tensor, scale: float) -> torch.Tensor:
    """Down-sample [B, C, H, W] by ``scale`` (area averaging), then up-sample back to H x W (bilinear): the same
    scene at a coarser ground sampling distance. Scale 1 returns the image unchanged."""
    if scale == 1.0:
        return image
    h, w = image.shape[-2:]
    small = F.interpolate(image, size=(max(round(h * scale), 1), max(round(w * scale), 1)), mode="area")
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
