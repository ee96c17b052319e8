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

from util.config import IGNORE_INDEX, MAX_IMAGE_PIXELS, OFF_PALETTE_TOLERANCE, Bands
from util.data.images import IMAGE_EXTENSIONS, RASTER_EXTENSIONS, is_image, is_junk, load_image, pil_limit
from util.data.loaders import SampleDataset
from util.data.raster_options import raster_options
from util.errors import DataError, first_line
from util.files import file_problem
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
        given = [list(e["color"]) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"--palette {spec}: not 'isprs' nor a JSON list of {{name, color}} ({e})") from None
    # JSON integers only (not bool): int() made [0, 0.9, 0] (a colour in 0..1) black, and every mask off-palette
    bad = [c for c in given if len(c) != 3 or not all(type(v) is int and 0 <= v <= 255 for v in c)]
    if not given or bad:
        raise DataError(f"--palette {spec}: every colour must be 3 integers in 0..255, got {bad[:1] or given}")
    return Palette(names, tuple(tuple(c) for c in given))


def rgb_to_index(
    rgb: np.ndarray, palette: Palette, ignore_index: int = IGNORE_INDEX, off_palette: dict | None = None
) -> np.ndarray:
    """[H, W, 3] uint8 colours -> [H, W] uint8 class indices; colours not in the palette become ``ignore_index``, and
    are counted into ``off_palette`` ((r, g, b) -> pixels) when it is given."""
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2].astype(np.int32)
    out = np.full(code.shape, ignore_index, dtype=np.uint8)
    known = np.zeros(code.shape, dtype=bool)
    for index, (r, g, b) in enumerate(palette.colors):
        hit = code == ((r << 16) | (g << 8) | b)
        out[hit] = index
        known |= hit
    if off_palette is not None and not known.all():
        codes, counts = np.unique(code[~known], return_counts=True)
        for c, n in zip(codes.tolist(), counts.tolist()):
            colour = (c >> 16, (c >> 8) & 255, c & 255)
            off_palette[colour] = off_palette.get(colour, 0) + n
    return out


def describe_colours(counts: dict[tuple[int, int, int], int], limit: int = 3) -> str:
    """``(0, 254, 0) x 5000, (255, 0, 255) x 12 and 3 more colours``, most frequent first."""
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    shown = ", ".join(f"({r}, {g}, {b}) x {n}" for (r, g, b), n in ranked[:limit])
    return shown + (f" and {len(ranked) - limit} more colour(s)" if len(ranked) > limit else "")


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
    off_palette: dict | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """A mask file -> [H, W] int64 class indices (masks declaring more than ``max_pixels``, ``--max_image_pixels``,
    refused before decoding, as images are).

    Single-channel (``L``, ``P``, 16-bit) files hold the indices themselves (a palette PNG's pixel values are its
    indices, unless its colour table puts ``palette``'s colours at other indices: ``palette_png_indices``); RGB files
    are decoded through ``palette``, colours not in it becoming ``ignore_index`` and counted into
    ``off_palette`` ((r, g, b) -> pixels; ``SegDataset.check_masks`` refuses masks with too many).
    ``zero_is_nodata`` applies ``reduce_zero_label``.

    Raises:
        DataError: JPEG mask, unreadable file, an RGB mask without a palette or with ``zero_is_nodata``, a mask
            beyond ``max_pixels``.
    """
    check_mask_path(path)
    limit = pil_limit(max_pixels)
    try:
        with Image.open(path) as img:
            if img.width * img.height > limit:  # PIL itself only warns up to twice its limit
                raise DataError(
                    f"{path}: the mask declares {img.width} x {img.height} pixels, more than --max_image_pixels "
                    f"{limit}: a decompression bomb?"
                )
            img.load()
            if img.mode in ("RGB", "RGBA"):
                if palette is None:
                    raise DataError(f"{path}: an RGB (colour-coded) mask needs --palette (isprs or a JSON file)")
                if zero_is_nodata:
                    raise colour_coded_nodata(path, palette)
                mask = rgb_to_index(np.asarray(img.convert("RGB")), palette, ignore_index, off_palette)
                mask = mask.astype(np.int64)
            elif img.mode == "P" and palette is not None:
                mask = palette_png_indices(
                    path, np.asarray(img), img.getpalette() or [], palette, ignore_index, zero_is_nodata
                )
            elif img.mode in ("L", "P", "I;16", "I;16B", "I;16L", "I", "1"):
                mask = np.asarray(img).astype(np.int64)
            else:
                raise DataError(f"{path}: mask mode {img.mode} is neither class indices nor RGB colours")
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: cannot read mask ({first_line(e)}; --max_image_pixels {limit})") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read mask ({first_line(e)})") from None
    return reduce_zero_label(mask, ignore_index) if zero_is_nodata else mask


