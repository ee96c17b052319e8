"""Per-band mean, standard deviation and percentiles of a dataset, for ``--band_stats`` (multispectral and 16-bit
imagery).

    python tools/band_stats.py --train_path tiles/ --bands 3 2 1 7 --nodata 0 --out stats.json --workers 8

Streams over the images (one image per worker in memory at a time) in chunks of ``--chunk`` files, read by
``--workers`` processes; each chunk's per-band count, mean and sum of squared deviations are merged exactly by Chan et
al.'s parallel formula (Chan, Golub & LeVeque 1979), in file order, so every worker count gives the same numbers.
After every merged chunk the running state is written atomically to ``OUT.partial.npz``; a rerun with the same
inputs and flags continues from it (other inputs or flags: it starts over), and the finished run removes it.
No-data pixels (``--nodata``, else a TIFF's GDAL_NODATA tag; a pixel that is no-data in any band) are left out of
every statistic. Writes ``{"bands", "mean", "std", "dtype", "pixels", "min", "max", "percentiles": {"1": [...], ...},
"percentile_method"}`` (std: population; percentiles: numpy's default linear interpolation between ranks), and
``band_names`` with ``--band_names`` (exports of runs trained with the file name their bands by it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from util.config import MAX_IMAGE_PIXELS, HelpFormatter, check_ranges, summary
from util.data.images import read_raster
from util.errors import DataError, UsageError
from util.files import write_atomically

PERCENTILES = (1.0, 2.0, 50.0, 98.0, 99.0)  # the 1-99 / 2-98 stretches of visualisation, and the median
FLOAT_BINS = 65536  # histogram bins of non-16-bit data (see band_stats)
CHUNK = 64  # files per task and between two state files
# Band names of red, green, blue (Sentinel-2 B04 B03 B02, Landsat 8/9 B4 B3 B2; B04 / B4 alike, any case): --band_names
# that name them make --rgb_bands a lookup.
RGB_NAMES = (("B4", "B3", "B2"), ("RED", "GREEN", "BLUE"), ("R", "G", "B"))


def rgb_bands(names: list[str]) -> list[int] | None:
    """Indices of red, green and blue among ``names`` (the bands read; ``RGB_NAMES``), or None where they are not
    all named."""
    normal = [name.upper().replace("B0", "B", 1) if name.upper().startswith("B0") else name.upper() for name in names]
    for triple in RGB_NAMES:
        if all(name in normal for name in triple):
            return [normal.index(name) for name in triple]
    return None


def is_exact(dtype: str) -> bool:
    """Integer samples of at most 16 bits: a histogram of one bin per value (65536 at most) gives exact percentiles."""
    kind = np.dtype(dtype)
    return kind.kind in "iu" and kind.itemsize <= 2


def value_range(dtype: str) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max) - int(info.min) + 1


class Partial:
    """Statistics of a set of valid pixels, per band: ``count`` (pixels, one for all bands), ``mean``, ``m2`` (sum of
    squared deviations from the mean), ``low`` / ``high`` (min / max) and ``hist`` [C, bins] (None until known)."""

    def __init__(self, channels: int, dtype: str, bins: int | None = None) -> None:
        self.dtype, self.count = dtype, 0
        self.mean, self.m2 = np.zeros(channels), np.zeros(channels)
        self.low, self.high = np.full(channels, np.inf), np.full(channels, -np.inf)
        self.hist = np.zeros((channels, bins), np.int64) if bins else None

    def merge(self, other: Partial) -> None:
        """Chan et al.'s update: mean and m2 of the union of two disjoint sets, without revisiting the pixels."""
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / total)
        self.m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / total)
        self.count = total
        self.low, self.high = np.minimum(self.low, other.low), np.maximum(self.high, other.high)
        if other.hist is not None:
            self.hist = other.hist if self.hist is None else self.hist + other.hist


