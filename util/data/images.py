"""Decoding image files: to 8-bit RGB (PIL, ``load_image``), or any band count and dtype to float32
(``read_raster``)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from util.config import DECODED_BYTES_PER_PIXEL, MAX_IMAGE_PIXELS, STATS_TOOL
from util.errors import DataError, first_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".jp2", ".j2k", ".bmp", ".webp")
# Our own check below refuses what PIL would only warn about (between 1x and 2x its limit)
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


class BadImageError(DataError):
    """An image file that cannot be decoded (any decoder failure); ``reason`` is the decoder's one-line message."""

    def __init__(self, path, reason: str | None = None) -> None:
        if reason is None:  # one ready message: PyTorch re-raises a DataLoader worker's error as type(error)(message)
            super().__init__(str(path))
            self.path, self.reason = "", str(path)
            return
        super().__init__(f"{path}: cannot read image ({reason})")
        self.path, self.reason = str(path), reason

    def __reduce__(
        self,
    ):  # picklable (a worker process's error reaches the parent): the default would call __init__(message)
        return type(self), (self.path, self.reason)


Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def is_image(path: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> bool:
    """A file whose extension is one of ``extensions`` (case-insensitive)."""
    return path.suffix.lower() in extensions and path.is_file()


def is_junk(name: str) -> bool:
    """A hidden file or folder (``.DS_Store``, ``._x.jpg`` macOS resource forks, ``.ipynb_checkpoints``) or a macOS
    archive's ``__MACOSX`` folder: never a class or an image."""
    return name.startswith(".") or name == "__MACOSX"


HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I", "F")
MODE_SAMPLE_BYTES = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4}  # other PIL modes: 1 byte per sample


def pil_limit(max_pixels: float) -> int:
    """``--max_image_pixels`` as an int, made PIL's own limit (``Image.MAX_IMAGE_PIXELS``, a process-wide value) for
    the decode that follows: every reader that may call PIL sets it, so no earlier call's limit, nor PIL's default
    (89 Mpx), applies in its place."""
    limit = int(max_pixels)
    if Image.MAX_IMAGE_PIXELS != limit:
        Image.MAX_IMAGE_PIXELS = limit
    return limit


def check_decoded_size(path, bands: int, height: int, width: int, sample_bytes: int, limit: int, float_copy: bool):
    """Refuse, before decoding, a file whose decoding would allocate too much (``--max_image_pixels``): more than
    ``limit`` pixels, or more than ``limit`` x ``DECODED_BYTES_PER_PIXEL`` bytes for its bands x pixels x (bytes per
    sample, + 4 for the float32 copy where ``float_copy``: rasters, stretched images); and a degenerate shape (no band,
    no pixel). A 552 KB TIFF can declare 64 bands x 2000 x 2000 (4 Mpx, 1.3 GB decoded).

    Raises:
        BadImageError: naming the file, what it declares and the limit.
    """
    if bands < 1 or height < 1 or width < 1:
        raise BadImageError(path, f"it declares {bands} band(s) of {width} x {height} pixels: an empty image")
    if width * height > limit:
        raise BadImageError(
            path, f"it declares {width} x {height} pixels, more than --max_image_pixels {limit}: a decompression bomb?"
        )
    decoded = bands * width * height * (sample_bytes + (4 if float_copy else 0))
    if decoded > limit * DECODED_BYTES_PER_PIXEL:
        raise BadImageError(
            path,
            f"decoding its {bands} band(s) of {width} x {height} pixels would take {decoded / 1e9:.1f} GB, more "
            f"than --max_image_pixels {limit} allows ({limit * DECODED_BYTES_PER_PIXEL / 1e9:.1f} GB): a "
            "decompression bomb? (a genuine file: raise --max_image_pixels, or choose fewer bands when preprocessing)",
        )


def not_eight_bit(path, what: str) -> NotEightBitError:
    return NotEightBitError(
        path,
        f"{what}: not 8-bit RGB data; give per-band statistics (--band_stats FILE.json from "
        f"{STATS_TOOL}, with --in_chans / --bands) or --stretch (1-99 percentile stretch to 8 bit)",
    )


