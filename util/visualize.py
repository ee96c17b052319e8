"""Figures: reconstructions (original, masked and reconstructed images of both scales), confusion matrices,
and kNN accuracy against scale."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402


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
        torch.random.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would reseed the CUDA generators
        views = [imgs, model.crop_view(imgs)] if model.multi_scale else [imgs]
        noise = torch.rand(len(views), imgs.shape[0], model.num_patches).to(imgs.device)
    outputs = model.encode_decode(views, model.mask_ratio, noise)
    model.train(was_training)

    mean_t = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1)
    columns = []
    for view, (_, mask, _, pred) in zip(views, outputs):  # ViewOutput(latent, mask, tokens, pred)
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


def save_confusion_png(confusion: torch.Tensor, class_names: list[str], path: Path, title: str) -> None:
    """Confusion matrix [K, K] (rows = true class) as a PNG with class names and counts (counts up to 30 classes)."""
    size = max(4.0, 0.45 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set(xticks=range(len(class_names)), yticks=range(len(class_names)), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(class_names, rotation=90)
    ax.set_yticklabels(class_names)
    if len(class_names) <= 30:
        threshold = confusion.max().item() / 2
        for (row, col), count in zip(torch.cartesian_prod(torch.arange(len(class_names)), torch.arange(len(class_names))).tolist(),
                                     confusion.flatten().tolist()):
            ax.text(col, row, count, ha="center", va="center", fontsize=8, color="white" if count > threshold else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_knn_plot(table: dict, labels: list[str], scales: list[float], classifiers: Sequence[str], path: Path) -> None:
    """Top-1 against scale, one line per checkpoint, one panel per kNN classifier; ``table[label, classifier, scale]``."""
    fig, axes = plt.subplots(1, len(classifiers), figsize=(10, 4 + 0.25 * len(labels)), sharey=True)
    for ax, classifier in zip(axes, classifiers):
        for label in labels:
            ax.plot(scales, [table[label, classifier, s] for s in scales], marker="o", label=label)
        ax.set(xscale="log", xlabel="scale (fraction of the input size)", title=f"{classifier} kNN")
        ax.minorticks_off()
        ax.set_xticks(scales, [f"{s:g}" for s in scales])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * len(labels), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
