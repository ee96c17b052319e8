"""Resize a dataset once to the training size, as upstream's launchers expect (``../fmow-rgb-preproc/train_128.csv``).

    python tools/preprocess.py --input ../fmow-rgb/train.csv --output ../fmow-rgb-preproc --size 128 --workers 16
    python tools/preprocess.py --input ../fmow-rgb/val.csv --output ../fmow-rgb-preproc --size 128 --pack

Reads a fMoW-style CSV or an ImageFolder tree; writes every image with its shorter side resized to
``--size`` (bicubic, JPEG quality 95) under ``OUTPUT/{split}_{size}/`` and ``OUTPUT/{split}_{size}.csv``
(label, relative image path, and the class name where the input names its classes: an ImageFolder tree's
folders, a CSV's ``class_name`` column), ``split`` being the input's name (``train.csv`` -> ``train``). It runs in
parallel, each image is written atomically, and a rerun skips the images already done, so an interrupted run
resumes where it stopped. ``--pack`` also writes ``{split}_{size}.u8`` (the centre ``size`` x ``size`` square
of every image, uint8 [N, 3, size, size], band-first, memory-mapped at training time) and ``{split}_{size}.json``
(labels, class names and shape): pass the ``.json`` as ``--train_path`` and crops, flips and normalisation run on the
batch,
on the device.

``--raster`` keeps every band and the sample type (multispectral, 16-bit, float; ``--bands`` selects, 0-based): images
are read by ``util.data.images.read_raster``, resized with antialiased bilinear interpolation (no-data pixels, from
``--nodata`` or the file's GDAL_NODATA tag, are left out of the interpolation: a pixel is no-data in the output where
less than half of its footprint had data; an image already ``--size`` is kept bit for bit) and written as lossless
TIFFs (zlib, horizontal predictor) with the no-data tag; ``--pack`` then writes ``{split}_{size}.u8`` or ``.u16``
(uint8 / uint16 [N, C, size, size]).

``--shards`` also writes WebDataset shards (``util.data.shards``: tar files of ``.npy`` arrays [C, size, size] +
labels, about
256 MB each, in a seeded random order) of the same centre squares to ``{split}_{size}_shards/`` and their manifest
``{split}_{size}.shards.json``: pass the manifest as ``--train_path`` (data beyond one disk, object storage)::

    python tools/preprocess.py --input ssl4eo/train.csv --output ssl4eo-shards --size 224 --raster --shards
"""

from __future__ import annotations

import argparse
import csv
import errno
import itertools
import json
import os
import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# before any third-party import: one error line where this Python lacks the requirements (util/__init__.py)
import util  # noqa: F401