def colour_coded_nodata(path, palette: Palette) -> DataError:
    """--reduce_zero_label on a colour-coded mask: class 0 would become ignore, every other class its predecessor."""
    return DataError(
        f"{path}: --reduce_zero_label is for class-index masks (0: no data); this one is colour-coded (--palette): "
        f"its class 0 ({palette.names[0]}) would be ignored and every other class scored under the name before it; "
        "leave --reduce_zero_label out (no data: a colour outside the palette, with --off_palette_tolerance 1)"
    )


def palette_png_indices(
    path,
    indices: np.ndarray,
    table: list[int],
    palette: Palette,
    ignore_index: int = IGNORE_INDEX,
    zero_is_nodata: bool = False,
) -> np.ndarray:
    """The [H, W] int64 class indices of a palette-mode (P) PNG mask read with ``palette``: its pixel values, where its
    colour table shows ``palette``'s colours at their own indices or not at all (``write_mask``'s files; GIS exports
    whose colours are for display); decoded through the colours, where the table holds only ``palette``'s colours but
    in another order (an RGB mask quantised by an image editor: its indices are arbitrary, the colours are the labels).
    ``ignore_index`` pixels stay ignore.

    Raises:
        DataError: a table that shows some of ``palette``'s colours at other indices and other colours too: neither
            reading tells the classes; colours with ``zero_is_nodata`` (``colour_coded_nodata``).
    """
    used = [int(v) for v in np.unique(indices) if v != ignore_index]
    colours = {v: tuple(table[3 * v : 3 * v + 3]) for v in used}
    moved = {
        v: palette.colors.index(c)
        for v, c in colours.items()
        if c in palette.colors and palette.colors[v : v + 1] != (c,)
    }
    if not moved:
        return indices.astype(np.int64)
    unknown = [v for v, c in colours.items() if c not in palette.colors]
    if unknown:
        shown = ", ".join(
            f"index {v} is {colours[v]} (--palette's {palette.names[k]})" for v, k in list(moved.items())[:3]
        )
        raise DataError(
            f"{path}: a palette-mode mask whose colour table shows --palette's colours at other indices ({shown}) and "
            f"colours not in --palette (index {unknown[0]}: {colours[unknown[0]]}): its classes cannot be told; "
            "save it as RGB or as class indices in --palette's order"
        )
    if zero_is_nodata:
        raise colour_coded_nodata(path, palette)
    lookup = np.full(256, ignore_index, dtype=np.int64)
    for v, c in colours.items():
        lookup[v] = palette.colors.index(c)
    return lookup[indices]


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
            if is_image(p, extensions) and not is_junk(p.name):  # macOS ._x.png resource forks
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
        if line == 1 and not any(f.exists() for f in files):
            continue  # header
        missing += [f"row {line}: {f} {problem}" for f in files for problem in [file_problem(f)] if problem]
        pairs.append((str(files[0]), str(files[1])))
    if missing:
        raise DataError(f"{path}: {len(missing)} file(s) missing or not readable files, first {missing[0]}")
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


def check_same_size(mask_path, shape: tuple[int, ...], height: int, width: int) -> None:
    """Raises DataError where a mask's [H, W] ``shape`` is not its image's ``height`` x ``width``."""
    if tuple(shape) != (height, width):
        raise DataError(f"{mask_path}: mask is {shape[1]}x{shape[0]} px, its image {width}x{height}")


@dataclass(frozen=True)
class MaskSummary:
    """What ``SegDataset.check_masks`` found: masks, labelled pixels (not ``ignore_index``), and the pixels of colours
    not in the palette (counted as ignore) with the number of masks holding any; ``class_pixels``: the labelled pixels
    of each class (index = class)."""

    masks: int
    labelled: int
    off_palette: int
    off_palette_masks: int
    class_pixels: tuple[int, ...] = ()

    def describe(self, palette: bool) -> str:
        """One line for the evaluation output."""
        text = f"{self.labelled} labelled pixel(s) in {self.masks} mask(s)"
        if palette:
            text += f"; {self.off_palette} pixel(s) of colours not in the palette counted as ignore"
            text += f" (in {self.off_palette_masks} mask(s))" if self.off_palette else ""
        return text


