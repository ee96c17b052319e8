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

``--shards`` also writes WebDataset shards (``util.shards``: tar files of ``.npy`` arrays + labels, about 256 MB each,
in a seeded random order) to ``{split}_{size}_shards/`` and their manifest ``{split}_{size}.shards.json``: pass the
manifest as ``--train_path``. With ``--raster``, every file (GeoTIFF, ``.npy``, PNG of any band count) is read in
its own dtype (uint8 or uint16; others are refused) instead of being resized to JPEG: its shorter side is resized
to ``--size`` (bilinear, antialiased, rounded back to the dtype; left alone where it already is ``--size``) and
the centre square goes into the shards, bands first.

    python tools/preprocess.py --input ssl4eo/train.csv --output ssl4eo-shards --size 224 --raster --shards
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from util import config, datasets, shards  # noqa: E402
from util.config import HelpFormatter  # noqa: E402
from util.defaults import MAX_IMAGE_PIXELS  # noqa: E402
from util.errors import ReportableError, first_line  # noqa: E402
from util.images import BadImageError, load_image, read_raster, set_max_image_pixels  # noqa: E402
from util.logger import progress  # noqa: E402


def resize_one(task: tuple[str, str, int]) -> str | None:
    """Resize ``source`` to ``target`` (shorter side ``size``); None on success, else the error."""
    source, target, size = task
    if os.path.exists(target):
        return None
    try:
        img = load_image(source, draft_size=size)
        scale = size / min(img.size)
        img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC,
                         reducing_gap=3.0)
        tmp = f"{target}.tmp{os.getpid()}"
        img.save(tmp, format="JPEG", quality=95)
        os.replace(tmp, target)
    except BadImageError as e:
        return f"{source}: {e.reason}"
    except (OSError, ValueError) as e:
        return f"{source}: {first_line(e)}"
    return None


def pack(rows: list[tuple[int, str]], root: Path, size: int, stem: Path, classes: list[str] | None = None,
         names: dict[int, str] | None = None) -> None:
    """Centre ``size`` squares of the resized images as one uint8 array + a JSON of labels and shape."""
    array_path, meta_path = stem.with_suffix(".u8"), stem.with_suffix(".json")
    tmp = array_path.with_suffix(".u8.tmp")
    array = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(len(rows), size, size, 3))
    for i, (_, path) in enumerate(progress(rows, "packing", unit="image")):
        with Image.open(root / path) as img:
            left, top = (img.width - size) // 2, (img.height - size) // 2
            array[i] = np.asarray(img.convert("RGB").crop((left, top, left + size, top + size)))
    array.flush()
    del array
    os.replace(tmp, array_path)
    meta = {"format": "uint8 [count, size, size, 3], row-major", "count": len(rows), "size": size,
            "array": array_path.name, "labels": [label for label, _ in rows]}
    if classes:
        meta["classes"] = classes  # index = label
    elif names:
        meta["class_names"] = {str(label): name for label, name in sorted(names.items())}
    meta_path.write_text(json.dumps(meta))


SHARD_ORDER_SEED = 0  # samples go into the shards in a random order: a shard is a random subset, not a class or a region


def rgb_square(task: tuple[str, int]) -> tuple[np.ndarray | None, str | None]:
    """The centre ``size`` square of a resized 8-bit RGB image as uint8 [3, size, size] (what ``pack`` stores), or the error."""
    path, size = task
    try:
        with Image.open(path) as img:
            left, top = (img.width - size) // 2, (img.height - size) // 2
            return np.asarray(img.convert("RGB").crop((left, top, left + size, top + size))).transpose(2, 0, 1), None
    except (OSError, ValueError) as e:
        return None, f"{path}: {first_line(e)}"


def raster_square(task: tuple[str, int]) -> tuple[np.ndarray | None, str | None]:
    """A raster's centre ``size`` square in its own dtype, [bands, size, size], or the error (one line).

    The shorter side is resized to ``size`` (bilinear, antialiased, rounded and clipped back to the dtype) unless
    it already is ``size``, so tiles of the training size are stored bit for bit. Only uint8 and uint16 are kept:
    shards (``util.shards.DTYPES``) store integers, and a float or signed raster has no lossless place there.
    """
    path, size = task
    try:
        raster = read_raster(path)
    except BadImageError as e:
        return None, f"{path}: {e.reason}"
    except ReportableError as e:
        return None, first_line(e)
    if raster.dtype not in shards.DTYPES:
        return None, f"{path}: {raster.dtype} data; shards hold uint8 or uint16 (convert the file, or scale it to uint16)"
    data, (height, width) = raster.data, raster.data.shape[1:]
    if min(height, width) != size:
        scale = size / min(height, width)
        shape = (max(size, round(height * scale)), max(size, round(width * scale)))
        data = F.interpolate(torch.from_numpy(data)[None], shape, mode="bilinear", antialias=True, align_corners=False)[0].numpy()
        data = np.clip(np.round(data), 0, np.iinfo(raster.dtype).max)
        height, width = shape
    top, left = (height - size) // 2, (width - size) // 2
    return data[:, top:top + size, left:left + size].astype(raster.dtype), None


