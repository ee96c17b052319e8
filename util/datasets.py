"""Datasets: fMoW-style CSV, ImageFolder trees, unlabelled image folders, and packed uint8 arrays.

Every sample is decoded to 8-bit RGB (``util.images``), then transformed (``util.transforms``).
Randomness per sample comes from a seed the sampler hands over (``util.loaders.SeededSampler``), so the
augmentations of an epoch are the same whatever the number of workers, and a resumed run sees
exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from util.errors import ReportableError
from util.images import is_image, load_image
from util.rng import seeded

DATASET_TYPES = ("auto", "fmow_rgb", "csv", "imagefolder", "folder", "coco", "packed")
DEFAULT_TRAIN_CSV = Path(__file__).resolve().parent.parent / "data" / "sentinel2_rgb" / "train.csv"
DEFAULT_VAL_CSV = DEFAULT_TRAIN_CSV.with_name("val.csv")


class DataError(ReportableError):
    """Bad dataset input; the message names the file (and CSV row) and what is wrong."""


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


def scan_image_folder(root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """ImageFolder layout (root/class_name/*.jpg, as RESISC45, UC Merced, EuroSAT): samples and class names."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples = [
        (str(p), label)
        for label, name in enumerate(classes)
        for p in sorted((root / name).rglob("*"))
        if is_image(p)
    ]
    return samples, classes


def scan_unlabelled(root: Path) -> list[tuple[str, int]]:
    return [(str(p), -1) for p in sorted(root.rglob("*")) if is_image(p)]


def detect_dataset_type(path: Path) -> str:
    if path.is_file():
        return "packed" if path.suffix == ".json" else "fmow_rgb"
    if path.is_dir():
        has_class_dirs = any(d.is_dir() and any(is_image(p) for p in d.rglob("*")) for d in path.iterdir())
        has_top_images = any(is_image(p) for p in path.iterdir())
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


def num_classes(*splits: ImageDataset) -> int:
    """Classes of labelled datasets: the highest label of any split + 1."""
    return max(max(split.targets) for split in splits) + 1


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
