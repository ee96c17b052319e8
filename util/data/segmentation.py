"""Segmentation data: image / mask pairs (``images/`` + ``masks/`` folders matched by file stem, or a CSV of
image path, mask path), masks as class indices or as colours through a palette (ISPRS), LoveDA's
``reduce_zero_label``, and joint image + mask augmentation (torchvision v2 with ``tv_tensors.Mask``).

Masks are read and written losslessly (PNG, TIFF, BMP); JPEG masks are refused: compression invents labels at
every class boundary. Mask pixels equal to ``ignore_index`` (default 255) count in no loss and no metric.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms import v2

from util.config import IGNORE_INDEX, Bands
from util.data.images import IMAGE_EXTENSIONS, RASTER_EXTENSIONS, is_image, load_image
from util.data.loaders import SampleDataset
from util.data.raster_options import raster_options
from util.errors import DataError
from util.run.rng import seeded

LOSSY_MASK_SUFFIXES = (".jpg", ".jpeg", ".jfif")


@dataclass(frozen=True)
class Palette:
    """Class names and their RGB colours (index = class)."""

    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.colors):
            raise DataError(f"palette: {len(self.names)} names for {len(self.colors)} colours")
        if len(set(self.colors)) != len(self.colors):
            raise DataError("palette: two classes share a colour")


# ISPRS 2D semantic labelling (Potsdam, Vaihingen): RGB-coded labels, six classes.
ISPRS = Palette(
    ("impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter"),
    ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0)),
)
BUILTIN_PALETTES = {"isprs": ISPRS}


def load_palette(spec: str | os.PathLike) -> Palette:
    """``isprs`` or a JSON file: ``[{"name": "water", "color": [0, 0, 255]}, ...]`` (index = position in the list).

    Raises:
        DataError: unreadable file or malformed entries.
    """
    if str(spec).lower() in BUILTIN_PALETTES:
        return BUILTIN_PALETTES[str(spec).lower()]
    try:
        entries = json.loads(Path(spec).read_text())
        names = tuple(str(e["name"]) for e in entries)
        colors = tuple(tuple(int(c) for c in e["color"]) for e in entries)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"--palette {spec}: not 'isprs' nor a JSON list of {{name, color}} ({e})") from None
    if not colors or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in colors):
        raise DataError(f"--palette {spec}: every colour must be 3 values in 0..255")
    return Palette(names, colors)


def rgb_to_index(rgb: np.ndarray, palette: Palette, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """[H, W, 3] uint8 colours -> [H, W] uint8 class indices; colours not in the palette become ``ignore_index``."""
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2].astype(np.int32)
    out = np.full(code.shape, ignore_index, dtype=np.uint8)
    for index, (r, g, b) in enumerate(palette.colors):
        out[code == ((r << 16) | (g << 8) | b)] = index
    return out


def index_to_rgb(index: np.ndarray, palette: Palette, ignore_color: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """[H, W] class indices -> [H, W, 3] uint8 colours; indices outside the palette (ignore) get ``ignore_color``."""
    table = np.array([*palette.colors] + [ignore_color] * (256 - len(palette.colors)), dtype=np.uint8)
    return table[np.asarray(index).astype(np.int64).clip(0, 255)]


def reduce_zero_label(mask: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """LoveDA / ADE20K convention: 0 (no data) -> ignore, k -> k - 1; ignore stays ignore."""
    mask = mask.astype(np.int64)
    out = mask - 1
    out[(mask == 0) | (mask == ignore_index)] = ignore_index
    return out


def check_mask_path(path: str | os.PathLike) -> None:
    """Raises DataError for a lossy (JPEG) mask file."""
    if Path(path).suffix.lower() in LOSSY_MASK_SUFFIXES:
        raise DataError(f"{path}: JPEG masks are refused (lossy compression changes labels at every boundary); use PNG")


def read_mask(
    path: str | os.PathLike,
    palette: Palette | None = None,
    ignore_index: int = IGNORE_INDEX,
    zero_is_nodata: bool = False,
) -> np.ndarray:
    """A mask file -> [H, W] int64 class indices.

    Single-channel (``L``, ``P``, 16-bit) files hold the indices themselves (a palette PNG's pixel values are its
    indices); RGB files are decoded through ``palette``. ``zero_is_nodata`` applies ``reduce_zero_label``.

    Raises:
        DataError: JPEG mask, unreadable file, or an RGB mask without a palette.
    """
    check_mask_path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGB", "RGBA"):
                if palette is None:
                    raise DataError(f"{path}: an RGB (colour-coded) mask needs --palette (isprs or a JSON file)")
                mask = rgb_to_index(np.asarray(img.convert("RGB")), palette, ignore_index).astype(np.int64)
            elif img.mode in ("L", "P", "I;16", "I;16B", "I;16L", "I", "1"):
                mask = np.asarray(img).astype(np.int64)
            else:
                raise DataError(f"{path}: mask mode {img.mode} is neither class indices nor RGB colours")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read mask ({str(e).splitlines()[0]})") from None
    return reduce_zero_label(mask, ignore_index) if zero_is_nodata else mask


def write_mask(path: str | os.PathLike, mask: np.ndarray, palette: Palette | None = None) -> None:
    """[H, W] class indices (0..255) -> an 8-bit PNG, palette-coloured when ``palette`` is given (lossless).

    Raises:
        DataError: a suffix other than .png, or values outside 0..255.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise DataError(f"{path}: masks are written as PNG only (lossless)")
    mask = np.asarray(mask)
    if mask.min() < 0 or mask.max() > 255:
        raise DataError(f"{path}: mask values must be 0..255, found {mask.min()}..{mask.max()}")
    img = Image.fromarray(mask.astype(np.uint8), mode="L")
    if palette is not None:
        img = img.convert("P")
        img.putpalette(index_to_rgb(np.arange(256), palette).reshape(-1).tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)


