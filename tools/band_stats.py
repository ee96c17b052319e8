"""Per-band mean and standard deviation of a dataset, for ``--band_stats`` (multispectral and 16-bit imagery).

    python tools/band_stats.py --train_path tiles/ --bands 3 2 1 7 --nodata 0 --out stats.json

Streams over the images once (one image in memory at a time), with running per-band sums in float64 (shifted by
the first image's band means, so large offsets lose no precision); no-data pixels are left out. Writes
``{"bands": [...], "mean": [...], "std": [...], "dtype": ..., "pixels": [...]}``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from util.datasets import build_dataset  # noqa: E402
from util.errors import DataError, UsageError, run_entry_point  # noqa: E402
from util.images import read_raster  # noqa: E402


def band_stats(paths, bands: list[int] | None = None, nodata: float | None = None) -> dict:
    """Per-band mean and (population) std over every valid pixel of ``paths``.

    Raises:
        DataError: files with different band counts or dtypes, or no valid pixel in some band.
    """
    shift = total = squares = count = None
    dtype = None
    for path in paths:
        raster = read_raster(path, bands, nodata)
        data = raster.data.reshape(raster.data.shape[0], -1).astype(np.float64)
        valid = np.ones(data.shape[1], bool) if raster.mask is None else ~raster.mask.reshape(-1)
        if shift is None:
            dtype, channels = raster.dtype, data.shape[0]
            shift = data[:, valid].mean(1) if valid.any() else np.zeros(channels)
            total, squares, count = np.zeros(channels), np.zeros(channels), 0
        if data.shape[0] != len(shift) or raster.dtype != dtype:
            raise DataError(f"{path}: {data.shape[0]} band(s) of {raster.dtype}, but the first image has {len(shift)} of {dtype}")
        centred = data[:, valid] - shift[:, None]
        total += centred.sum(1)
        squares += (centred * centred).sum(1)
        count += int(valid.sum())
    if shift is None:
        raise DataError("no images")
    if count == 0:
        raise DataError("every pixel is no-data: no statistics")
    mean = shift + total / count
    std = np.sqrt(np.maximum(squares / count - (total / count) ** 2, 0))
    return {"bands": list(bands) if bands else list(range(len(mean))), "mean": mean.tolist(), "std": std.tolist(),
            "dtype": dtype, "pixels": count}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train_path", required=True, help="CSV file, ImageFolder tree or image folder (TIFF, .npy, PNG, JPEG)")
    parser.add_argument("--bands", type=int, nargs="+", default=None, help="0-based band indices (default: all)")
    parser.add_argument("--nodata", type=float, default=None, help="no-data value (default: a TIFF's GDAL_NODATA tag)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.bands and min(args.bands) < 0:
        raise UsageError("--bands are 0-based indices")
    dataset = build_dataset(args.train_path, "auto", raster=True)
    stats = band_stats([path for path, _ in dataset.samples], args.bands, args.nodata)
    Path(args.out).write_text(json.dumps(stats, indent=1) + "\n")
    print(f"{args.out}: {len(stats['mean'])} band(s) of {stats['dtype']} over {len(dataset)} image(s), {stats['pixels']} valid pixels; "
          f"use --band_stats {args.out}" + (f" --bands {' '.join(map(str, args.bands))}" if args.bands else "")
          + f" --in_chans {len(stats['mean'])}")


if __name__ == "__main__":
    run_entry_point(main, None)
