"""Image transforms: upstream's per-image training / evaluation transforms, and the same training
augmentation applied to a whole uint8 / uint16 batch on the device (packed datasets)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from util.config import FMOW_RGB_MEAN, FMOW_RGB_STD, Bands  # fMoW-RGB statistics: upstream's "UPDATED" constants

# Training crops: RandomResizedCrop area range (upstream's main_pretrain.py) and torchvision's default aspect-ratio
# range.
CROP_SCALE = (0.25, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def build_transform(
    is_train: bool,
    input_size: int,
    mean: Sequence[float] = FMOW_RGB_MEAN,
    std: Sequence[float] = FMOW_RGB_STD,
) -> v2.Compose:
    """Upstream's transforms, cropping before normalising.

    Train: RandomResizedCrop(input_size, scale=CROP_SCALE, bicubic) + horizontal and vertical flips.
    Eval: resize the shorter side to input_size / 0.875 (bicubic; no enlargement above 224 px) + centre crop.
    """
    geometry = _geometry(is_train, input_size, v2.InterpolationMode.BICUBIC)
    return v2.Compose(
        [v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    )


def _geometry(is_train: bool, input_size: int, interpolation: v2.InterpolationMode) -> list:
    """Train: RandomResizedCrop(CROP_SCALE, CROP_RATIO) + horizontal and vertical flips; eval: resize the shorter
    side to ``eval_resize_size`` + centre crop."""
    if is_train:
        return [
            v2.RandomResizedCrop(
                input_size, scale=CROP_SCALE, ratio=CROP_RATIO, interpolation=interpolation, antialias=True
            ),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
        ]
    return [
        v2.Resize(eval_resize_size(input_size), interpolation=interpolation, antialias=True),
        v2.CenterCrop(input_size),
    ]


def build_raster_transform(is_train: bool, input_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """``build_transform`` for float32 [C, H, W] tensors of any band count in the file's units (multispectral,
    16-bit): the same geometry (bilinear: bicubic overshoots on unbounded data), then per-band normalisation."""
    geometry = _geometry(is_train, input_size, v2.InterpolationMode.BILINEAR)
    return v2.Compose([*geometry, v2.Normalize(list(mean), list(std))])


def image_transform(bands: Bands, input_size: int, is_train: bool, valid_channel: bool = False) -> v2.Compose:
    """The per-image transform of ``input_size`` px of data read as ``bands`` say: ``build_transform`` for 8-bit RGB
    (PIL
    images), or ``build_raster_transform`` for float [C, H, W] tensors of any band count (``Bands.raster``:
    multispectral, 16-bit). ``valid_channel``: the rasters carry a validity band last (``RasterOptions``), resampled
    with the image (bilinear) and left unnormalised (mean 0, std 1)."""
    if not bands.raster:
        return build_transform(is_train, input_size, bands.mean, bands.std)
    extra = 1 if valid_channel else 0
    return build_raster_transform(is_train, input_size, [*bands.mean, *[0.0] * extra], [*bands.std, *[1.0] * extra])


def eval_resize_size(input_size: int) -> int:
    """Shorter side before the evaluation centre crop: input_size / 0.875 (MAE's crop_pct), none above 224 px."""
    return input_size if input_size > 224 else math.floor(input_size / 0.875)


def draft_size_for(is_train: bool, input_size: int) -> int:
    """Smallest decode size that loses no resolution: a minimum-scale crop must still cover input_size pixels."""
    return math.ceil(input_size / math.sqrt(CROP_SCALE[0])) if is_train else eval_resize_size(input_size)


class BatchAugment(torch.nn.Module):
    """The training transform on a uint8 / uint16 batch on the device, in one ``grid_sample``: per-image
    RandomResizedCrop (torchvision's box sampling, vectorised; bilinear, no antialias), horizontal and
    vertical flips, normalisation. Boxes and flips draw from the CPU generator, so they are restored with it
    on resume.

    Args:
        input_size: Output side in pixels.
        mean, std: Per band, in units of ``value_scale`` (8-bit RGB: fMoW statistics in [0, 1], ``value_scale`` 255;
            multispectral / 16-bit: the file's units, ``value_scale`` 1).
        nodata: The packed array's no-data value, or None. Such pixels (no-data in any band) are filled with the band
            mean before resampling, and the output gains a validity band ([B, C + 1, S, S],
            ``engine_pretrain.split_valid``)
            so that they stay out of the reconstruction loss.
    """

    def __init__(
        self,
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        value_scale: float = 255.0,
        nodata: float | None = None,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.scale = CROP_SCALE
        self.log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
        self.nodata = nodata
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * value_scale, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * value_scale, persistent=False)

    def sample_boxes(self, count: int, height: int, width: int, attempts: int = 10) -> torch.Tensor:
        """[count, 4] (left, top, right, bottom): the first of ``attempts`` random boxes that fits, else the
        whole image clipped to the ratio range, as torchvision's RandomResizedCrop."""
        area = height * width * torch.empty(count, attempts).uniform_(*self.scale)
        ratio = torch.exp(torch.empty(count, attempts).uniform_(*self.log_ratio))
        w = torch.sqrt(area * ratio).round()
        h = torch.sqrt(area / ratio).round()
        fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
        first = torch.where(fits.any(1), fits.float().argmax(1), -1)
        pick = first.clamp(min=0).unsqueeze(1)
        w, h = w.gather(1, pick).squeeze(1), h.gather(1, pick).squeeze(1)
        aspect = width / height
        low, high = math.exp(self.log_ratio[0]), math.exp(self.log_ratio[1])
        fallback_w = float(width if low <= aspect <= high else (round(height * low) if aspect < low else width))
        fallback_h = float(height if low <= aspect <= high else (height if aspect < low else round(width / high)))
        w = torch.where(first >= 0, w, torch.full_like(w, fallback_w))
        h = torch.where(first >= 0, h, torch.full_like(h, fallback_h))
        top = torch.floor(torch.rand(count) * (height - h + 1))
        left = torch.floor(torch.rand(count) * (width - w + 1))
        return torch.stack([left, top, left + w, top + h], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 / uint16 [B, C, H, W] -> normalised float [B, C, input_size, input_size] (+ the validity band
        with ``nodata``)."""
        count, channels, height, width = images.shape
        left, top, right, bottom = self.sample_boxes(count, height, width).unbind(1)
        flip = torch.where(torch.rand(2, count) < 0.5, -1.0, 1.0)
        # output coordinate u in [-1, 1] -> input (align_corners=False): scale = box / side, a flip negates it
        theta = torch.zeros(count, 2, 3)
        theta[:, 0, 0] = flip[0] * (right - left) / width
        theta[:, 0, 2] = (left + right) / width - 1
        theta[:, 1, 1] = flip[1] * (bottom - top) / height
        theta[:, 1, 2] = (top + bottom) / height - 1
        if images.device.type == "cuda":  # no stream synchronisation: copy from pinned memory, asynchronously
            theta = theta.pin_memory().to(images.device, non_blocking=True)
        grid = F.affine_grid(
            theta.to(images.device), [count, channels, self.input_size, self.input_size], align_corners=False
        )
        pixels = images.float()  # exact for uint8 / uint16; compared as floats: CUDA has few uint16 kernels
        if self.nodata is not None:
            valid = (pixels != self.nodata).all(1, keepdim=True)
            pixels = torch.cat([torch.where(valid, pixels, self.mean), valid.float()], dim=1)
        out = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.nodata is not None:
            return torch.cat([(out[:, :-1] - self.mean) / self.std, out[:, -1:]], dim=1)
        return (out - self.mean) / self.std
