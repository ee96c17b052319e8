"""One inference loop for evaluation, feature caching and kNN."""
from __future__ import annotations

from collections.abc import Callable

import torch

from util.distributed import gather_rows
from util.logger import progress
from util.runtime import autocast


@torch.no_grad()
def infer(
    fn: Callable[[torch.Tensor], dict], loader, device: torch.device, amp_dtype: torch.dtype | None, desc: str = "inference"
) -> tuple[dict, torch.Tensor]:
    """Run ``fn(images) -> {name: [B, ...]}`` on every batch under ``no_grad`` and autocast, reporting progress as
    ``desc`` on rank 0 (``logger.progress``: a bar on a terminal, plain lines in a log file).

    Returns:
        ({name: outputs of every sample as float32 on the CPU}, labels), gathered over ranks in dataset order.
    """
    outputs: dict = {}
    labels = []
    for images, targets in progress(loader, desc):
        with autocast(device, amp_dtype):
            for name, value in fn(images.to(device, non_blocking=True)).items():
                outputs.setdefault(name, []).append(value.float().cpu())
        labels.append(targets)
    return ({name: gather_rows(torch.cat(parts), device) for name, parts in outputs.items()},
            gather_rows(torch.cat(labels), device))
