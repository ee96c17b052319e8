"""One inference loop for evaluation, feature caching and kNN."""
from __future__ import annotations

from collections.abc import Callable

import torch

from util.distributed import gather_rows
from util.runtime import autocast


@torch.no_grad()
def infer(
    fn: Callable[[torch.Tensor], dict], loader, device: torch.device, amp_dtype: torch.dtype | None
) -> tuple[dict, torch.Tensor]:
    """Run ``fn(images) -> {name: [B, ...]}`` on every batch under ``no_grad`` and autocast.

    Returns:
        ({name: outputs of every sample as float32 on the CPU}, labels), gathered over ranks in dataset order.
    """
    outputs: dict = {}
    labels = []
    for images, targets in loader:
        with autocast(device, amp_dtype):
            for name, value in fn(images.to(device, non_blocking=True)).items():
                outputs.setdefault(name, []).append(value.float().cpu())
        labels.append(targets)
    return ({name: gather_rows(torch.cat(parts), device) for name, parts in outputs.items()},
            gather_rows(torch.cat(labels), device))
