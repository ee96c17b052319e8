"""Write a synthetic packed array (random pixels) with the project's own writer, for timing the training loop.

    python benchmarks/synthetic_packed.py /tmp/synthetic/train --count 16384 --size 128

Writes ``STEM.json`` and its array exactly as ``tools/preprocess.py --pack`` does (``preprocess.pack``: the same
layout, sample type, JSON keys), so that a change of the packed format reaches this benchmark too; only the
images come from a random generator instead of decoded files. ``--distinct`` different images (random uint8 or
uint16 pixels) repeat to fill ``--count`` rows: what a training loop's speed depends on is the bytes it reads, not
their values. Labels cycle over 10 classes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # preprocess
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# before any third-party import: one error line where this Python lacks the requirements (util/__init__.py)
import util  # noqa: F401

# isort: split

import numpy as np
import preprocess

from util.config import check_ranges, summary
from util.errors import UsageError
from util.run.process import run_entry_point


def synthetic_squares(count: int, size: int, bands: int, dtype: str, distinct: int, nodata: int | None):
    """``preprocess.squares``'s items, (index, array [C, S, S], label, no-data value), from a seeded generator."""
    rng = np.random.default_rng(0)
    high = np.iinfo(dtype).max
    images = rng.integers(0, high, size=(distinct, bands, size, size), dtype=dtype, endpoint=True)
    if nodata is not None:
        images[:, :, :2, :2] = nodata  # a no-data corner in every image
    for index in range(count):
        yield index, images[index % distinct], index % 10, nodata


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("stem", type=Path, help="STEM.json and STEM.u8 / .u16 are written")
    parser.add_argument("--count", type=int, default=16384)
    parser.add_argument("--size", type=int, default=128, help="side of the stored images (pixels)")
    parser.add_argument("--bands", type=int, default=3)
    parser.add_argument("--dtype", default="uint8", choices=("uint8", "uint16"))
    parser.add_argument("--nodata", type=int, default=None, help="a no-data value written into every image")
    parser.add_argument("--distinct", type=int, default=256, help="different images, repeated")
    args = parser.parse_args()
    check_ranges(args)  # --size 0 wrote an array of 0-px images (exit 0); --distinct 0 a ZeroDivisionError
    if args.bands < 1:
        raise UsageError(f"--bands must be at least 1, got {args.bands}")
    if args.nodata is not None and not 0 <= args.nodata <= np.iinfo(args.dtype).max:
        raise UsageError(f"--nodata {args.nodata} is outside the range of {args.dtype}")
    args.stem.parent.mkdir(parents=True, exist_ok=True)
    rows = [(index % 10, f"synthetic/{index}") for index in range(args.count)]
    items = synthetic_squares(
        args.count, args.size, args.bands, args.dtype, min(args.distinct, args.count), args.nodata
    )
    # pack() reads its images through the module's ``squares`` (decoding the rows' files): hand it ours instead
    preprocess.squares = lambda rows, root, size, raster, imap=map: items
    preprocess.pack(rows, args.stem.parent, args.size, args.stem, raster=args.dtype != "uint8" or args.bands != 3)
    print(
        f"wrote {args.stem.with_suffix('.json')}: {args.count} images, {args.bands} bands of {args.size} px, "
        f"{args.dtype}"
    )


if __name__ == "__main__":
    run_entry_point(lambda _: main(), None)