def stretch_to_rgb(data: np.ndarray) -> Image.Image:
    """[C, H, W] of any dtype, C = 3 (R G B) or 1 (grey) -> 8-bit RGB, each band stretched from its 1st to 99th
    percentile (other band counts: ``rgb_of``)."""
    data = data if data.shape[0] == 3 else data[:1].repeat(3, 0)
    low, high = np.percentile(data, [1, 99], axis=(1, 2), keepdims=True)
    values = np.clip((data - low) / np.maximum(high - low, 1e-6), 0, 1) * 255
    return Image.fromarray(np.moveaxis(values.round().astype(np.uint8), 0, -1))


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; 16-bit and float images are stretched from their 1st to 99th percentile."""
    if img.mode in HIGH_BIT_MODES:
        values = np.asarray(img, dtype=np.float32)
        low, high = np.percentile(values, [1, 99])
        values = np.clip((values - low) / max(high - low, 1e-6), 0, 1) * 255
        img = Image.fromarray(values.round().astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")


def _tiff_layout(path) -> tuple[np.dtype, int, bool, bool]:
    """The sample type and band count a TIFF declares, whether its photometric interpretation is RGB (or YCbCr), and
    whether its bands are interleaved (tifffile, header only).

    Raises:
        BadImageError: a layout other than [C, H, W], [H, W, C] or [H, W].
    """
    import tifffile

    logging.getLogger("tifffile").setLevel(logging.ERROR)  # PIL then reports the failure, in one line
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        dtype, axes, shape = series.dtype, series.axes, tuple(series.shape)
        page = tif.pages[0]
        rgb = page.photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)
        interleaved = page.planarconfig == tifffile.PLANARCONFIG.CONTIG
    return dtype, _bands_first_shape(path, shape, axes)[0], rgb, interleaved


STRETCH_ADVICE = (
    "the 8-bit RGB path (--stretch) has no no-data handling: read the files as rasters with per-band statistics "
    f"({STATS_TOOL} --nodata nan, then --band_stats FILE.json --nodata nan)"
)


def rgb_of(path, limit: int, stretch: bool, bands: list[int] | None) -> Image.Image | None:
    """The 8-bit RGB image of a file PIL would misread or not identify: any TIFF but 8-bit grey, RGB or interleaved
    RGBA (8-bit 3-band TIFFs not marked RGB and planar RGBA are read here), and any file with ``bands`` (``--bands`` on
    the 8-bit path: the 3 bands shown as R G B); None where PIL decodes it as it is.

    8-bit data keeps its values; other data is refused, or with ``stretch`` stretched per band (``stretch_to_rgb``).
    More than 3 bands need ``bands``: the first three of a Sentinel-2 tile are aerosol, blue and green, not R G B.

    Raises:
        NotEightBitError: not 8-bit data without ``stretch``; more than 3 bands without ``bands``.
        BadImageError / DataError: as ``read_raster``.
    """
    if bands is None:
        if Path(path).suffix.lower() not in (".tif", ".tiff"):
            return None
        try:
            dtype, count, rgb, interleaved = _tiff_layout(path)
        except BadImageError:
            raise
        except Exception:
            return None  # PIL reports the failure
        if dtype == np.uint8 and (count == 1 or rgb and (count == 3 or count == 4 and interleaved)):
            return None
        if dtype == np.uint8 and (count == 3 or count == 4 and rgb):
            bands = [0, 1, 2]  # 3 bands not marked RGB, planar RGBA: 8-bit data PIL cannot identify, read below
        elif not stretch:
            raise not_eight_bit(path, f"{count} band(s) of {dtype}")
        elif count not in (1, 3):
            raise NotEightBitError(
                path,
                f"{count} band(s) of {dtype}: --stretch shows 3 bands as R G B (or 1 as grey): choose them with "
                "--bands (e.g. Sentinel-2 red, green, blue: --bands 3 2 1)",
            )
    raster = read_raster(path, bands, max_pixels=limit, nan_advice=STRETCH_ADVICE)
    if raster.dtype == "uint8":
        return Image.fromarray(np.ascontiguousarray(np.moveaxis(raster.data.astype(np.uint8), 0, -1)))
    if not stretch:
        raise not_eight_bit(path, f"{raster.data.shape[0]} band(s) of {raster.dtype}")
    return stretch_to_rgb(raster.data)


def load_image(
    path: str,
    draft_size: int | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    stretch: bool = False,
    bands: list[int] | None = None,
) -> Image.Image:
    """Decode ``path`` to 8-bit RGB. JPEGs larger than ``draft_size`` are decoded at a reduced scale (PIL draft).

    Args:
        max_pixels: ``--max_image_pixels``: an image declaring more pixels, or whose decoding would take more memory
            than it allows (``check_decoded_size``), is refused before decoding.
        stretch: ``--stretch``: 16-bit / float images are stretched from their 1st to 99th percentile per band
            instead of refused.
        bands: ``--bands`` with ``--stretch``: the three bands (0-based) shown as R G B.

    Raises:
        NotEightBitError: not 8-bit data, without ``stretch``; more than 3 bands without ``bands``.
        BadImageError: for any failure of the decoder (corrupt, truncated, not an image, declaring more than
            ``max_pixels`` pixels), with the file and the decoder's reason.
    """
    limit = pil_limit(max_pixels)
    converted = rgb_of(path, limit, stretch, list(bands) if bands else None)
    if converted is not None:
        return converted
    try:
        with Image.open(path) as img:
            if img.mode in HIGH_BIT_MODES and not stretch:
                raise not_eight_bit(path, f"PIL mode {img.mode}")
            check_decoded_size(
                path,
                len(img.getbands()),
                img.height,
                img.width,
                MODE_SAMPLE_BYTES.get(img.mode, 1),
                limit,
                float_copy=img.mode in HIGH_BIT_MODES,
            )
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            return to_rgb(img)
    except (BadImageError, NotEightBitError):
        raise
    except MemoryError:
        raise BadImageError(path, "out of memory while decoding") from None
    except Exception as e:  # PIL's decoders raise OSError, SyntaxError, ValueError, struct.error, IndexError, ...
        raise BadImageError(
            path, f"{type(e).__name__}: {first_line(e)}" if not isinstance(e, OSError) else first_line(e)
        ) from None


# --- Multispectral / high-bit-depth rasters -------------------------------------------------------------------------

RASTER_EXTENSIONS = IMAGE_EXTENSIONS + (".npy",)


class NotEightBitError(BadImageError):
    """An image that is not 8-bit (or has a band count PIL cannot show as RGB) on the 8-bit RGB path; never skipped
    by --skip_bad_images (the data needs --band_stats or --stretch, not fewer files)."""

    def __init__(self, path, reason: str | None = None) -> None:
        DataError.__init__(self, str(path) if reason is None else f"{path}: {reason}")  # None: as BadImageError
        self.path, self.reason = ("", str(path)) if reason is None else (str(path), reason)


class Raster:
    """A decoded raster: ``data`` float32 [C, H, W] in the file's own units, ``dtype`` the file's sample type,
    ``mask`` bool [H, W] (True = no-data in any band) or None, and ``nodata`` the no-data value in force (given, or the
    file's tag) or None."""

    def __init__(
        self, data: np.ndarray, dtype: str, mask: np.ndarray | None = None, nodata: float | None = None
    ) -> None:
        self.data, self.dtype, self.mask, self.nodata = data, dtype, mask, nodata


def _tiff_array(path, limit: int) -> tuple[np.ndarray, float | None]:
    import tifffile  # only for rasters: the 8-bit RGB path does not need it

    logging.getLogger("tifffile").setLevel(logging.ERROR)  # its warnings on a damaged file: the error we raise says it

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        series = tif.series[0]
        shape, axes = tuple(series.shape), series.axes
        bands, height, width = _bands_first_shape(path, shape, axes)
        check_decoded_size(path, bands, height, width, series.dtype.itemsize, limit, float_copy=True)
        nodata = None
        tag = page.tags.get(42113)  # GDAL_NODATA (ASCII)
        if tag is not None:
            try:
                nodata = float(str(tag.value).strip().strip("\x00"))
            except ValueError:
                nodata = None
        array = series.asarray()
    return (array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0) if axes.endswith("S") else array), nodata


