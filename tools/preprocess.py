"""Resize a dataset once to the training size, as upstream's launchers expect (``../fmow-rgb-preproc/train_128.csv``).

    python tools/preprocess.py --input ../fmow-rgb/train.csv --output ../fmow-rgb-preproc --size 128 --workers 16
    python tools/preprocess.py --input ../fmow-rgb/val.csv --output ../fmow-rgb-preproc --size 128 --pack

Reads a fMoW-style CSV or an ImageFolder tree; writes every image with its shorter side resized to
``--size`` (bicubic, JPEG quality 95) under ``OUTPUT/{split}_{size}/`` and ``OUTPUT/{split}_{size}.csv``
(label, relative image path, and the class name where the input names its classes: an ImageFolder tree's
folders, a CSV's ``class_name`` column), ``split`` being the input's name (``train.csv`` -> ``train``). It runs in
parallel, each image is written atomically, and a rerun skips the images already done, so an interrupted run
resumes where it stopped. ``--pack`` also writes ``{split}_{size}.u8`` (the centre ``size`` x ``size`` square
of every image, uint8 [N, size, size, 3], memory-mapped at training time) and ``{split}_{size}.json``
(labels, class names and shape): pass the ``.json`` as ``--train_path`` and crops, flips and normalisation run on the batch,
on the device.

``--raster`` keeps every band and the sample type (multispectral, 16-bit, float; ``--bands`` selects, 0-based): images
are read by ``util.images.read_raster``, resized with antialiased bilinear interpolation (no-data pixels, from
``--nodata`` or the file's GDAL_NODATA tag, are left out of the interpolation: a pixel is no-data in the output where
less than half of its footprint had data) and written as lossless TIFFs (zlib, horizontal predictor) with the no-data
tag; ``--pack`` then writes ``{split}_{size}.u8`` or ``.u16`` (uint8 / uint16 [N, size, size, C]).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from util import config, datasets  # noqa: E402
from util.config import HelpFormatter  # noqa: E402
from util.defaults import MAX_IMAGE_PIXELS  # noqa: E402
from util.errors import first_line  # noqa: E402
from util.checkpoint import write_atomically  # noqa: E402
from util.datasets import PACKED_DTYPES, DataError  # noqa: E402
from util.images import BadImageError, NotEightBitError, Raster, load_image, read_raster, set_max_image_pixels  # noqa: E402
from util.logger import progress  # noqa: E402


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the shorter side ``size`` pixels, the aspect ratio kept (rounded)."""
    scale = size / min(height, width)
    return max(size, round(height * scale)), max(size, round(width * scale))


class RasterTask(NamedTuple):
    """``--raster`` options a worker needs: band indices (None: all) and the no-data value (None: the file's tag)."""

    bands: list[int] | None
    nodata: float | None


def resize_one(task: tuple[str, str, int, RasterTask | None]) -> str | None:
    """Resize ``source`` to ``target`` (shorter side ``size``); None on success, else the error."""
    source, target, size, raster = task
    if os.path.exists(target):
        return None
    tmp = f"{target}.tmp{os.getpid()}"
    try:
        if raster is not None:
            write_raster(tmp, *resize_raster(read_raster(source, raster.bands, raster.nodata), size))
        else:
            img = load_image(source, draft_size=size)
            height, width = resized_shape(img.height, img.width, size)
            img = img.resize((width, height), Image.BICUBIC, reducing_gap=3.0)
            img.save(tmp, format="JPEG", quality=95)
        os.replace(tmp, target)
    except NotEightBitError as e:
        return f"{source}: {e.reason.split(';')[0]}; --raster keeps every band and the bit depth"
    except (BadImageError, DataError) as e:
        return f"{source}: {getattr(e, 'reason', None) or first_line(e)}"
    except (OSError, ValueError) as e:
        return f"{source}: {first_line(e)}"
    return None


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
    if raster.mask is None:
        out = resize(data)[0].numpy()
    else:
        valid = torch.from_numpy(~raster.mask)[None, None].float()
        weight = resize(valid)[0, 0].numpy()
        out = resize(data * valid)[0].numpy() / np.maximum(weight, 1e-6)
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
    tifffile.imwrite(path, array, photometric="minisblack", compression="zlib", predictor=array.dtype.kind in "ui",
                     extratags=tags)


