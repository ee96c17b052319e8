"""Segmentation figures: image / ground truth / prediction with a legend of class names, per-class IoU, and
mIoU against scale."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from util.seg_data import Palette, index_to_rgb  # noqa: E402

IGNORE_COLOR = (0, 0, 0)


def default_palette(class_names: Sequence[str]) -> Palette:
    """Distinct colours (matplotlib tab20) for classes without a palette."""
    cmap = plt.get_cmap("tab20")
    colors = tuple(tuple(int(255 * c) for c in cmap(i % 20)[:3]) for i in range(len(class_names)))
    if len(set(colors)) < len(colors):  # more than 20 classes: spread over a continuous map
        colors = tuple(tuple(int(255 * c) for c in plt.get_cmap("hsv")(i / len(class_names))[:3]) for i in range(len(class_names)))
    return Palette(tuple(class_names), colors)


def display_rgb(image: torch.Tensor, mean: Sequence[float], std: Sequence[float], stretch: bool = False,
                rgb_bands: Sequence[int] | None = None) -> np.ndarray:
    """Normalised image [C, H, W] -> [H, W, 3] in [0, 1] for display: bands ``rgb_bands`` (``--rgb_bands``; default:
    the first three) as R, G, B (one band, or fewer than three: grey). ``stretch`` (rasters in the file's units):
    each band from its 1st to its 99th percentile."""
    image = image.float() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    shown = list(rgb_bands) if rgb_bands else list(range(3)) if len(image) >= 3 else [0]
    bands = image[shown] if len(shown) == 3 else image[shown[:1]].expand(3, -1, -1)
    if stretch:
        flat = bands.flatten(1)[:, ::max(1, bands[0].numel() // 1_000_000)]  # torch.quantile takes at most 16M values
        low, high = flat.quantile(0.01, dim=1).view(3, 1, 1), flat.quantile(0.99, dim=1).view(3, 1, 1)
        bands = (bands - low) / (high - low).clamp(min=1e-12)
    return bands.clamp(0, 1).permute(1, 2, 0).numpy()


def save_examples(examples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], palette: Palette,
                  mean: Sequence[float], std: Sequence[float], path: Path, title: str = "", stretch: bool = False,
                  rgb_bands: Sequence[int] | None = None) -> None:
    """One row per (normalised image [C, H, W], ground truth [H, W], prediction [H, W]); a legend names each
    colour's class (black: ignored pixels). The image is shown by ``display_rgb`` (``stretch``: rasters; ``rgb_bands``)."""
    rows = len(examples)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows + 0.9), squeeze=False)
    for r, (image, truth, pred) in enumerate(examples):
        rgb = display_rgb(image, mean, std, stretch, rgb_bands)
        panels = (rgb, index_to_rgb(truth.numpy(), palette, IGNORE_COLOR), index_to_rgb(pred.numpy(), palette, IGNORE_COLOR))
        for c, (panel, name) in enumerate(zip(panels, ("image", "ground truth", "prediction"))):
            axes[r, c].imshow(panel, interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(name, fontsize=10)
    handles = [Patch(facecolor=np.array(color) / 255, edgecolor="grey", label=name) for name, color in zip(palette.names, palette.colors)]
    if any((t == 255).any().item() for _, t, _ in examples):
        handles.append(Patch(facecolor=np.array(IGNORE_COLOR) / 255, edgecolor="grey", label="ignored"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    height = 2.5 * rows + 0.9
    fig.tight_layout(rect=(0, (0.3 * math.ceil(len(handles) / 4) + 0.1) / height, 1, 1 - (0.3 / height if title else 0)))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_per_class_iou(row: dict, class_names: Sequence[str], path: Path, title: str = "") -> None:
    """Horizontal bars of each class's IoU (%) at one scale; n/a for a class absent from both."""
    values = [row[f"IoU_{name}"] for name in class_names]
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(class_names) + 1.2))
    y = np.arange(len(class_names))
    ax.barh(y, [0 if math.isnan(v) else v for v in values], color="tab:blue")
    for i, v in enumerate(values):
        ax.text(1 if math.isnan(v) else v + 1, i, "n/a" if math.isnan(v) else f"{v:.1f}", va="center", fontsize=8)
    ax.set(yticks=y, xlim=(0, 105), xlabel="IoU (%)", title=title or f"per-class IoU, mIoU {row['mIoU']:.1f}%")
    ax.set_yticklabels(class_names)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_miou_vs_scale(rows: list[dict], path: Path, label: str = "") -> None:
    """mIoU (%) against the down-sampling scale of the evaluation images (log axis)."""
    scales = [row["scale"] for row in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(scales, [row["mIoU"] for row in rows], marker="o", label=label or None)
    ax.set(xscale="log", xlabel="scale (down-sampled, then up-sampled back)", ylabel="mIoU (%)",
           title="mIoU against scale")
    ax.minorticks_off()
    ax.set_xticks(scales, [f"{s:g}" for s in scales])
    ax.grid(alpha=0.3)
    if label:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