def _bands_first_shape(path, shape: tuple[int, ...], axes: str) -> tuple[int, int, int]:
    """(bands, height, width) of a TIFF series as [C, H, W] will hold it: interleaved samples (YXS) move to the
    front; planar (SYX) or one page per band (QYX, IYX, CYX) stay; 2-D is one band.

    Raises:
        BadImageError: another layout (4-D and more), before anything is decoded.
    """
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if len(shape) == 3 and axes.endswith("S"):
        return shape[2], shape[0], shape[1]
    if len(shape) == 3:
        return shape
    raise BadImageError(path, f"unsupported TIFF layout {axes} {list(shape)}")


NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _file_array(path, limit: int) -> tuple[np.ndarray, float | None]:
    """[C, H, W] in the file's dtype, and the file's own no-data value (TIFF GDAL_NODATA) or None; the size each
    declares is checked before decoding (``check_decoded_size``)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".tif", ".tiff"):
        return _tiff_array(path, limit)
    if suffix == ".npy":
        with open(path, "rb") as f:  # the header only: shape and dtype, before anything is mapped or read
            read_header = NPY_HEADERS.get(np.lib.format.read_magic(f))
            shape, _, dtype = read_header(f) if read_header else (lambda a: (a.shape, 0, a.dtype))(np.load(path, "r"))
        shape = (1, *shape) if len(shape) == 2 else tuple(shape)
        if len(shape) != 3:
            raise BadImageError(path, f"expected a [C, H, W] or [H, W] array, got shape {shape}")
        check_decoded_size(path, *shape, dtype.itemsize, limit, float_copy=True)
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        return np.asarray(array.reshape(shape)), None
    with Image.open(path) as img:
        bands = 4 if img.mode == "P" else len(img.getbands())  # a palette image becomes RGB(A) below
        check_decoded_size(path, bands, img.height, img.width, MODE_SAMPLE_BYTES.get(img.mode, 1), limit, True)
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        array = np.asarray(img)
    return (array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)), None


NAN_ADVICE = "if NaN marks no-data, give --nodata nan"


def read_raster(
    path,
    bands: list[int] | None = None,
    nodata: float | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    nan_advice: str = NAN_ADVICE,
) -> Raster:
    """Decode a GeoTIFF / TIFF (tifffile), ``.npy`` ([C, H, W] or [H, W]) or JPEG 2000 / PNG / JPEG (Pillow) file of
    any band
    count and of dtype uint8 / uint16 / int16 / float32 (others too) into a ``Raster``.

    Args:
        bands: 0-based band indices to keep, in that order (None: all).
        nodata: The no-data value (default: the TIFF's GDAL_NODATA tag, if any); its pixels form ``mask``.
        max_pixels: ``--max_image_pixels``: refused before decoding beyond it (``check_decoded_size``).
        nan_advice: What the NaN message advises (the caller's way to mark no-data).

    Raises:
        BadImageError: the decoder fails, an empty shape, or a size beyond ``max_pixels`` (the message names the file).
        DataError: a band index outside the file's bands; NaN / inf values outside the no-data mask.
    """
    limit = pil_limit(max_pixels)
    try:
        array, file_nodata = _file_array(path, limit)
    except (BadImageError, DataError):
        raise
    except MemoryError:
        raise BadImageError(path, "out of memory while decoding") from None
    except Exception as e:  # tifffile / numpy / PIL decoder failures
        raise BadImageError(
            path, f"{type(e).__name__}: {first_line(e)}" if not isinstance(e, OSError) else first_line(e)
        ) from None
    if array.dtype.kind not in "buif":
        raise BadImageError(path, f"samples of type {array.dtype}: not real numbers (integers or floats)")
    if bands is not None:
        bad = [b for b in bands if not 0 <= b < array.shape[0]]
        if bad:
            raise DataError(
                f"{path}: --bands {' '.join(map(str, bad))} out of range: the file has {array.shape[0]} "
                f"band(s) (0-based indices 0..{array.shape[0] - 1})"
            )
        array = array[list(bands)]
    dtype = str(array.dtype)
    nodata = file_nodata if nodata is None else nodata
    mask = None
    if nodata is not None:
        hit = np.isnan(array).any(0) if nodata != nodata else (array == nodata).any(0)
        mask = hit if hit.any() else None
    # a copy: a float32 .npy would otherwise stay a read-only memory map (no-data filling writes into it)
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused below
        data = np.array(array, dtype=np.float32, order="C")
    if array.dtype.kind == "f":  # NaN / inf (or float64 beyond float32) would become NaN losses or statistics
        bad = ~np.isfinite(data).all(0)
        if mask is not None:
            bad &= ~mask
        if bad.any():
            raise DataError(
                f"{path}: {int(bad.sum())} pixel(s) with NaN or infinite values (or beyond float32's range; first at "
                "row, column "
                f"{', '.join(map(str, np.argwhere(bad)[0]))}); {nan_advice}"
            )
    return Raster(data, dtype, mask, nodata)
