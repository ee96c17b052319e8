"""Figures: reconstructions (original, masked and reconstructed images of both scales), confusion matrices,
kNN accuracy against scale, and segmentation figures (image / ground truth / prediction with a legend of class
names, per-class IoU, mIoU against scale)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Patch
from torchvision.utils import make_grid

from util.data.segmentation import Palette, index_to_rgb


@torch.no_grad()
def reconstruction_columns(
    model,
    imgs: torch.Tensor,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    seed: int = 1234,
    rgb_bands: Sequence[int] | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """Per image: original, masked, reconstruction (visible patches pasted back), for each scale.

    Masks and the crop box come from a private generator seeded with ``seed``, so figures of different
    epochs show the same patches and the training RNG is untouched.

    Args:
        model: A ``CrossScaleMAE`` (unwrapped).
        imgs: Normalised images [B, C, H, W].
        mean: Normalisation mean per channel (8-bit data in [0, 1]); None (multispectral, 16-bit): each band is
            shown from -2 to +2 of its standard deviations.
        std: Normalisation std per channel (None with ``mean``).
        seed: Seed of the masks and the crop box.
        rgb_bands: Bands shown as R, G, B (one: grey); default: the first three bands, or grey for fewer.

    Returns:
        (images in [0, 1], float [B, 3 x scales, 3, H, W] on the CPU, the column titles).
    """
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would reseed the CUDA generators
        views = [imgs, model.crop_view(imgs)] if model.multi_scale else [imgs]
        noise = torch.rand(len(views), imgs.shape[0], model.num_patches).to(imgs.device)
    outputs = model.encode_decode(views, model.mask_ratio, noise)
    model.train(was_training)

    if mean is None:  # +-2 standard deviations of each band
        mean, std = [0.5] * imgs.shape[1], [0.25] * imgs.shape[1]
    mean_t = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1)
    shown = list(rgb_bands) if rgb_bands else list(range(3)) if imgs.shape[1] >= 3 else [0]
    shown = shown * 3 if len(shown) == 1 else shown
    columns, names = [], []
    for number, (view, (_, mask, _, pred)) in enumerate(
        zip(views, outputs), start=1
    ):  # ViewOutput(latent, mask, tokens, pred)
        pred = pred.float()
        if model.norm_pix_loss:  # predictions are standardised patches: undo with the target's statistics
            target = model.patchify(view.float())
            pred = pred * (target.var(-1, keepdim=True) + 1e-6).sqrt() + target.mean(-1, keepdim=True)
        patch_mask = model.unpatchify(mask.unsqueeze(-1).expand_as(pred))  # 1 = masked
        recon = model.unpatchify(pred)
        columns += [view, view * (1 - patch_mask), view * (1 - patch_mask) + recon * patch_mask]
        scale = f"scale {number}" + (" (crop)" if number > 1 else " (full)") if len(views) > 1 else "full image"
        names += [f"original\n{scale}", f"masked {model.mask_ratio:.0%}\n{scale}", f"reconstruction\n{scale}"]
    images = torch.stack(
        [(c.float() * std_t + mean_t).clamp(0, 1)[:, shown] for c in columns], dim=1
    )  # [B, 3V, 3, H, W]
    return images.cpu(), names


def grid_image(images: torch.Tensor) -> torch.Tensor:
    """Images [B, K, C, H, W] in [0, 1] -> one uint8 image [3, H', W'], one row per image (TensorBoard)."""
    grid = make_grid(images.flatten(0, 1), nrow=images.shape[1], padding=2, pad_value=1.0)
    return (grid * 255).round().to(torch.uint8)


MIN_CELL_PX = 160  # each image is drawn at least this wide (nearest-neighbour upscaling: pixels stay visible as pixels)


def save_reconstruction_png(
    images: torch.Tensor, names: Sequence[str], path: Path, title: str, dpi: int = 100
) -> tuple[int, int]:
    """``reconstruction_columns``' images [B, K, C, H, W] as a titled figure: column titles, ``title`` above,
    every image at least ``MIN_CELL_PX`` wide (upscaled by nearest neighbour). Returns (width, height) in pixels."""
    rows, cols, _, height, width = images.shape
    cell = max(MIN_CELL_PX, width) / dpi  # inches
    fig, axes = plt.subplots(
        rows, cols, figsize=(cols * cell, rows * cell * height / width + 0.9), dpi=dpi, squeeze=False
    )
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(images[r, c].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(names[c], fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.9 / fig.get_figheight(), wspace=0.04, hspace=0.04)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    size = fig.canvas.get_width_height()
    plt.close(fig)
    return size


def save_confusion_png(confusion: torch.Tensor, class_names: list[str], path: Path, title: str) -> None:
    """Confusion matrix [K, K] (rows = true class) as a PNG with class names and counts (counts up to 30 classes)."""
    label_inches = 0.075 * max(
        map(len, class_names), default=1
    )  # room for the longest name beside and below the matrix
    size = max(3.0, 0.45 * len(class_names)) + label_inches + 1.2
    fig, ax = plt.subplots(figsize=(size, size + 0.3))
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set(xticks=range(len(class_names)), yticks=range(len(class_names)), xlabel="predicted", ylabel="true")
    ax.set_title(title, fontsize=10)
    ax.set_xticklabels(class_names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticklabels(class_names)
    if len(class_names) <= 30:
        threshold = confusion.max().item() / 2
        for (row, col), count in zip(
            torch.cartesian_prod(torch.arange(len(class_names)), torch.arange(len(class_names))).tolist(),
            confusion.flatten().tolist(),
        ):
            ax.text(
                col, row, count, ha="center", va="center", fontsize=8, color="white" if count > threshold else "black"
            )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def wilson_interval(percent: float, count: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval (%) of an accuracy of ``percent`` % measured on ``count`` images."""
    if count <= 0:
        return 0.0, 100.0
    p = percent / 100
    centre = (p + z * z / (2 * count)) / (1 + z * z / count)
    half = z / (1 + z * z / count) * (p * (1 - p) / count + z * z / (4 * count * count)) ** 0.5
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