def chunk_stats(task: tuple) -> Partial | None:
    """Statistics of one chunk of files. ``edges``: None (first pass: moments, and the exact histogram of integer data)
    or (low, high) per band (second pass of other data: the ``FLOAT_BINS`` histogram between them); files larger than
    ``max_pixels`` allows are refused before decoding (``util.data.images.check_decoded_size``)."""
    paths, bands, nodata, edges, max_pixels = task
    result = None  # a Partial once the first file gives the band count and dtype
    for path in paths:
        raster = read_raster(path, bands, nodata, max_pixels)
        data = raster.data.reshape(raster.data.shape[0], -1)
        if raster.mask is not None:
            data = data[:, ~raster.mask.reshape(-1)]
        data = data.astype(np.float64)
        channels = data.shape[0]
        if result is None:
            result = Partial(channels, raster.dtype)
        if channels != len(result.mean) or raster.dtype != result.dtype:
            raise DataError(
                f"{path}: {channels} band(s) of {raster.dtype}, but the chunk's first image has "
                f"{len(result.mean)} of {result.dtype}"
            )
        one = Partial(channels, raster.dtype)
        if data.shape[1]:
            one.count, one.mean = data.shape[1], data.mean(1)
            one.m2 = ((data - one.mean[:, None]) ** 2).sum(1)
            one.low, one.high = data.min(1), data.max(1)
        offset = np.arange(channels)[:, None]
        if edges is None and is_exact(raster.dtype):
            start, bins = value_range(raster.dtype)
            index = (data - start).astype(np.int64) + offset * bins
            one.hist = np.bincount(index.ravel(), minlength=channels * bins).reshape(channels, bins)
        elif edges is not None:
            low, high = edges
            width = np.where(high > low, high - low, 1.0)[:, None]
            index = np.clip(((data - low[:, None]) / width * FLOAT_BINS).astype(np.int64), 0, FLOAT_BINS - 1)
            one.hist = np.bincount((index + offset * FLOAT_BINS).ravel(), minlength=channels * FLOAT_BINS).reshape(
                channels, FLOAT_BINS
            )
        result.merge(one)
    return result


def percentile_values(hist: np.ndarray, percentiles, start: np.ndarray, width: np.ndarray, exact: bool) -> np.ndarray:
    """[P, C] percentiles from per-band histograms [C, bins] whose bin b starts at ``start + b * width`` (per band).

    The value of rank k (0-based, sorted) is read from the bin holding it: exact where a bin is one integer value
    (``exact``, ``width`` 1); otherwise placed inside its bin as if the bin's values were evenly spread, so off by at
    most one bin width. Between ranks, numpy's linear rule: rank h = (n - 1) * p / 100,
    v(floor h) + frac(h) * (v(ceil h) - v(floor h)).
    """
    out = np.empty((len(percentiles), hist.shape[0]))
    for c, counts in enumerate(hist):
        cumulative = np.cumsum(counts)

        def value(k: int, c: int = c, counts: np.ndarray = counts, cumulative: np.ndarray = cumulative) -> float:
            b = int(np.searchsorted(cumulative, k, side="right"))
            if exact:
                return start[c] + b
            before = cumulative[b - 1] if b else 0
            return start[c] + width[c] * (b + (k - before + 0.5) / counts[b])

        for i, p in enumerate(percentiles):
            rank = (cumulative[-1] - 1) * p / 100
            below = int(np.floor(rank))
            out[i, c] = value(below) + (rank - below) * (value(min(below + 1, int(cumulative[-1]) - 1)) - value(below))
    return out


FIELDS = ("count", "mean", "m2", "low", "high", "hist")


def load_state(path: Path | None, key: str, files: int | None = None) -> dict[str, tuple[int, Partial]]:
    """The passes saved in ``path`` (name -> (files done, Partial)) when its key matches and it is consistent (of
    ``files`` files at most), else none: a damaged state starts over, never resumes to wrong statistics."""
    if path is None or not path.exists():
        return {}
    try:
        with np.load(path, allow_pickle=False) as saved:
            if str(saved["key"]) != key:
                print(f"{path}: saved for other inputs or flags; starting over", flush=True)
                return {}
            passes = {}
            for name in str(saved["passes"]).split():
                partial = Partial(len(saved[f"{name}.mean"]), str(saved["dtype"]))
                for field in FIELDS:
                    setattr(partial, field, saved[f"{name}.{field}"])
                partial.count = int(partial.count)
                partial.hist = partial.hist if partial.hist.size else None
                passes[name] = int(saved[f"{name}.done"]), partial
                problem = state_problem(name, passes[name][0], partial, files)
                if problem:
                    print(f"{path}: inconsistent ({problem}); starting over", flush=True)
                    return {}
            return passes
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
        print(f"{path}: unreadable ({type(e).__name__}); starting over", flush=True)
        return {}


def state_problem(name: str, done: int, partial: Partial, files: int | None) -> str | None:
    """What is wrong with a saved pass, or None."""
    channels = len(partial.mean)
    if name not in ("moments", "histogram"):
        return f"unknown pass {name!r}"
    if not 0 < done <= (files if files is not None else done) or partial.count < 0:
        return f"{name}: {done} file(s) done of {files}, {partial.count} pixels"
    if any(np.shape(getattr(partial, field)) != (channels,) for field in ("mean", "m2", "low", "high")):
        return f"{name}: statistics of different band counts"
    if partial.count and not (
        np.isfinite(partial.mean).all() and np.isfinite(partial.m2).all() and (partial.m2 >= 0).all()
    ):
        return f"{name}: non-finite or negative moments"
    try:
        bins = FLOAT_BINS if name == "histogram" else value_range(partial.dtype)[1] if is_exact(partial.dtype) else None
    except TypeError:
        return f"sample type {partial.dtype!r}"
    shape = None if partial.hist is None else partial.hist.shape
    if shape != (None if bins is None else (channels, bins)) or partial.hist is not None and (partial.hist < 0).any():
        return f"{name}: histogram of shape {shape}"
    return None