def pairs_from_folders(root: Path, image_extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[tuple[str, str]]:
    """``root/images/*`` matched to ``root/masks/*`` by file stem (``a.jpg`` <-> ``a.png``; multispectral:
    ``image_extensions`` = ``RASTER_EXTENSIONS``, ``a.tif`` / ``a.npy`` <-> ``a.png``).

    Raises:
        DataError: an image without a mask, a mask without an image, or two files of one stem.
    """

    def by_stem(folder: Path, extensions: tuple[str, ...]) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for p in sorted(folder.iterdir()):
            if is_image(p, extensions):
                if p.stem in found:
                    raise DataError(f"{folder}: two files named {p.stem}.* ({found[p.stem].name}, {p.name})")
                found[p.stem] = p
        return found

    # masks of every image suffix, JPEG too: find_pairs then refuses a JPEG mask by name rather than miss it
    images, masks = by_stem(root / "images", image_extensions), by_stem(root / "masks", IMAGE_EXTENSIONS)
    no_mask, no_image = sorted(set(images) - set(masks)), sorted(set(masks) - set(images))
    if no_mask or no_image:
        problems = ([f"{len(no_mask)} image(s) without a mask (first: {no_mask[0]})"] if no_mask else []) + (
            [f"{len(no_image)} mask(s) without an image (first: {no_image[0]})"] if no_image else []
        )
        raise DataError(f"{root}: {'; '.join(problems)}")
    return [(str(images[s]), str(masks[s])) for s in sorted(images)]


def pairs_from_csv(path: Path) -> list[tuple[str, str]]:
    """CSV with columns (image path, mask path), relative to the CSV; a header row is skipped.

    Raises:
        DataError: unreadable CSV, too few columns, or missing files.
    """
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and "".join(r).strip()]
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the CSV ({e})") from None
    pairs, missing = [], []
    for line, row in enumerate(rows, start=1):
        if len(row) < 2:
            raise DataError(f"{path} row {line}: needs 2 columns (image path, mask path), found {len(row)}")
        files = [Path(c.strip()) if Path(c.strip()).is_absolute() else path.parent / c.strip() for c in row[:2]]
        if line == 1 and not any(f.is_file() for f in files):
            continue  # header
        missing += [f"row {line}: {f}" for f in files if not f.is_file()]
        pairs.append((str(files[0]), str(files[1])))
    if missing:
        raise DataError(f"{path}: {len(missing)} file(s) do not exist, first {missing[0]}")
    return pairs


def find_pairs(path: str | os.PathLike, raster: bool = False) -> list[tuple[str, str]]:
    """Image / mask pairs from a CSV file or an ``images/`` + ``masks/`` folder (``raster``: image files of
    ``RASTER_EXTENSIONS``, ``.npy`` included); JPEG masks refused.

    Raises:
        DataError: neither form, no pairs, or a JPEG mask.
    """
    path = Path(path)
    if path.is_file():
        pairs = pairs_from_csv(path)
    elif (path / "images").is_dir() and (path / "masks").is_dir():
        pairs = pairs_from_folders(path, RASTER_EXTENSIONS if raster else IMAGE_EXTENSIONS)
    else:
        raise DataError(f"{path}: neither a CSV of (image, mask) paths nor a folder holding images/ and masks/")
    if not pairs:
        raise DataError(f"{path}: no image / mask pairs")
    for _, mask in pairs:
        check_mask_path(mask)
    return pairs