MIN_SPAN_POINTS = 10.0  # an accuracy-vs-scale axis spans at least this many points of accuracy (%), and
SAMPLES_PER_SPAN = 20  # at least this many times one evaluation sample's share: noise never looks like a trend


def draw_against_scale(
    ax, scales: Sequence[float], series: dict[str, list[tuple[float, float, float]]], one_sample: float | None = None
) -> None:
    """One line per entry of ``series`` (label -> [(value, interval low, interval high)] per scale, in %), its interval
    as a band, on a log scale axis; the y axis spans at least ``MIN_SPAN_POINTS`` and ``SAMPLES_PER_SPAN`` times
    ``one_sample`` (the accuracy one evaluation sample is worth, %), clipped to [0, 100]."""
    for label, points in series.items():
        values, lows, highs = zip(*points)
        (line,) = ax.plot(scales, values, marker="o", label=label)
        ax.fill_between(scales, lows, highs, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(list(scales), [f"{s:g}" for s in scales])
    ax.grid(alpha=0.3)
    bottom, top = ax.get_ylim()
    span = max(MIN_SPAN_POINTS, SAMPLES_PER_SPAN * (one_sample or 0.0), top - bottom)
    middle = min(max((top + bottom) / 2, span / 2), 100 - span / 2) if span < 100 else 50.0
    ax.set_ylim(max(0.0, middle - span / 2), min(100.0, middle + span / 2))


def save_knn_plot(
    table: dict,
    labels: list[str],
    scales: list[float],
    classifiers: Sequence[str],
    path: Path,
    evaluation: str = "",
    images: int | None = None,
) -> None:
    """Top-1 against scale, one line per checkpoint, one panel per kNN classifier; ``table[label, classifier, scale]``.

    ``evaluation`` (what was evaluated) and ``images`` (how many) go into the title; with ``images``, each line
    gets its 95 % Wilson interval as a band (``draw_against_scale``), so that a difference of one image does not
    read as a large one.
    """
    fig, axes = plt.subplots(1, len(classifiers), figsize=(10, 4.4 + 0.25 * len(labels)), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, classifier in zip(axes, classifiers):
        series = {}
        for label in labels:
            values = [table[label, classifier, s] for s in scales]
            bands = [wilson_interval(v, images) if images else (v, v) for v in values]
            series[label] = [(v, low, high) for v, (low, high) in zip(values, bands)]
        draw_against_scale(ax, scales, series, 100.0 / images if images else None)
        ax.set(xlabel="scale (fraction of the input size)", title=f"{classifier} kNN")
    axes[0].set_ylabel("top-1 (%)" + (" with 95 % Wilson interval" if images else ""))
    heading = "Multi-scale kNN top-1"
    if evaluation or images:
        heading += ": " + ", ".join(
            part for part in (evaluation, f"{images} evaluation images" if images else "") if part
        )
    fig.suptitle(heading, fontsize=10)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * len(labels), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_accuracy_vs_scale(
    series: dict[str, list[tuple[float, float, float]]],
    scales: Sequence[float],
    path: Path,
    title: str,
    ylabel: str,
    one_sample: float | None = None,
) -> None:
    """Accuracy (%) against scale with intervals (``draw_against_scale``): label -> [(value, low, high)] per scale."""
    fig, ax = plt.subplots(figsize=(7, 4.4 + 0.2 * len(series)))
    draw_against_scale(ax, scales, series, one_sample)
    ax.set(xlabel="scale (fraction of the input side)", ylabel=ylabel)
    fig.suptitle(title, fontsize=10)
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * len(series), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


IGNORE_COLOR = (0, 0, 0)


def default_palette(class_names: Sequence[str]) -> Palette:
    """Distinct colours (matplotlib tab20) for classes without a palette."""
    cmap = plt.get_cmap("tab20")
    colors = tuple(tuple(int(255 * c) for c in cmap(i % 20)[:3]) for i in range(len(class_names)))
    if len(set(colors)) < len(colors):  # more than 20 classes: spread over a continuous map
        colors = tuple(
            tuple(int(255 * c) for c in plt.get_cmap("hsv")(i / len(class_names))[:3]) for i in range(len(class_names))
        )
    return Palette(tuple(class_names), colors)


def display_rgb(
    image: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    stretch: bool = False,
    rgb_bands: Sequence[int] | None = None,
) -> np.ndarray:
    """Normalised image [C, H, W] -> [H, W, 3] in [0, 1] for display: bands ``rgb_bands`` (``--rgb_bands``; default:
    the first three) as R, G, B (one band, or fewer than three: grey). ``stretch`` (rasters in the file's units):
    each band from its 1st to its 99th percentile."""
    image = image.float() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    shown = list(rgb_bands) if rgb_bands else list(range(3)) if len(image) >= 3 else [0]
    bands = image[shown] if len(shown) == 3 else image[shown[:1]].expand(3, -1, -1)
    if stretch:
        flat = bands.flatten(1)[:, :: max(1, bands[0].numel() // 1_000_000)]  # torch.quantile takes at most 16M values
        low, high = flat.quantile(0.01, dim=1).view(3, 1, 1), flat.quantile(0.99, dim=1).view(3, 1, 1)
        bands = (bands - low) / (high - low).clamp(min=1e-12)
    return bands.clamp(0, 1).permute(1, 2, 0).numpy()


def save_examples(
    examples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    palette: Palette,
    mean: Sequence[float],
    std: Sequence[float],
    path: Path,
    title: str = "",
    stretch: bool = False,
    rgb_bands: Sequence[int] | None = None,
) -> None:
    """One row per (normalised image [C, H, W], ground truth [H, W], prediction [H, W]); a legend names each
    colour's class (black: ignored pixels). The image is shown by ``display_rgb`` (``stretch``: rasters;
    ``rgb_bands``)."""
    rows = len(examples)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows + 0.9), squeeze=False)
    for r, (image, truth, pred) in enumerate(examples):
        rgb = display_rgb(image, mean, std, stretch, rgb_bands)
        panels = (
            rgb,
            index_to_rgb(truth.numpy(), palette, IGNORE_COLOR),
            index_to_rgb(pred.numpy(), palette, IGNORE_COLOR),
        )
        for c, (panel, name) in enumerate(zip(panels, ("image", "ground truth", "prediction"))):
            axes[r, c].imshow(panel, interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(name, fontsize=10)
    handles = [
        Patch(facecolor=np.array(color) / 255, edgecolor="grey", label=name)
        for name, color in zip(palette.names, palette.colors)
    ]
    if any((t == 255).any().item() for _, t, _ in examples):
        handles.append(Patch(facecolor=np.array(IGNORE_COLOR) / 255, edgecolor="grey", label="ignored"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    height = 2.5 * rows + 0.9
    fig.tight_layout(
        rect=(0, (0.3 * math.ceil(len(handles) / 4) + 0.1) / height, 1, 1 - (0.3 / height if title else 0))
    )
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


def save_miou_vs_scale(rows: list[dict], path: Path, label: str = "", images: int | None = None) -> None:
    """mIoU (%) against the down-sampling scale of the evaluation images (log axis), with its block-bootstrap
    interval where the rows have one (``mIoU_low`` / ``mIoU_high``) and an axis wide enough that noise does not look
    like a trend (``draw_against_scale``; ``images``: how many were evaluated)."""
    scales = [row["scale"] for row in rows]
    points = [(row["mIoU"], row.get("mIoU_low", row["mIoU"]), row.get("mIoU_high", row["mIoU"])) for row in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    draw_against_scale(ax, scales, {label or "mIoU": points}, 100.0 / images if images else None)
    interval = " with 95 % block-bootstrap interval" if "mIoU_low" in rows[0] else ""
    ax.set(
        xlabel="scale (down-sampled, then up-sampled back)", ylabel=f"mIoU (%){interval}", title="mIoU against scale"
    )
    if label:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
