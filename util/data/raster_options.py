"""Reading multispectral / high-bit-depth data: the band options a run reads files with (``RasterOptions``), and
the checks that pre-decoded data (packed arrays, shards) fits them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from util.config import MAX_IMAGE_PIXELS, Bands, same_value
from util.data.images import read_raster
from util.errors import DataError


class RasterOptions:
    """How ``ImageDataset`` reads multispectral / high-bit-depth files (``images.read_raster``).

    Args:
        in_chans: Bands every sample must have (after ``bands``).
        bands: 0-based band indices to read (None: all).
        nodata: No-data value (None: the TIFF's GDAL_NODATA tag, if any).
        fill: Per-band value for no-data pixels (the normalisation mean: 0 after normalisation).
        valid_channel: Append the validity of each pixel (1 = data, 0 = no-data) as band C, so that it is cropped and
            resampled with the image and reaches the reconstruction loss (pretraining; ``engine_pretrain.split_valid``).
        dtype, stats, stats_nodata: The sample type and the ``--nodata`` the statistics (file ``stats``) were
            computed with, where it records them (None: not known, not compared).
        max_pixels: ``--max_image_pixels``: files declaring more pixels are refused.
    """

    def __init__(
        self,
        in_chans: int,
        bands: Sequence[int] | None,
        nodata: float | None,
        fill: Sequence[float],
        valid_channel: bool = False,
        dtype: str | None = None,
        stats: str | None = None,
        stats_nodata: float | None = None,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        self.in_chans, self.bands, self.nodata = in_chans, list(bands) if bands else None, nodata
        self.fill = np.asarray(fill, dtype=np.float32)
        self.valid_channel = valid_channel
        self.dtype, self.stats, self.stats_nodata = dtype, stats, stats_nodata
        self.max_pixels = max_pixels

    def load(self, path: str, name: str) -> torch.Tensor:
        """float32 [C, H, W] (or [C + 1, H, W] with ``valid_channel``) in the file's units, no-data filled.

        Raises:
            BadImageError: the decoder fails; DataError: wrong band count, bad --bands, a tile of no-data only.
        """
        raster = read_raster(path, self.bands, self.nodata, self.max_pixels)
        if raster.data.shape[0] != self.in_chans:
            raise DataError(
                f"{name}: {raster.data.shape[0]} band(s) but --in_chans is {self.in_chans} (choose bands with --bands)"
            )
        self.check_source(name, raster.dtype, raster.nodata)
        return self.finish(raster.data, raster.mask, name)

    def check_source(self, name: str, dtype: str, nodata: float | None) -> None:
        """Data of sample type ``dtype`` with the no-data value ``nodata`` in force (a file, a packed array, shards)
        must be what ``--band_stats`` was computed on, where the statistics file says (other units, or other pixels
        counted as data, would be normalised wrongly).

        Raises:
            DataError: naming ``name`` and the flag to give.
        """
        if self.dtype and dtype != self.dtype:
            raise DataError(
                f"{name}: {dtype} samples, but --band_stats {self.stats} was computed on {self.dtype} data "
                "(other units: one dataset needs one sample type)"
            )
        if self.stats_nodata is not None and not same_value(nodata, self.stats_nodata):
            raise DataError(
                f"{name}: no-data {nodata} in force, but --band_stats {self.stats} was computed with "
                f"--nodata {self.stats_nodata:g}: give --nodata {self.stats_nodata:g}"
            )

    def finish(self, data: np.ndarray, mask: np.ndarray | None, name: str) -> torch.Tensor:
        """float32 [C, H, W] (modified in place) and its no-data mask [H, W] -> the sample: no-data filled with
        ``fill``, the validity band appended with ``valid_channel``.

        Raises:
            DataError: every pixel is no-data.
        """
        if mask is not None and mask.any():
            if mask.all():
                raise DataError(f"{name}: every pixel is no-data; remove the tile from the dataset")
            data[:, mask] = self.fill[:, None]
        if self.valid_channel:
            valid = np.ones((1, *data.shape[1:]), np.float32) if mask is None else (~mask)[None].astype(np.float32)
            data = np.concatenate([data, valid])
        return torch.from_numpy(data)


def raster_options(bands: Bands, valid_channel: bool = False) -> RasterOptions | None:
    """Multispectral / high-bit-depth reading of ``bands`` (``Bands.raster``), or None for the 8-bit RGB path.
    No-data pixels are filled with the band mean (``bands.mean``); ``valid_channel``: see ``RasterOptions``."""
    if not bands.raster:
        return None
    return RasterOptions(
        bands.in_chans,
        bands.bands,
        bands.nodata,
        bands.mean,
        valid_channel,
        bands.stats_dtype,
        bands.band_stats,
        bands.stats_nodata,
        bands.max_pixels,
    )


PACKED_DTYPES = {"uint8": ".u8", "uint16": ".u16"}  # sample type -> array file suffix


def check_predecoded(source, bands: int, dtype: str, nodata: float | None, raster: RasterOptions | None) -> None:
    """Whether a pre-decoded dataset (packed array, shards) fits the run's flags: 8-bit RGB without no-data on the RGB
    path; ``--in_chans`` bands (chosen when it was written: no ``--bands``, no other ``--nodata``) with ``raster``
    options.

    Raises:
        DataError: naming ``source``, what it holds and the flags it needs.
    """
    if raster is None and (dtype != "uint8" or bands != 3 or nodata is not None):
        raise DataError(
            f"{source}: {bands} band(s) of {dtype}"
            + (f" with no-data {nodata:g}" if nodata is not None else "")
            + f": give --in_chans {bands} and per-band statistics (--band_stats)"
        )
    if raster is not None and raster.bands:
        raise DataError(
            f"{source}: --bands cannot choose its bands: they were chosen when it was written "
            "(tools/preprocess.py --raster --bands)"
        )
    if raster is not None and raster.in_chans != bands:
        raise DataError(f"{source}: {bands} band(s) but --in_chans is {raster.in_chans}")
    recorded = "none" if nodata is None else f"{nodata:g}"
    if raster is not None and raster.nodata is not None and not same_value(raster.nodata, nodata):
        # the recorded value is the one in force: a --nodata that differs was ignored (those pixels trained as data)
        raise DataError(
            f"{source}: its no-data value is {recorded}, recorded when it was written; --nodata {raster.nodata:g} "
            f"cannot change it: leave --nodata out, or preprocess again with tools/preprocess.py --raster --nodata "
            f"{raster.nodata:g}"
        )
    if raster is not None and raster.stats_nodata is not None and not same_value(nodata, raster.stats_nodata):
        # check_source's advice (give --nodata) cannot apply here: the value was fixed when the data was written
        raise DataError(
            f"{source}: its no-data value is {recorded}, recorded when it was written, but --band_stats "
            f"{raster.stats} was computed with --nodata {raster.stats_nodata:g}: preprocess again with "
            f"tools/preprocess.py --raster --nodata {raster.stats_nodata:g}, or compute the statistics on it"
        )
    if raster is not None:
        raster.check_source(str(source), dtype, nodata)


def predecoded_image(pixels: np.ndarray, raster: RasterOptions | None, nodata: float | None, name: str):
    """A pre-decoded sample [C, S, S] (uint8 / uint16) as the per-image transform takes it: a PIL image on the 8-bit
    RGB path, else float32 [C (+1), S, S] with no-data filled (``RasterOptions.finish``)."""
    if raster is None:
        return Image.fromarray(np.ascontiguousarray(np.moveaxis(pixels, 0, -1)))
    data = np.ascontiguousarray(pixels, dtype=np.float32)
    return raster.finish(data, (data == nodata).any(0) if nodata is not None else None, name)