def train_transform(
    crop: int,
    mean: Sequence[float],
    std: Sequence[float],
    ignore_index: int = IGNORE_INDEX,
    scale: tuple[float, float] = (0.25, 1.0),
) -> v2.Compose:
    """Joint training augmentation of (``tv_tensors.Image``, ``tv_tensors.Mask``): pad to the crop if smaller
    (image 0, mask ``ignore_index``), RandomResizedCrop (image bilinear with antialias; the mask ALWAYS nearest
    neighbour: torchvision v2 resamples ``Mask`` with NEAREST whatever the interpolation asked), horizontal and
    vertical flips, then the image to float and normalised (the mask stays integer). Images are uint8 [3, H, W]
    (scaled to [0, 1]) or float32 [C, H, W] in the file's units (multispectral: kept as they are, then
    normalised per band with ``mean`` / ``std`` in those units)."""
    return v2.Compose(
        [
            PadTo(crop, ignore_index),
            v2.RandomResizedCrop(crop, scale=scale, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def eval_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """The whole image, normalised (sliding-window inference handles any size); uint8 or float, as
    ``train_transform``."""
    return v2.Compose(
        [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True), v2.Normalize(list(mean), list(std))]
    )


class PadTo(torch.nn.Module):
    """Pad (bottom / right) to at least ``size`` per side: image with 0, mask with ``ignore_index``."""

    def __init__(self, size: int, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.size, self.ignore_index = size, ignore_index

    def forward(self, image, mask):
        h, w = image.shape[-2:]
        if h >= self.size and w >= self.size:
            return image, mask
        padding = [0, 0, max(self.size - w, 0), max(self.size - h, 0)]
        return (v2.functional.pad(image, padding, fill=0), v2.functional.pad(mask, padding, fill=self.ignore_index))


class SegDataset(SampleDataset):
    """(image, mask) pairs -> (normalised float image [C, H, W], int64 mask [H, W]).

    Args:
        pairs: (image path, mask path).
        transform: Joint v2 transform of (``tv_tensors.Image`` uint8, ``tv_tensors.Mask`` int64).
        num_classes: Mask values must be in 0..num_classes-1 or ``ignore_index`` (checked per image).
        palette: Decodes RGB masks.
        zero_is_nodata: ``--reduce_zero_label``.
        bands: How images are read (``util.config.Bands``): multispectral / high-bit-depth rasters (any band count and
            dtype, ``.npy`` too) as float32 [C, H, W] in the file's units, no-data filled; else 8-bit RGB (uint8
            [3, H, W]); ``--stretch`` and ``--max_image_pixels`` apply.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        transform: Callable | None,
        num_classes: int,
        palette: Palette | None = None,
        ignore_index: int = IGNORE_INDEX,
        zero_is_nodata: bool = False,
        bands: Bands | None = None,
    ) -> None:
        self.pairs, self.transform, self.num_classes = list(pairs), transform, num_classes
        self.palette, self.ignore_index, self.zero_is_nodata = palette, ignore_index, zero_is_nodata
        self.bands = bands or Bands()
        self.raster = raster_options(self.bands)
        self.source = ""

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        image_path, mask_path = self.pairs[index]
        if self.raster is not None:
            image = self.raster.load(image_path, image_path)  # BadImageError / DataError name the file
        else:
            try:
                pixels = load_image(image_path, max_pixels=self.bands.max_pixels, stretch=self.bands.stretch)
                image = torch.from_numpy(np.asarray(pixels).copy()).permute(2, 0, 1)
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
                raise DataError(f"{image_path}: cannot read image ({str(e).splitlines()[0]})") from None
        mask = read_mask(mask_path, self.palette, self.ignore_index, self.zero_is_nodata)
        height, width = image.shape[-2:]
        if mask.shape != (height, width):
            raise DataError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} px, its image {width}x{height}")
        bad = (mask >= self.num_classes) & (mask != self.ignore_index) | (mask < 0)
        if bad.any():
            raise DataError(
                f"{mask_path}: label(s) {sorted(np.unique(mask[bad]).tolist())[:5]} outside 0..{self.num_classes - 1} "
                f"and not --ignore_index {self.ignore_index}"
            )
        return tv_tensors.Image(image), tv_tensors.Mask(torch.from_numpy(mask))

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, mask = self.load(index)
        if self.transform is not None:
            with seeded(seed) if seed is not None else nullcontext():
                image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()