def pack(rows: list[tuple[int, str]], root: Path, size: int, stem: Path, classes: list[str] | None = None,
         names: dict[int, str] | None = None, raster: bool = False) -> None:
    """Centre ``size`` squares of the resized images as one uint8 (RGB) or, with ``raster``, uint8 / uint16 array of
    every band + a JSON of labels, shape, sample type and no-data value (``util.datasets.PackedDataset``).

    Raises:
        SystemExit: images of another sample type (int16, float: not packable) or band count than the first one.
    """
    first = read_raster(root / rows[0][1]) if raster else None
    dtype, bands, nodata = (first.dtype, first.data.shape[0], first.nodata) if raster else ("uint8", 3, None)
    if dtype not in PACKED_DTYPES:
        raise SystemExit(f"error: {root / rows[0][1]}: {dtype} samples; packed arrays hold {' or '.join(PACKED_DTYPES)} "
                         "(train from the TIFFs instead)")
    array_path, meta_path = stem.with_suffix(PACKED_DTYPES[dtype]), stem.with_suffix(".json")
    tmp = array_path.with_suffix(array_path.suffix + ".tmp")
    array = np.memmap(tmp, dtype=dtype, mode="w+", shape=(len(rows), size, size, bands))
    for i, (_, path) in enumerate(progress(rows, "packing", unit="image")):
        if raster:
            image = read_raster(root / path)
            if image.dtype != dtype or image.data.shape[0] != bands or image.nodata != nodata:
                raise SystemExit(f"error: {root / path}: {image.data.shape[0]} band(s) of {image.dtype}, but {rows[0][1]} has "
                                 f"{bands} of {dtype} (and the same no-data value): one array needs one format")
            top, left = (image.data.shape[1] - size) // 2, (image.data.shape[2] - size) // 2
            array[i] = np.moveaxis(image.data[:, top:top + size, left:left + size], 0, -1).astype(dtype)
        else:
            with Image.open(root / path) as img:
                left, top = (img.width - size) // 2, (img.height - size) // 2
                array[i] = np.asarray(img.convert("RGB").crop((left, top, left + size, top + size)))
    array.flush()
    del array
    os.replace(tmp, array_path)
    meta = {"format": f"{dtype} [count, size, size, bands], row-major", "count": len(rows), "size": size,
            "dtype": dtype, "bands": bands, "nodata": nodata, "array": array_path.name, "labels": [label for label, _ in rows]}
    if classes:
        meta["classes"] = classes  # index = label
    elif names:
        meta["class_names"] = {str(label): name for label, name in sorted(names.items())}
    write_atomically(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta)))



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--input", required=True, type=Path, help="fMoW-style CSV or ImageFolder tree")
    parser.add_argument("--output", required=True, type=Path, help="output folder")
    parser.add_argument("--size", type=int, default=128, help="shorter side after resizing, in pixels")
    parser.add_argument("--split", default=None, help="name of the output split (default: the input's name)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel processes (default: the CPU count)")
    parser.add_argument("--pack", action="store_true", help="also write the pre-decoded uint8 (--raster: uint8 / uint16) array")
    parser.add_argument("--raster", action="store_true",
                        help="keep every band and the sample type (multispectral, 16-bit): lossless TIFF output")
    parser.add_argument("--bands", type=int, nargs="+", default=None, metavar="I", help="--raster: 0-based bands to keep (default: all)")
    parser.add_argument("--nodata", type=float, default=None, help="--raster: no-data value (default: the file's GDAL_NODATA tag)")
    parser.add_argument("--max_image_pixels", type=float, default=float(MAX_IMAGE_PIXELS),
                        help="refuse images declaring more pixels (decompression bombs)")
    args = parser.parse_args(argv)

    try:
        config.check_ranges(args)
        if (args.bands or args.nodata is not None) and not args.raster:
            raise config.UsageError("--bands and --nodata need --raster")
        if args.bands and min(args.bands) < 0:
            raise config.UsageError(f"--bands are 0-based indices, got {' '.join(map(str, args.bands))}")
        set_max_image_pixels(args.max_image_pixels)
        dataset = datasets.build_dataset(args.input, raster=args.raster)
    except (datasets.DataError, config.UsageError) as e:
        raise SystemExit(f"error: {e}") from None
    names = dict(getattr(dataset, "label_names", {}))  # label -> class name; a CSV without names gives str(label)
    if all(name == str(label) for label, name in names.items()):
        names = {}
    classes = list(dataset.classes) or None  # an ImageFolder tree's folders, index = label
    split = args.split or args.input.stem
    folder = f"{split}_{args.size}"
    try:
        (args.output / folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --output {args.output}: cannot create {args.output / folder} ({e.strerror or first_line(e)})") from None
    rows, tasks = [], []
    for index, (source, label) in enumerate(dataset.samples):
        relative = f"{folder}/{index:07d}_{Path(source).stem}.{'tif' if args.raster else 'jpg'}"
        rows.append((label, relative))
        tasks.append((source, str(args.output / relative), args.size, RasterTask(args.bands, args.nodata) if args.raster else None))
    todo = sum(not os.path.exists(t[1]) for t in tasks)
    print(f"{len(tasks)} images, {len(tasks) - todo} already done, resizing {todo} with {args.workers} workers", flush=True)
    with Pool(args.workers, initializer=set_max_image_pixels, initargs=(args.max_image_pixels,)) as pool:
        errors = [e for e in progress(pool.imap(resize_one, tasks, chunksize=64), "resizing", len(tasks), "image") if e]
    if errors:
        raise SystemExit(f"error: {len(errors)} image(s) could not be resized, first {errors[0]}; rerun to retry")
    stem = args.output / folder
    tmp = stem.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        if names:  # ImageFolder folders (or a CSV's class_name column): kept, read back by util.datasets
            writer.writerow(["label", "image_path", "class_name"])
            writer.writerows((label, path, names[label]) for label, path in rows)
        else:
            writer.writerow(["label", "image_path"])
            writer.writerows(rows)
    os.replace(tmp, stem.with_suffix(".csv"))
    print(f"wrote {stem.with_suffix('.csv')}", flush=True)
    if args.pack:
        pack(rows, args.output, args.size, stem, classes, names, args.raster)
        print(f"wrote the packed array and {stem.with_suffix('.json')}", flush=True)


if __name__ == "__main__":
    main()