# isort: split

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from util import config
from util.config import (
    MAX_IMAGE_PIXELS,
    HelpFormatter,
)
from util.data import datasets, packed, shards
from util.data.images import BadImageError, NotEightBitError, Raster, load_image, read_raster
from util.data.raster_options import PACKED_DTYPES
from util.errors import (
    DataError,
    ReportableError,
    first_line,
)
from util.files import write_atomically
from util.run.logger import progress
from util.run.process import worker_pool


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the shorter side ``size`` pixels, the aspect ratio kept (rounded)."""
    scale = size / min(height, width)
    return max(size, round(height * scale)), max(size, round(width * scale))


class RasterTask(NamedTuple):
    """``--raster`` options a worker needs: band indices (None: all) and the no-data value (None: the file's tag)."""

    bands: list[int] | None
    nodata: float | None


def resize_one(task: tuple[str, str, int, RasterTask | None, int]) -> str | None:
    """Resize ``source`` to ``target`` (shorter side ``size``; images declaring more than ``max_pixels`` pixels are
    refused); None on success, else the error."""
    source, target, size, raster, max_pixels = task
    if os.path.exists(target):
        return None
    tmp = f"{target}.tmp{os.getpid()}"
    try:
        if raster is not None:
            write_raster(tmp, *resize_raster(read_raster(source, raster.bands, raster.nodata, max_pixels), size))
        else:
            img = load_image(source, draft_size=size, max_pixels=max_pixels)
            height, width = resized_shape(img.height, img.width, size)
            img = img.resize((width, height), Image.BICUBIC, reducing_gap=3.0)
            img.save(tmp, format="JPEG", quality=95)
        os.replace(tmp, target)
        return None
    except NotEightBitError as e:
        problem = f"{source}: {e.reason.split(';')[0]}; --raster keeps every band and the bit depth"
    except (BadImageError, DataError) as e:
        problem = f"{source}: {getattr(e, 'reason', None) or first_line(e)}"
    except OSError as e:  # a full disk: the target's name, which says where
        problem = f"{target}: {e.strerror or first_line(e)}"
    except ValueError as e:
        problem = f"{source}: {first_line(e)}"
    Path(tmp).unlink(missing_ok=True)  # a half-written file would fill the disk further
    return problem


def resize_raster(raster: Raster, size: int) -> tuple[np.ndarray, float | None]:
    """A raster [C, H, W] resized to shorter side ``size`` (bilinear, antialiased), back in its sample type (integers
    rounded and clipped to the type's range); returns (array, no-data value or None).

    No-data pixels are left out (normalised convolution: the resized data weighted by the resized validity); an
    output pixel is no-data where the resized validity is below 0.5; the value is ``raster.nodata``.
    """
    dtype = np.dtype(raster.dtype)
    data = torch.from_numpy(raster.data)[None]  # [1, C, H, W]
    shape = resized_shape(data.shape[-2], data.shape[-1], size)
    resize = partial(F.interpolate, size=shape, mode="bilinear", antialias=True, align_corners=False)
    if shape == tuple(data.shape[-2:]):  # already the size: kept bit for bit
        return raster.data.astype(dtype), raster.nodata
    if raster.mask is None:
        out = resize(data)[0].numpy()
    else:
        valid = torch.from_numpy(~raster.mask)[None, None].float()
        weight = resize(valid)[0, 0].numpy()
        out = resize(torch.where(valid.bool(), data, 0.0))[0].numpy() / np.maximum(
            weight, 1e-6
        )  # not data * valid: NaN * 0 is NaN
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    out = out.astype(dtype)
    if raster.mask is not None:
        out[:, weight < 0.5] = raster.nodata
    return out, raster.nodata


def write_raster(path: str, array: np.ndarray, nodata: float | None) -> None:
    """[C, H, W] as a lossless TIFF (zlib, horizontal predictor; tifffile), with the GDAL_NODATA tag if ``nodata``."""
    import tifffile

    tags = [(42113, "s", 0, f"{nodata:g}", True)] if nodata is not None else []
    tifffile.imwrite(
        path, array, photometric="minisblack", compression="zlib", predictor=array.dtype.kind in "ui", extratags=tags
    )


def centre_square(task: tuple[str, int, bool]) -> tuple[np.ndarray | None, float | None, str | None]:
    """The centre ``size`` square of a resized image, as the packed array and the shards store it: uint8 [3, S, S]
    from an 8-bit RGB file, or with ``raster`` every band in the file's own type [C, S, S] and its no-data value;
    else (None, None, the error in one line).

    Only uint8 and uint16 rasters are kept: both formats store integers (``raster_options.PACKED_DTYPES``), and a float
    or
    signed raster has no lossless place there (train from the TIFFs instead).
    """
    path, size, raster = task
    try:
        if not raster:
            with Image.open(path) as img:
                left, top = (img.width - size) // 2, (img.height - size) // 2
                return (
                    np.asarray(img.convert("RGB").crop((left, top, left + size, top + size))).transpose(2, 0, 1),
                    None,
                    None,
                )
        image = read_raster(path)
    except BadImageError as e:
        return None, None, f"{path}: {e.reason}"
    except (ReportableError, OSError, ValueError) as e:
        return None, None, f"{path}: {first_line(e)}"
    if image.dtype not in PACKED_DTYPES:
        return (
            None,
            None,
            (
                f"{path}: {image.dtype} samples; packed arrays and shards hold {' or '.join(PACKED_DTYPES)} "
                "(train from the TIFFs instead)"
            ),
        )
    top, left = (image.data.shape[1] - size) // 2, (image.data.shape[2] - size) // 2
    return image.data[:, top : top + size, left : left + size].astype(image.dtype), image.nodata, None


def squares(rows: list[tuple[int, str]], root: Path, size: int, raster: bool, imap=map):
    """(index, array [C, S, S], label, no-data value) of every row in order (``centre_square``, through ``imap``: a
    pool's, or ``map``), checked to share one band count, sample type and no-data value.

    Raises:
        DataError: a file that cannot be read, or a format other than the first file's.
    """
    first = None
    for index, (array, nodata, error) in enumerate(
        imap(centre_square, [(str(root / path), size, raster) for _, path in rows])
    ):
        if error:
            raise DataError(error)
        if first is None:
            first = (array.shape[0], array.dtype, nodata)
        elif (array.shape[0], array.dtype, nodata) != first:
            raise DataError(
                f"{root / rows[index][1]}: {array.shape[0]} band(s) of {array.dtype}, no-data {nodata}, but "
                f"{rows[0][1]} has {first[0]} of {first[1]}, no-data {first[2]}: one dataset needs one format"
            )
        yield index, array, rows[index][0], nodata


def reserve(file, size: int) -> None:
    """Allocate ``size`` bytes for ``file`` before writing (``posix_fallocate``), so that a disk without room fails
    now with ENOSPC, before any image is decoded (file systems without it: writes fail as they come). The array is
    written through ``write``, never a memory map: a full disk under a map kills the process with SIGBUS.

    Raises:
        OSError: ENOSPC (or another error) from the reservation.
    """
    try:
        os.posix_fallocate(file.fileno(), 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    except AttributeError:  # no posix_fallocate (macOS)
        pass


def pack(
    rows: list[tuple[int, str]],
    root: Path,
    size: int,
    stem: Path,
    classes: list[str] | None = None,
    names: dict[int, str] | None = None,
    raster: bool = False,
) -> None:
    """Centre ``size`` squares of the resized images (``centre_square``) as one band-first array [N, C, S, S] (uint8
    RGB, or with ``raster`` uint8 / uint16 of every band; memory-mapped at training time, a batch one fancy index) + a
    JSON of labels, shape, layout, sample type and no-data value (``util.data.packed.PackedDataset``). The array's
    space is reserved first (``reserve``); on any failure its temporary file is removed.

    Raises:
        DataError: as ``squares``; a disk without room for the array (``--pack: cannot write FILE: REASON``).
    """
    out = tmp = array_path = None
    nodata = None
    squares_read = progress(squares(rows, root, size, raster), "packing", len(rows), "image")
    try:
        for _, square, _, nodata in squares_read:  # noqa: B007 (nodata: the last square's, used after the loop)
            if out is None:
                dtype, bands = str(square.dtype), square.shape[0]
                array_path = stem.with_suffix(PACKED_DTYPES[dtype])
                tmp = array_path.with_suffix(array_path.suffix + ".tmp")
                out = open(tmp, "wb")
                reserve(out, len(rows) * square.nbytes)
            out.write(np.ascontiguousarray(square).tobytes())  # in row order: index i at i x bytes
        out.flush()
        os.fsync(out.fileno())
        out.close()
        # an earlier run's description goes first: beside the new array (its JSON unwritten: a full disk, a kill) it
        # would describe band-first pixels as its band-last ones, of the same byte count (read transposed, exit 0)
        stem.with_suffix(".json").unlink(missing_ok=True)
        os.replace(tmp, array_path)
    except BaseException as e:
        if out is not None:
            out.close()
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise DataError(f"--pack: cannot write {array_path}: {e.strerror or first_line(e)}") from None
        raise
    meta = {
        "format": f"{dtype} {packed.LAYOUTS[packed.LAYOUT]}, row-major",
        "layout": packed.LAYOUT,
        "count": len(rows),
        "size": size,
        "dtype": dtype,
        "bands": bands,
        "nodata": nodata,
        "array": array_path.name,
        "labels": [label for label, _ in rows],
    }
    if classes:
        meta["classes"] = classes  # index = label
    elif names:
        meta["class_names"] = {str(label): name for label, name in sorted(names.items())}
    write_atomically(stem.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(meta)))


SHARD_ORDER_SEED = (
    0  # samples go into the shards in a random order: a shard is a random subset, not a class or a region
)


def write_shard_files(
    rows: list[tuple[int, str]],
    root: Path,
    size: int,
    raster: bool,
    manifest_path: Path,
    workers: int,
    per_shard: int | None,
    classes: list[str] | None,
    names: dict[int, str] | None,
) -> dict:
    """The centre squares of every row (``squares``, decoded in ``workers`` processes), in a seeded random order, as
    shards + manifest (``util.data.shards.write_shards``).

    Raises:
        DataError: as ``squares``.
    """
    order = np.random.default_rng(SHARD_ORDER_SEED).permutation(len(rows)).tolist()
    shuffled = [rows[i] for i in order]
    with worker_pool(workers, len(rows)) or nullcontext() as pool:
        imap = partial(pool.imap, chunksize=8) if pool else map
        stream = progress(squares(shuffled, root, size, raster, imap), "sharding", len(rows), "image")
        first = next(stream, None)
        if first is None:
            raise DataError("no images to write")
        nodata = first[3]
        samples = ((f"{order[i]:07d}", array, label) for i, array, label, _ in itertools.chain([first], stream))
        return shards.write_shards(
            samples,
            len(rows),
            manifest_path,
            per_shard or shards.samples_per_shard(first[1].nbytes),
            classes,
            names,
            nodata,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=config.summary(__doc__), formatter_class=HelpFormatter)
    parser.add_argument("--input", required=True, type=Path, help="fMoW-style CSV or ImageFolder tree")
    parser.add_argument("--output", required=True, type=Path, help="output folder")
    parser.add_argument("--size", type=int, default=128, help="shorter side after resizing, in pixels")
    parser.add_argument("--split", default=None, help="name of the output split (default: the input's name)")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="parallel processes (default: the CPU count)"
    )
    parser.add_argument(
        "--pack", action="store_true", help="also write the pre-decoded uint8 (--raster: uint8 / uint16) array"
    )
    parser.add_argument(
        "--shards",
        action="store_true",
        help="also write WebDataset shards + NAME.shards.json (data beyond one disk; see util/data/shards.py)",
    )
    parser.add_argument(
        "--shard_samples", type=int, default=None, help="samples per shard (default: about 256 MB of pixels per shard)"
    )
    parser.add_argument(
        "--raster",
        action="store_true",
        help="keep every band and the sample type (multispectral, 16-bit): lossless TIFF output",
    )
    parser.add_argument(
        "--bands", type=int, nargs="+", default=None, metavar="I", help="--raster: 0-based bands to keep (default: all)"
    )
    parser.add_argument(
        "--nodata", type=float, default=None, help="--raster: no-data value (default: the file's GDAL_NODATA tag)"
    )
    parser.add_argument(
        "--max_image_pixels",
        type=float,
        default=float(MAX_IMAGE_PIXELS),
        help="refuse images declaring more pixels (decompression bombs)",
    )
    args = parser.parse_args(argv)

    try:
        config.check_ranges(args)
        if (args.bands or args.nodata is not None) and not args.raster:
            raise config.UsageError("--bands and --nodata need --raster")
        if args.bands and min(args.bands) < 0:
            raise config.UsageError(f"--bands are 0-based indices, got {' '.join(map(str, args.bands))}")
        if args.shard_samples is not None and args.shard_samples < 1:
            raise config.UsageError(f"--shard_samples must be at least 1, got {args.shard_samples}")
        split = args.split or args.input.stem
        folder = f"{split}_{args.size}"
        if (args.output / folder).with_suffix(".csv").resolve() == args.input.resolve():
            raise config.UsageError(f"--output {args.output}: its {folder}.csv would replace --input {args.input}")
        # --output inside an ImageFolder --input (or the --input itself): the images written are no class of the input
        written = args.output / folder if args.output.resolve() == args.input.resolve() else args.output
        dataset = datasets.build_dataset(args.input, list_rasters=args.raster, exclude=written)  # --raster: .npy too
    except (DataError, config.UsageError) as e:
        raise SystemExit(f"error: {e}") from None
    names = dict(dataset.label_names)  # label -> class name; a CSV without names gives str(label)
    if all(name == str(label) for label, name in names.items()):
        names = {}
    classes = list(dataset.classes) or None  # an ImageFolder tree's folders, index = label
    try:
        (args.output / folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(
            f"error: --output {args.output}: cannot create {args.output / folder} ({e.strerror or first_line(e)})"
        ) from None
    rows, tasks = [], []
    for index, (source, label) in enumerate(dataset.samples):
        relative = f"{folder}/{index:07d}_{Path(source).stem}.{'tif' if args.raster else 'jpg'}"
        rows.append((label, relative))
        tasks.append(
            (
                source,
                str(args.output / relative),
                args.size,
                RasterTask(args.bands, args.nodata) if args.raster else None,
                int(args.max_image_pixels),
            )
        )
    todo = sum(not os.path.exists(t[1]) for t in tasks)
    print(
        f"{len(tasks)} images, {len(tasks) - todo} already done, resizing {todo} with {args.workers} workers",
        flush=True,
    )
    with worker_pool(args.workers, len(tasks)) or nullcontext() as pool:
        done = pool.imap(resize_one, tasks, chunksize=64) if pool else map(resize_one, tasks)
        errors = [e for e in progress(done, "resizing", len(tasks), "image") if e]
    if errors:
        raise SystemExit(f"error: {len(errors)} image(s) could not be resized, first {errors[0]}; rerun to retry")
    stem = args.output / folder

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            if names:  # ImageFolder folders (or a CSV's class_name column): kept, read back by util.data.datasets
                writer.writerow(["label", "image_path", "class_name"])
                writer.writerows((label, path, names[label]) for label, path in rows)
            else:
                writer.writerow(["label", "image_path"])
                writer.writerows(rows)

    report(lambda: write_atomically(stem.with_suffix(".csv"), write_csv))
    print(f"wrote {stem.with_suffix('.csv')}", flush=True)
    if args.pack:
        report(lambda: pack(rows, args.output, args.size, stem, classes, names, args.raster))
        print(f"wrote the packed array and {stem.with_suffix('.json')}", flush=True)
    if args.shards:
        manifest_path = args.output / f"{folder}{shards.MANIFEST_SUFFIX}"
        manifest = report(
            lambda: write_shard_files(
                rows,
                args.output,
                args.size,
                args.raster,
                manifest_path,
                args.workers,
                args.shard_samples,
                classes,
                names,
            )
        )
        print(
            f"wrote {len(manifest['shards'])} shard(s) of {manifest['bands']} band(s) of {manifest['dtype']} and "
            f"{manifest_path}",
            flush=True,
        )


def report(write):
    """``write()``; a failure (unreadable file, mixed formats, full disk) exits with one ``error:`` line."""
    try:
        return write()
    except (ReportableError, OSError) as e:
        raise SystemExit(f"error: {first_line(e)}") from None


if __name__ == "__main__":
    main()
