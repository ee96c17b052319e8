"""Datasets and transforms: fMoW-style CSV, ImageFolder trees, unlabelled image folders.

Every sample is decoded to 8-bit RGB (grayscale replicated, alpha dropped, 16-bit stretched), cropped
and flipped, then normalised. Randomness per sample comes from a seed the sampler hands over, so the
augmentations of an epoch are the same whatever the number of workers, and a resumed run sees
exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, DistributedSampler
from torchvision.transforms import v2

from util.misc import ReportableError

# fMoW-RGB statistics used by upstream ("UPDATED" constants of its util/datasets.py).
FMOW_RGB_MEAN = (0.43392888, 0.43578541, 0.40744025)
FMOW_RGB_STD = (0.19828456, 0.19250111, 0.19454683)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
DATASET_TYPES = ("auto", "fmow_rgb", "csv", "imagefolder", "folder", "coco", "packed")
DEFAULT_TRAIN_CSV = Path(__file__).resolve().parent.parent / "data" / "sentinel2_rgb" / "train.csv"
DEFAULT_VAL_CSV = DEFAULT_TRAIN_CSV.with_name("val.csv")


class DataError(ReportableError):
    """Bad dataset input; the message names the file (and CSV row) and what is wrong."""


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; 16-bit and float images are stretched from their 1st to 99th percentile."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(img, dtype=np.float32)
        low, high = np.percentile(values, [1, 99])
        values = np.clip((values - low) / max(high - low, 1e-6), 0, 1) * 255
        img = Image.fromarray(values.round().astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path: str, draft_size: int | None = None) -> Image.Image:
    """Decode ``path`` to RGB. JPEGs larger than ``draft_size`` are decoded at a reduced scale (PIL draft)."""
    with Image.open(path) as img:
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        return to_rgb(img)


@contextmanager
def seeded(seed: int):
    """Seed torch, Python and NumPy (timm's transforms draw from all three), then restore their states."""
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


class ImageDataset(Dataset):
    """(image path, label) samples with a transform; label -1 for unlabelled images.

    Args:
        samples: (path, label) pairs.
        transform: Applied to the decoded RGB PIL image.
        classes: Class names, index = label.
        describe: Names a sample in error messages (e.g. its CSV row).
        draft_size: JPEG draft decoding target (smallest side needed by the transform).
        skip_bad: Replace an unreadable image by the next readable one (with a warning) instead of stopping.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Callable | None = None,
        classes: Sequence[str] = (),
        describe: Callable[[int], str] | None = None,
        draft_size: int | None = None,
        skip_bad: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.skip_bad = skip_bad
        self.skipped = 0  # per process: every DataLoader worker counts its own
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.classes = list(classes)
        self.describe = describe or (lambda index: self.samples[index][0])
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        for _ in range(len(self.samples)):
            path, label = self.samples[index]
            try:
                img = load_image(path, self.draft_size)
                break
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
                problem = f"{self.describe(index)}: cannot read image ({str(e).splitlines()[0]})"
                if not self.skip_bad:
                    raise DataError(problem + "; --skip_bad_images skips such files") from None
                self.skipped += 1
                print(f"warning: skipped {problem} [{self.skipped} skipped by this process]", file=sys.stderr, flush=True)
                index = (index + 1) % len(self.samples)
        else:
            raise DataError("every image of the dataset is unreadable")
        if self.transform is None:
            return img, label
        with seeded(seed) if seed is not None else nullcontext():
            return self.transform(img), label


class SeededSampler(DistributedSampler):
    """``DistributedSampler`` that yields (index, seed) so each sample's augmentation depends only on
    (seed, epoch, index); ``set_start`` skips the samples of batches already trained in this epoch.
    """

    def __init__(self, dataset: Dataset, *args, **kwargs) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.start:]
        for index in indices:
            digest = hashlib.blake2b(f"{self.seed}/{self.epoch}/{index}".encode(), digest_size=8).digest()
            yield index, int.from_bytes(digest, "little") >> 1

    def __len__(self) -> int:
        return self.num_samples - self.start


class PackedDataset(Dataset):
    """Pre-decoded uint8 images written by ``tools/preprocess.py --pack``, memory-mapped.

    Items are uint8 [3, S, S] tensors for ``BatchAugment`` to crop, flip and normalise on the device; with a
    ``transform`` set, each image goes through it as a PIL image instead (the general, slower path).
    """

    def __init__(self, meta_path: Path, transform: Callable | None = None) -> None:
        try:
            meta = json.loads(meta_path.read_text())
            self.size, count, self.targets = meta["size"], meta["count"], list(meta["labels"])
            self.array_path = meta_path.parent / meta["array"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{meta_path}: not a packed-dataset description ({e})") from None
        expected = count * self.size * self.size * 3
        actual = self.array_path.stat().st_size if self.array_path.is_file() else -1
        if actual != expected or len(self.targets) != count:
            raise DataError(f"{self.array_path}: expected {expected} bytes for {count} images of {self.size} px, found {actual}")
        self.transform = transform
        self.classes: list[str] = []
        self.samples = [(f"{self.array_path}[{i}]", label) for i, label in enumerate(self.targets)]
        self._images: np.ndarray | None = None  # opened lazily, once per worker process

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if self._images is None:
            self._images = np.memmap(self.array_path, dtype=np.uint8, mode="r").reshape(len(self), self.size, self.size, 3)
        pixels = np.array(self._images[index])  # [S, S, 3]
        if self.transform is None:
            return torch.from_numpy(pixels).permute(2, 0, 1), self.targets[index]
        with seeded(seed) if seed is not None else nullcontext():
            return self.transform(Image.fromarray(pixels)), self.targets[index]


class BatchAugment(torch.nn.Module):
    """The training transform on a uint8 batch on the device, in one ``grid_sample``: per-image
    RandomResizedCrop (torchvision's box sampling, vectorised; bilinear, no antialias), horizontal and
    vertical flips, normalisation. Boxes and flips draw from the CPU generator, so they are restored with it
    on resume."""

    def __init__(self, input_size: int, mean: Sequence[float], std: Sequence[float], min_scale: float = 0.25,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        super().__init__()
        self.input_size = input_size
        self.scale = (min_scale, 1.0)
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255, persistent=False)

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
        """images: uint8 [B, 3, H, W] -> normalised float [B, 3, input_size, input_size]."""
        count, _, height, width = images.shape
        left, top, right, bottom = self.sample_boxes(count, height, width).unbind(1)
        flip = torch.where(torch.rand(2, count) < 0.5, -1.0, 1.0)
        # output coordinate u in [-1, 1] -> input (align_corners=False): scale = box / side, a flip negates it
        theta = torch.zeros(count, 2, 3)
        theta[:, 0, 0] = flip[0] * (right - left) / width
        theta[:, 0, 2] = (left + right) / width - 1
        theta[:, 1, 1] = flip[1] * (bottom - top) / height
        theta[:, 1, 2] = (top + bottom) / height - 1
        grid = F.affine_grid(theta.to(images.device), [count, 3, self.input_size, self.input_size], align_corners=False)
        out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        return (out - self.mean) / self.std


def read_csv_samples(csv_path: Path) -> list[tuple[str, int]]:
    """fMoW-RGB CSV: a header row, column 0 = integer label, column 1 = image path (relative to the CSV)."""
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise DataError(f"{csv_path}: cannot read ({e.strerror})") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{csv_path}: not a CSV file ({e})") from None
    samples, missing = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise DataError(f"{csv_path} row {line}: needs 2 columns (label, image path), found {len(row)}")
        try:
            label = int(row[0])
        except ValueError:
            raise DataError(f"{csv_path} row {line}: label {row[0]!r} in column 0 is not an integer") from None
        path = Path(row[1])
        path = path if path.is_absolute() else csv_path.parent / path
        if not path.is_file():
            missing.append(f"row {line}: {path}")
        samples.append((str(path), label))
    if missing:
        raise DataError(f"{csv_path}: {len(missing)} image path(s) do not exist, first {missing[0]}")
    return samples


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def scan_image_folder(root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """ImageFolder layout (root/class_name/*.jpg, as RESISC45, UC Merced, EuroSAT): samples and class names."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples = [
        (str(p), label)
        for label, name in enumerate(classes)
        for p in sorted((root / name).rglob("*"))
        if _is_image(p)
    ]
    return samples, classes


def scan_unlabelled(root: Path) -> list[tuple[str, int]]:
    return [(str(p), -1) for p in sorted(root.rglob("*")) if _is_image(p)]


def detect_dataset_type(path: Path) -> str:
    if path.is_file():
        return "packed" if path.suffix == ".json" else "fmow_rgb"
    if path.is_dir():
        has_class_dirs = any(d.is_dir() and any(_is_image(p) for p in d.rglob("*")) for d in path.iterdir())
        has_top_images = any(_is_image(p) for p in path.iterdir())
        return "imagefolder" if has_class_dirs and not has_top_images else "folder"
    raise DataError(f"{path}: no such file or folder")


def build_dataset(
    path: str | os.PathLike,
    dataset_type: str = "auto",
    transform: Callable | None = None,
    draft_size: int | None = None,
    skip_bad: bool = False,
) -> ImageDataset:
    """A dataset from a CSV file, an ImageFolder tree, a folder of images, or a packed array.

    Args:
        path: CSV file or folder.
        dataset_type: ``fmow_rgb``/``csv`` (CSV), ``imagefolder``, ``folder``/``coco`` (unlabelled, recursive) or ``auto``.
        transform: Applied to each RGB PIL image.
        draft_size: Smallest JPEG decode size the transform needs.
        skip_bad: Skip unreadable images with a warning instead of stopping.

    Raises:
        DataError: unknown type, unreadable or malformed CSV, missing images, or no images at all.
    """
    path = Path(path)
    if dataset_type not in DATASET_TYPES:
        raise DataError(f"--dataset_type {dataset_type!r} is not supported; choose one of {', '.join(DATASET_TYPES)}")
    kind = detect_dataset_type(path) if dataset_type == "auto" else dataset_type
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    classes: list[str] = []
    describe = None
    if kind == "packed":
        return PackedDataset(path, transform)
    if kind in ("fmow_rgb", "csv"):
        if not path.is_file():
            raise DataError(f"{path}: --dataset_type {kind} needs a CSV file, got a folder")
        samples = read_csv_samples(path)
        describe = lambda index: f"{samples[index][0]} (row {index + 2} of {path})"  # noqa: E731
        labels = sorted({label for _, label in samples})
        classes = [str(label) for label in range(labels[-1] + 1)] if labels else []
    elif kind == "imagefolder":
        samples, classes = scan_image_folder(path)
    else:
        samples = scan_unlabelled(path)
    if not samples:
        raise DataError(f"{path}: no images found ({kind} dataset)")
    return ImageDataset(samples, transform, classes, describe, draft_size, skip_bad)


def split_dataset(dataset: ImageDataset, fraction: float, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """A deterministic seeded split into (1 - fraction, fraction) of the samples; the same seed, the same split."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = len(order) - max(1, round(fraction * len(order)))
    if cut < 1:
        raise DataError(f"cannot split {len(dataset)} image(s) into two non-empty parts")
    parts = (sorted(order[:cut]), sorted(order[cut:]))
    return tuple(
        ImageDataset([dataset.samples[i] for i in part], dataset.transform, dataset.classes, draft_size=dataset.draft_size,
                     skip_bad=dataset.skip_bad)
        for part in parts
    )


def build_transform(
    is_train: bool,
    input_size: int,
    mean: Sequence[float] = FMOW_RGB_MEAN,
    std: Sequence[float] = FMOW_RGB_STD,
    min_scale: float = 0.25,
) -> v2.Compose:
    """Upstream's transforms, cropping before normalising.

    Train: RandomResizedCrop(input_size, scale=(min_scale, 1), bicubic) + horizontal and vertical flips.
    Eval: resize the shorter side to input_size / 0.875 (bicubic; no enlargement above 224 px) + centre crop.
    """
    if is_train:
        geometry = [
            v2.RandomResizedCrop(input_size, scale=(min_scale, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
        ]
    else:
        geometry = [v2.Resize(eval_resize_size(input_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(input_size)]
    return v2.Compose([v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def eval_resize_size(input_size: int) -> int:
    """Shorter side before the evaluation centre crop: input_size / 0.875 (MAE's crop_pct), none above 224 px."""
    return input_size if input_size > 224 else math.floor(input_size / 0.875)


def draft_size_for(is_train: bool, input_size: int, min_scale: float = 0.25) -> int:
    """Smallest decode size that loses no resolution: a minimum-scale crop must still cover input_size pixels."""
    return math.ceil(input_size / math.sqrt(min_scale)) if is_train else eval_resize_size(input_size)
