"""Inference: one loop for evaluation, feature caching and kNN; sliding-window inference for images larger than
the crop; and the resolution-degradation protocol (down-sample, up-sample back) for accuracy against scale."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from util.run.distributed import gather_rows
from util.run.logger import progress


@torch.no_grad()
def infer(
    fn: Callable[[torch.Tensor], dict],
    loader,
    device: torch.device,
    desc: str = "inference",
) -> tuple[dict, torch.Tensor]:
    """Run ``fn(images) -> {name: [B, ...]}`` on every batch under ``no_grad``, reporting progress as ``desc`` on rank 0
    (``logger.progress``: a bar on a terminal, plain lines in a log file).

    Evaluation runs in float32 whatever ``--amp`` trains with: a number a user reports must not depend on whether the
    machine computes bf16 natively (AVX512-BF16, Ampere and newer GPUs) or not.

    Returns:
        ({name: outputs of every sample as float32 on the CPU}, labels), gathered over ranks in dataset order.
    """
    outputs: dict = {}
    labels = []
    for images, targets in progress(loader, desc):
        for name, value in fn(images.to(device, non_blocking=True)).items():
            outputs.setdefault(name, []).append(value.float().cpu())
        labels.append(targets)
    return (
        {name: gather_rows(torch.cat(parts), device) for name, parts in outputs.items()},
        gather_rows(torch.cat(labels), device),
    )


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Window origins along one side: every ``stride`` px, the last one flush with the end (no window overhangs)."""
    if size <= crop:
        return [0]
    starts = list(range(0, size - crop, stride))
    return starts + [size - crop]


@torch.no_grad()
def sliding_window(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    num_classes: int,
    crop: int,
    overlap: float = 1 / 3,
    batch: int = 8,
) -> torch.Tensor:
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
        chunk = boxes[first : first + batch]
        windows = torch.cat([image[..., y : y + crop, x : x + crop] for y, x in chunk])
        probs = model(windows).float().softmax(1)
        for i, (y, x) in enumerate(chunk):
            scores_sum[..., y : y + crop, x : x + crop] += probs[i * b : (i + 1) * b]
            counts[..., y : y + crop, x : x + crop] += 1
    return (scores_sum / counts)[..., :h, :w]


def degrade(image: torch.Tensor, scale: float) -> torch.Tensor:
    """Down-sample [B, C, H, W] by ``scale`` (area averaging), then up-sample back to H x W (bilinear): the same
    scene at a coarser ground sampling distance. Scale 1 returns the image unchanged."""
    if scale == 1.0:
        return image
    h, w = image.shape[-2:]
    small = F.interpolate(image, size=(max(round(h * scale), 1), max(round(w * scale), 1)), mode="area")
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