class SegDataset(SampleDataset):
    """(image, mask) pairs -> (normalised float image [C, H, W], int64 mask [H, W]).

    Args:
        pairs: (image path, mask path).
        transform: Joint v2 transform of (``tv_tensors.Image`` uint8, ``tv_tensors.Mask`` int64).
        num_classes: Mask values must be in 0..num_classes-1 or ``ignore_index`` (checked per image).
        palette: Decodes RGB masks.
        zero_is_nodata: ``--reduce_zero_label``.
        off_palette_tolerance: ``--off_palette_tolerance``: the fraction of a mask's pixels that may be of colours
            not in ``palette`` (they count as ``ignore_index``); ``check_masks`` refuses masks with more.
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
        off_palette_tolerance: float = OFF_PALETTE_TOLERANCE,
    ) -> None:
        self.pairs, self.transform, self.num_classes = list(pairs), transform, num_classes
        self.palette, self.ignore_index, self.zero_is_nodata = palette, ignore_index, zero_is_nodata
        self.off_palette_tolerance = off_palette_tolerance
        self.masks: MaskSummary | None = None  # check_masks's
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
                pixels = load_image(
                    image_path, max_pixels=self.bands.max_pixels, stretch=self.bands.stretch, bands=self.bands.bands
                )
                image = torch.from_numpy(np.asarray(pixels).copy()).permute(2, 0, 1)
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
                raise DataError(f"{image_path}: cannot read image ({str(e).splitlines()[0]})") from None
        mask = self.mask(index)
        check_same_size(mask_path, mask.shape, *image.shape[-2:])
        return tv_tensors.Image(image), tv_tensors.Mask(torch.from_numpy(mask))

    def mask(self, index: int, off_palette: dict | None = None) -> np.ndarray:
        """The [H, W] int64 class indices of pair ``index`` (``read_mask``; off-palette colours into ``off_palette``).

        Raises:
            DataError: labels outside 0..num_classes-1 that are not ``ignore_index``.
        """
        mask_path = self.pairs[index][1]
        mask = read_mask(
            mask_path, self.palette, self.ignore_index, self.zero_is_nodata, off_palette, self.bands.max_pixels
        )
        bad = (mask >= self.num_classes) & (mask != self.ignore_index) | (mask < 0)
        if bad.any():
            raise DataError(
                f"{mask_path}: label(s) {sorted(np.unique(mask[bad]).tolist())[:5]} outside 0..{self.num_classes - 1} "
                f"and not --ignore_index {self.ignore_index} (the classes come from --palette, --class_names or "
                "--nb_classes; the default is the embedded sample's 3)"
            )
        return mask

    def check_size(self, image_path: str, mask_path: str, shape: tuple[int, ...]) -> None:
        """Refuse a mask whose [H, W] ``shape`` is not its image's, from the image's header where PIL reads it (the
        8-bit path; rasters are checked as they are read, by ``load``), before training rather than at its step.

        Raises:
            DataError: naming the mask and both sizes.
        """
        if self.raster is not None:
            return
        try:
            with Image.open(image_path) as img:
                height, width = img.height, img.width
        except Exception:  # the decoder's failure is reported where the image is read
            return
        check_same_size(mask_path, shape, height, width)

    def check_masks(self, what: str) -> MaskSummary:
        """Read every mask once, before training or evaluation: labels in range, off-palette colours within
        ``off_palette_tolerance`` per mask, and the counts the evaluation reports (``self.masks``).

        Args:
            what: Names the set in messages (``training``, ``evaluation``).

        Raises:
            DataError: a label out of range; a mask of another size than its image (``check_size``); masks with
                more off-palette pixels than the tolerance (naming up to three of them with their colours and counts,
                and how many there are); no labelled pixel at all.
        """
        labelled = off_pixels = off_files = 0
        class_pixels = np.zeros(self.num_classes, dtype=np.int64)
        refused: list[tuple[str, int, int, dict]] = []
        for index, (image_path, mask_path) in enumerate(self.pairs):
            colours: dict = {}
            mask = self.mask(index, colours)
            self.check_size(image_path, mask_path, mask.shape)
            class_pixels += np.bincount(mask[mask != self.ignore_index], minlength=self.num_classes)
            labelled += int((mask != self.ignore_index).sum())
            count = sum(colours.values())
            if count:
                off_pixels, off_files = off_pixels + count, off_files + 1
                if count > self.off_palette_tolerance * mask.size:
                    refused.append((mask_path, count, mask.size, colours))
        if refused:
            shown = "; ".join(
                f"{path}: {count} of {size} px ({describe_colours(colours)})"
                for path, count, size, colours in refused[:3]
            )
            raise DataError(
                f"{len(refused)} {what} mask(s) hold colours not in the palette beyond --off_palette_tolerance "
                f"{self.off_palette_tolerance:g} of their pixels: {shown}{' ...' if len(refused) > 3 else ''}; fix "
                "the palette (--palette) or the masks, or give --off_palette_tolerance 1 to count such pixels as "
                "--ignore_index"
            )
        if not labelled:
            raise DataError(
                f"{self.source or 'dataset'}: no labelled pixel in its {len(self.pairs)} {what} mask(s): every pixel "
                f"is --ignore_index {self.ignore_index}"
                + (" (after --reduce_zero_label: 0 is no-data)" if self.zero_is_nodata else "")
                + (f", {off_pixels} of them of colours not in the palette" if off_pixels else "")
                + (": nothing to learn from" if what == "training" else ": no pixel to score")
            )
        self.masks = MaskSummary(len(self.pairs), labelled, off_pixels, off_files, tuple(class_pixels.tolist()))
        return self.masks

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, mask = self.load(index)
        if self.transform is not None:
            with seeded(seed) if seed is not None else nullcontext():
                image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()