def save_state(path: Path, key: str, passes: dict[str, tuple[int, Partial]]) -> None:
    arrays = {"key": key, "passes": " ".join(passes), "dtype": next(iter(passes.values()))[1].dtype}
    for name, (done, partial) in passes.items():
        arrays[f"{name}.done"] = done
        for field in FIELDS:
            value = getattr(partial, field)
            arrays[f"{name}.{field}"] = np.zeros(0, np.int64) if value is None else value

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    write_atomically(path, write)


def run_pass(
    paths: list,
    bands,
    nodata,
    edges,
    workers: int,
    chunk: int,
    name: str,
    passes: dict,
    state_path: Path | None,
    key: str,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Partial:
    """One pass over ``paths`` in chunks (``chunk_stats``), merged in file order; continues ``passes[name]`` (files
    done, Partial) where a saved state has it, and saves every pass to ``state_path`` after every chunk."""
    done, total = passes.get(name, (0, None))
    if done:
        print(f"resuming the {name} pass after {done} of {len(paths)} file(s) ({state_path})", flush=True)
    tasks = [(paths[i : i + chunk], bands, nodata, edges, max_pixels) for i in range(done, len(paths), chunk)]
    from util.run.process import worker_pool  # torch: not in the --help path nor in the spawned workers

    pool = worker_pool(workers, len(tasks))
    try:
        for result in pool.imap(chunk_stats, tasks) if pool else map(chunk_stats, tasks):
            if total is None:
                total = result
            elif result.dtype != total.dtype or len(result.mean) != len(total.mean):
                raise DataError(
                    f"files with {len(result.mean)} band(s) of {result.dtype} and with {len(total.mean)} "
                    f"of {total.dtype}: one dataset needs one band count and dtype"
                )
            else:
                total.merge(result)
            done = min(done + chunk, len(paths))
            passes[name] = done, total
            if state_path is not None:
                save_state(state_path, key, passes)
    finally:
        if pool:
            pool.terminate()
    return total


def inputs_key(paths: list, bands, nodata, percentiles, chunk: int) -> str:
    """What a saved state depends on: the files (path, size, modification time) and the flags."""
    digest = hashlib.sha256(repr((bands, nodata, tuple(percentiles), chunk, FLOAT_BINS)).encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def band_stats(
    paths,
    bands: list[int] | None = None,
    nodata: float | None = None,
    percentiles=PERCENTILES,
    workers: int = 1,
    state_path: Path | None = None,
    chunk: int = CHUNK,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> dict:
    """Per-band statistics over every valid pixel of ``paths`` (images of one band count and dtype, [C, H, W]).

    Percentiles are exact for integer data of at most 16 bits (uint8 / int8 / uint16 / int16: a histogram of one bin
    per possible value, in one pass). Other data (float32, int32, ...) takes a second pass: a histogram of
    ``FLOAT_BINS`` (65536) equal bins between each band's min and max from the first pass, each percentile off by at
    most one bin width, (max - min) / 65536.

    Args:
        bands: 0-based band indices (None: all). nodata: the no-data value (None: a TIFF's GDAL_NODATA tag).
        percentiles: in [0, 100]. workers: processes. state_path: where to save / resume the running state (None: no
            resuming). chunk: files per task and between two saves of the state. max_pixels: ``--max_image_pixels``.

    Returns:
        ``{"bands", "mean", "std", "dtype", "pixels", "min", "max", "percentiles": {"p": [per band]},
        "percentile_method"}``; std is the population std (ddof 0), in the file's units.

    Raises:
        DataError: no files, files of different band counts or dtypes, or no valid pixel at all.
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise DataError("no images")
    key = inputs_key(paths, bands, nodata, percentiles, chunk)
    passes = load_state(state_path, key, len(paths))
    total = run_pass(paths, bands, nodata, None, workers, chunk, "moments", passes, state_path, key, max_pixels)
    if total.count == 0:
        raise DataError(f"every pixel of the {len(paths)} image(s) is no-data: no statistics")
    channels = len(total.mean)
    if is_exact(total.dtype):
        start, _ = value_range(total.dtype)
        starts, widths = np.full(channels, float(start)), np.ones(channels)
        method = "exact (one histogram bin per integer value)"
    else:
        edges = (total.low.copy(), total.high.copy())
        second = run_pass(paths, bands, nodata, edges, workers, chunk, "histogram", passes, state_path, key, max_pixels)
        total.hist = second.hist
        starts, widths = total.low, np.where(total.high > total.low, total.high - total.low, 1.0) / FLOAT_BINS
        method = f"histogram of {FLOAT_BINS} bins between each band's min and max (error <= one bin width)"
    values = percentile_values(total.hist, percentiles, starts, widths, is_exact(total.dtype))
    if state_path is not None:
        Path(state_path).unlink(missing_ok=True)
    return {
        "bands": list(bands) if bands else list(range(channels)),
        "nodata": nodata,
        "mean": total.mean.tolist(),
        "std": np.sqrt(total.m2 / total.count).tolist(),
        "dtype": total.dtype,
        "pixels": total.count,
        "min": total.low.tolist(),
        "max": total.high.tolist(),
        "percentiles": {f"{p:g}": values[i].tolist() for i, p in enumerate(percentiles)},
        "percentile_method": method,
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=summary(__doc__), formatter_class=HelpFormatter)
    parser.add_argument(
        "--train_path", required=True, help="CSV file, ImageFolder tree or image folder (TIFF, .npy, PNG, JPEG)"
    )
    parser.add_argument("--bands", type=int, nargs="+", default=None, help="0-based band indices (default: all)")
    parser.add_argument("--nodata", type=float, default=None, help="no-data value (default: a TIFF's GDAL_NODATA tag)")
    parser.add_argument(
        "--percentiles", type=float, nargs="+", default=list(PERCENTILES), help="percentiles in [0, 100]"
    )
    parser.add_argument("--workers", type=int, default=1, help="reading processes")
    parser.add_argument("--chunk", type=int, default=CHUNK, help="files per task, and between two saves of the state")
    parser.add_argument(
        "--band_names",
        nargs="+",
        default=None,
        metavar="NAME",
        help="names of the bands read (after --bands), recorded as band_names: the exports of runs "
        "trained with this file name their bands by it (util/weights/metadata.py)",
    )
    parser.add_argument("--out", required=True, help="JSON file to write (its running state: OUT.partial.npz)")
    parser.add_argument(
        "--max_image_pixels",
        type=float,
        default=float(MAX_IMAGE_PIXELS),
        help="refuse images declaring more pixels, or whose decoding would take more than 4 bytes per pixel of this "
        "(decompression bombs; as the training scripts' flag)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Statistics of the images of ``--train_path`` into ``--out`` (command-line arguments ``argv``).

    Raises:
        UsageError: a flag out of range. DataError: an unreadable image or no image.
    """
    args = get_args_parser().parse_args(argv)
    check_ranges(args)
    if args.bands and min(args.bands) < 0:
        raise UsageError("--bands are 0-based indices")
    if not all(0 <= p <= 100 for p in args.percentiles):
        raise UsageError(f"--percentiles must be in [0, 100], got {' '.join(f'{p:g}' for p in args.percentiles)}")
    if args.workers < 1 or args.chunk < 1:
        raise UsageError("--workers and --chunk must be >= 1")
    if args.band_names and args.bands and len(args.band_names) != len(args.bands):
        raise UsageError(f"--band_names names {len(args.band_names)} band(s), --bands reads {len(args.bands)}")
    out = Path(args.out)
    from util.data.datasets import build_dataset  # imports torch: after the flags are known to work

    dataset = build_dataset(args.train_path, "auto", list_rasters=True)
    stats = band_stats(
        [path for path, _ in dataset.samples],
        args.bands,
        args.nodata,
        args.percentiles,
        args.workers,
        out.with_name(out.name + ".partial.npz"),
        args.chunk,
        int(args.max_image_pixels),
    )
    if args.band_names:
        if len(args.band_names) != len(stats["mean"]):
            raise UsageError(f"--band_names names {len(args.band_names)} band(s), the images have {len(stats['mean'])}")
        stats["band_names"] = list(args.band_names)
    write_atomically(out, lambda tmp: Path(tmp).write_text(json.dumps(stats, indent=1) + "\n"))
    print(
        f"{args.out}: {len(stats['mean'])} band(s) of {stats['dtype']} over {len(dataset)} image(s), {stats['pixels']} "
        "valid pixels; "
        f"use --band_stats {args.out}"
        + (f" --bands {' '.join(map(str, args.bands))}" if args.bands else "")
        + f" --in_chans {len(stats['mean'])}"
        + (f" --rgb_bands {' '.join(map(str, rgb))}" if (rgb := rgb_bands(args.band_names or [])) else "")
    )


if __name__ == "__main__":
    get_args_parser().parse_args()  # --help and malformed flags answer here, before torch loads
    from util.run.process import run_entry_point

    run_entry_point(main, None)