def write_shard_files(rows: list[tuple[int, str]], load, size: int, manifest_path: Path, workers: int, per_shard: int | None,
                      classes: list[str] | None, names: dict[int, str] | None) -> dict:
    """Decode every row with ``load`` ((path, size) -> (array, error)) in ``workers`` processes and write the shards.

    Raises:
        DataError: a file that cannot be decoded (the first one), or samples of different bands, sizes or dtypes.
    """
    order = np.random.default_rng(SHARD_ORDER_SEED).permutation(len(rows)).tolist()

    def samples(pool):
        for index, (array, error) in zip(order, pool.imap(load, [(rows[i][1], size) for i in order], chunksize=8)):
            if error:
                raise datasets.DataError(f"{error}; no shards manifest written")
            yield f"{index:07d}", array, rows[index][0]

    with Pool(workers) as pool:
        stream = progress(samples(pool), "sharding", len(rows), "image")
        first = next(iter(stream), None)
        if first is None:
            raise datasets.DataError("no images to write")
        per_shard = per_shard or shards.samples_per_shard(first[1].nbytes)
        return shards.write_shards(_chain(first, stream), len(rows), manifest_path, per_shard, classes, names)


def _chain(first, rest):
    yield first
    yield from rest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--input", required=True, type=Path, help="fMoW-style CSV or ImageFolder tree")
    parser.add_argument("--output", required=True, type=Path, help="output folder")
    parser.add_argument("--size", type=int, default=128, help="shorter side after resizing, in pixels")
    parser.add_argument("--split", default=None, help="name of the output split (default: the input's name)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel processes (default: the CPU count)")
    parser.add_argument("--pack", action="store_true", help="also write the pre-decoded uint8 array")
    parser.add_argument("--shards", action="store_true",
                        help="also write WebDataset shards + NAME.shards.json (data beyond one disk; see util/shards.py)")
    parser.add_argument("--shard_samples", type=int, default=None,
                        help="samples per shard (default: about 256 MB of pixels per shard)")
    parser.add_argument("--raster", action="store_true",
                        help="with --shards: read every file in its own dtype (uint8 / uint16, any band count) instead of 8-bit RGB JPEGs")
    parser.add_argument("--max_image_pixels", type=float, default=float(MAX_IMAGE_PIXELS),
                        help="refuse images declaring more pixels (decompression bombs)")
    args = parser.parse_args(argv)

    try:
        config.check_ranges(args)
        if args.raster and not args.shards:
            raise config.UsageError("--raster writes shards only: add --shards")
        if args.shard_samples is not None and args.shard_samples < 1:
            raise config.UsageError(f"--shard_samples must be at least 1, got {args.shard_samples}")
        set_max_image_pixels(args.max_image_pixels)
        # --raster: list .npy files too (the RasterOptions only widen the extensions; raster_square reads the files)
        dataset = datasets.build_dataset(args.input, raster=datasets.RasterOptions(0, None, None, ()) if args.raster else None)
    except (datasets.DataError, config.UsageError) as e:
        raise SystemExit(f"error: {e}") from None
    names = dict(getattr(dataset, "label_names", {}))  # label -> class name; a CSV without names gives str(label)
    if all(name == str(label) for label, name in names.items()):
        names = {}
    classes = list(dataset.classes) or None  # an ImageFolder tree's folders, index = label
    split = args.split or args.input.stem
    folder = f"{split}_{args.size}"
    if args.raster:
        write_shards_and_report([(label, path) for path, label in dataset.samples], raster_square, args, args.output / f"{folder}{shards.MANIFEST_SUFFIX}", classes, names)
        return
    try:
        (args.output / folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --output {args.output}: cannot create {args.output / folder} ({e.strerror or first_line(e)})") from None
    rows, tasks = [], []
    for index, (source, label) in enumerate(dataset.samples):
        relative = f"{folder}/{index:07d}_{Path(source).stem}.jpg"
        rows.append((label, relative))
        tasks.append((source, str(args.output / relative), args.size))
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
        pack(rows, args.output, args.size, stem, classes, names)
        print(f"wrote {stem.with_suffix('.u8')} and {stem.with_suffix('.json')}", flush=True)
    if args.shards:
        write_shards_and_report([(label, str(args.output / path)) for label, path in rows], rgb_square, args,
                                args.output / f"{folder}{shards.MANIFEST_SUFFIX}", classes, names)


def write_shards_and_report(rows, load, args, manifest_path: Path, classes, names) -> None:
    """``write_shard_files`` with the flags' values; a failure exits with one ``error:`` line."""
    try:
        args.output.mkdir(parents=True, exist_ok=True)
        manifest = write_shard_files(rows, load, args.size, manifest_path, args.workers, args.shard_samples, classes, names)
    except (ReportableError, OSError) as e:
        raise SystemExit(f"error: {first_line(e) if isinstance(e, ReportableError) else f'{manifest_path}: {e}'}") from None
    print(f"wrote {len(manifest['shards'])} shard(s) of {manifest['bands']} band(s) of {manifest['dtype']} and {manifest_path}", flush=True)


if __name__ == "__main__":
    main()
