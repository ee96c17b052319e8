"""Reconstruction figures: original, masked and reconstructed images of both scales."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid


@torch.no_grad()
def reconstruction_grid(model, imgs: torch.Tensor, mean: Sequence[float], std: Sequence[float], seed: int = 1234) -> torch.Tensor:
    """One row per image: original, masked, reconstruction (visible patches pasted back), for each scale.

    Masks and the crop box come from a private generator seeded with ``seed``, so figures of different
    epochs show the same patches and the training RNG is untouched.

    Args:
        model: A ``CrossScaleMAE`` (unwrapped).
        imgs: Normalised images [B, C, H, W].
        mean: Normalisation mean per channel.
        std: Normalisation std per channel.
        seed: Seed of the masks and the crop box.

    Returns:
        uint8 image [3, H', W'].
    """
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        views = [imgs, model.crop_view(imgs)] if model.multi_scale else [imgs]
        noise = torch.rand(len(views), imgs.shape[0], model.num_patches).to(imgs.device)
    outputs = model.encode_decode(views, model.mask_ratio, noise)
    model.train(was_training)

    mean_t = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1)
    columns = []
    for view, (_, mask, _, pred) in zip(views, outputs):
        pred = pred.float()
        if model.norm_pix_loss:  # predictions are standardised patches: undo with the target's statistics
            target = model.patchify(view.float())
            pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
        patch_mask = model.unpatchify(mask.unsqueeze(-1).expand_as(pred))  # 1 = masked
        recon = model.unpatchify(pred)
        columns += [view, view * (1 - patch_mask), view * (1 - patch_mask) + recon * patch_mask]
    rows = torch.stack(columns, dim=1).flatten(0, 1).float()  # [B * 3V, C, H, W]
    rows = (rows * std_t + mean_t).clamp(0, 1)
    grid = make_grid(rows, nrow=len(columns), padding=2, pad_value=1.0)
    return (grid * 255).round().to(torch.uint8).cpu()


def save_png(image: torch.Tensor, path: Path) -> None:
    """Write a [3, H, W] uint8 tensor as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
