"""Segmentation metrics: confusion matrices per image (gathered over ranks, on the device) summed over the whole
evaluation set, IoU / F1 / overall accuracy from them, the mIoU's interval from a bootstrap over location blocks,
and ISPRS's eroded-boundary evaluation. (Sliding-window inference and the degradation protocol for mIoU against
scale are ``util.eval.inference``'s.)

Means over classes (mIoU, mean F1) leave out a class absent from both the ground truth and the predictions of
the whole set (its IoU is 0 / 0: undefined, reported as NaN) and the classes given in ``exclude`` (e.g. ISPRS
clutter). A class present in the ground truth but never predicted counts with IoU 0, and so does a class
predicted but absent from the ground truth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from util.eval import location_blocks
from util.run import distributed


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """[K, K] int64 counts (rows = true class, columns = predicted) of the pixels whose target is not ignored."""
    return confusion_matrices(pred.reshape(1, -1), target.reshape(1, -1), num_classes, ignore_index)[0]


def confusion_matrices(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """One [K, K] int64 confusion matrix per image (rows = true class, columns = predicted): [B, K, K] of
    predictions and targets [B, ...] (targets in [0, K) or ``ignore_index``), on their device, without waiting for
    it: each pixel adds 1 at its flat index image x K² + target x K + prediction (``index_add_``), an ignored pixel
    to one extra bin that is dropped. (Boolean indexing and ``bincount`` would synchronise the host on a GPU.)"""
    b, k = pred.shape[0], num_classes
    pred, target = pred.reshape(b, -1).long(), target.reshape(b, -1).long()
    flat = torch.arange(b, device=pred.device)[:, None] * (k * k) + target * k + pred
    flat = torch.where(target == ignore_index, b * k * k, flat)
    counts = torch.zeros(b * k * k + 1, dtype=torch.long, device=pred.device)
    counts.index_add_(0, flat.flatten(), torch.ones(flat.numel(), dtype=torch.long, device=pred.device))
    return counts[:-1].reshape(b, k, k)


def gather_confusions(local: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Every rank's per-image confusion matrices [n_r, K, K] -> [N, K, K] on the CPU, in dataset order when rank r
    holds images r, r + W, r + 2W, ... (``util.data.loaders.eval_loader``'s shards; ``distributed.gather_rows``).
    Integer counts: the gathered result, and any sum of it, is exact and the same on every rank."""
    return distributed.gather_rows(local, device)


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


def block_bootstrap_mious(
    per_image: torch.Tensor,
    image_block: np.ndarray,
    exclude: Sequence[int] = (),
    resamples: int = location_blocks.BOOTSTRAP,
    seed: int = 0,
) -> np.ndarray:
    """[R] mIoU (%) of each bootstrap resample over location blocks: each resample draws the B blocks with
    replacement (``util.eval.location_blocks.block_counts``), sums the confusion matrices of their images and takes the
    mIoU of
    the sum (``scores``: the statistic the point estimate is). Seeded: two evaluations of the same images and
    blocks get the same resamples, so their difference per resample is a paired bootstrap.

    Args:
        per_image: [N, K, K] confusion matrices, one per evaluation image.
        image_block: [N] block index of each image (``util.eval.location_blocks.block_ids``).
    """
    flat = per_image.reshape(len(per_image), -1).double()  # counts < 2**53: exact in float64
    counts = torch.from_numpy(
        np.stack(list(location_blocks.block_counts(image_block, resamples, seed)))
    ).double()  # [R, N]
    summed = (counts @ flat).reshape(resamples, *per_image.shape[1:])  # [R, K, K]
    return np.array([scores(c, exclude)["mIoU"] for c in summed])


def block_bootstrap_miou(
    per_image: torch.Tensor,
    image_block: np.ndarray,
    exclude: Sequence[int] = (),
    resamples: int = location_blocks.BOOTSTRAP,
    seed: int = 0,
) -> tuple[float, float]:
    """95 % percentile interval (%) of the mIoU over location blocks (``block_bootstrap_mious``)."""
    return location_blocks.percentile_interval(block_bootstrap_mious(per_image, image_block, exclude, resamples, seed))


def ignore_boundaries(mask: torch.Tensor, radius: int, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """[B, H, W] labels with every pixel within ``radius`` px (Euclidean: a disc) of a pixel of another class set
    to ``ignore_index``: the ISPRS benchmark's "eroded boundary" reference, whose object boundaries are eroded by
    a circular disc of 3 px radius so that evaluation forgives the uncertain outlines. Ignored pixels are no
    class (they erode nothing) and the image border is no boundary. Evaluation only: training keeps every pixel.

    Cost: a [B, K, H, W] float map and one (2 radius + 1)^2 grouped convolution.
    """
    if radius <= 0:
        return mask
    # no two pixels are farther apart than the diagonal: a larger radius erodes the same pixels (at a huge kernel's
    # cost)
    radius = min(radius, math.ceil(math.hypot(mask.shape[-2], mask.shape[-1])))
    offsets = torch.arange(-radius, radius + 1, device=mask.device)
    disc = ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2).float()  # [2r+1, 2r+1]
    valid = mask != ignore_index
    labels = torch.where(valid, mask, 0)
    classes = torch.arange(num_classes, device=mask.device)[None, :, None, None]
    # [B, K, H, W]; not F.one_hot, which checks the labels' range on the host (a GPU synchronisation per batch)
    onehot = (labels[:, None] == classes).float() * valid[:, None]
    # per-class counts, rounded: cuDNN may take an FFT or Winograd convolution, whose counts are off by rounding (a
    # count of 9 as 9.0000005 made every pixel a boundary); integers are exact in float32 below 2^24
    near = F.conv2d(onehot, disc.expand(num_classes, 1, *disc.shape), padding=radius, groups=num_classes).round()
    own = near.gather(1, labels[:, None])[:, 0]  # pixels of the pixel's own class within the disc
    boundary = valid & (own < near.sum(1))
    return torch.where(boundary, torch.full_like(mask, ignore_index), mask)
