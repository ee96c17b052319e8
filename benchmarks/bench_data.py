"""Images per second that one DataLoader worker hands the training process, per data format: the path before issue 26
and today's, side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_data.py --input_size 128

Every pipeline is a real ``torch.utils.data.DataLoader`` with ``--workers`` worker processes (default 1) over the
same images in the same random order, timed in this process, the training process: what arrives here per second,
reading and decoding, the per-image transform where there is one, collate, and the hand-over through shared memory
included (the backlog of prefetched batches is drained before the clock starts). Crops, flips and normalisation of
packed arrays and shards run later, on the device (``BatchAugment``), and are not counted.

Formats (8-bit RGB from the repository's sample tiles; 13-band uint16 tiles generated, smooth with noise):

- pre-resized JPEG (what ``tools/preprocess.py`` writes) and large JPEG (PIL draft): decoded and transformed image by
  image; one path;
- packed arrays and shards, uint8 RGB and uint16 13-band. Before: items one by one (``dataset[key]``; packed arrays
  stored band-last, so each item is a strided view) stacked by ``default_collate``. Now: ``__getitems__`` reads the
  whole batch into one tensor in shared memory (packed: band-first, one fancy index; shards: one ``preadv`` per
  sample into its row), passed through by ``util.data.loaders.collate``;
- 13-band uint16 GeoTIFF (lossless zlib, as ``tools/preprocess.py --raster`` writes): read and transformed image by
  image (float32); one path.

Workers per GPU: how many such workers feed one H100 at 45 % of its bf16 peak, 0.45 x 989 TFLOP/s / 38.45 GFLOP per
image (the paper model at 128 px, forward + backward, ``torch.utils.flop_counter``) = ~11,600 img/s (issue 26).
Each pipeline is timed ``--rounds`` times, interleaved; the best round is shown (the one least disturbed by other
jobs on a shared machine).

``--streaming`` adds in-process rates (no DataLoader) of reading the shards as a stream with ``webdataset`` (local
disk and a throwaway ``python -m http.server`` on 127.0.0.1) and, if installed, LitData's format.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# before any third-party import: one error line where this Python lacks the requirements (util/__init__.py)
import util  # noqa: F401

# isort: split

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler, default_collate

from util.config import Bands, check_ranges, summary
from util.data import datasets, loaders, transforms
from util.data.shards import MANIFEST_SUFFIX
from util.errors import UsageError
from util.run.process import run_entry_point

REPO = Path(__file__).resolve().parents[1]

GPU_RATE = 0.45 * 989e12 / 38.45e9  # img/s one H100 trains at 45 % of its bf16 peak (issue 26)
BANDS = 13


class ItemByItem(Dataset):
    """The path before issue 26: ``dataset[key]`` one item at a time (no ``__getitems__``), for ``default_collate``
    to stack."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.dataset[key]


def delivered_rate(dataset: Dataset, collate, batch_size: int, workers: int, seconds: float, copy: bool) -> float:
    """Images/s the training process receives from a DataLoader with ``workers`` workers over ``dataset`` (random
    order, seed 0), timed for about ``seconds`` after the prefetched backlog is drained; ``copy``: each batch is also
    copied here into one reused tensor, as the pin-memory thread copies it into pinned memory on a GPU."""
    sampler = RandomSampler(dataset, replacement=True, num_samples=10**9, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate)
    batches = iter(loader)
    for _ in range(1 + 2 * max(workers, 1)):  # worker start-up and the prefetch backlog (prefetch_factor 2)
        next(batches)
    count, start, target = 0, time.perf_counter(), None
    while time.perf_counter() - start < seconds:
        images = next(batches)[0]
        if copy:
            target = torch.empty_like(images) if target is None or target.shape != images.shape else target
            target.copy_(images)
        count += len(images)
        del images  # the ring buffer is free again once nothing here holds it
    rate = count / (time.perf_counter() - start)
    del batches  # ends the workers
    return rate


def write_tiles(folder: Path, count: int, size: int) -> None:
    """``count`` 13-band uint16 TIFFs [13, size, size] in two classes: smooth fields plus noise, so that zlib
    compresses them about as it does real imagery (random values would not compress and would decode as a copy)."""
    import tifffile

    rng = np.random.default_rng(0)
    for i in range(count):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(500, 4000, (BANDS, size // 16 + 1, size // 16 + 1))
        field = np.kron(coarse, np.ones((16, 16)))[:, :size, :size]
        tile = (field + rng.normal(0, 30, field.shape)).clip(0, 65535).astype(np.uint16)
        tifffile.imwrite(folder / f"c{i % 2}" / f"t{i:05d}.tif", tile, photometric="minisblack")


def preprocess(source: Path, out: Path, split: str, size: int, *extra: str) -> None:
    """``tools/preprocess.py --pack --shards`` of ``source`` into ``out``.

    Raises:
        UsageError: it failed (its last line of output).
    """
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "preprocess.py"), "--input", str(source), "--output", str(out)]
        + ["--size", str(size), "--split", split, "--workers", "1", "--pack", "--shards", "--shard_samples", "16"]
        + list(extra),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:  # its own one-line error (e.g. a --source of unreadable JPEGs), not a traceback here
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise UsageError(f"tools/preprocess.py on {source} failed: {lines[-1]}")


def band_last_copy(meta_path: Path) -> Path:
    """The packed array of ``meta_path`` (band-first) written band-last, as ``--pack`` did before issue 26 (no
    ``layout`` key); returns its JSON."""
    meta = json.loads(meta_path.read_text())
    shape = (meta["count"], meta["bands"], meta["size"], meta["size"])
    array = np.fromfile(meta_path.parent / meta["array"], meta["dtype"]).reshape(shape)
    name = f"hwc_{meta['array']}"
    np.ascontiguousarray(array.transpose(0, 2, 3, 1)).tofile(meta_path.parent / name)
    meta.pop("layout")
    meta.update(array=name, format=f"{meta['dtype']} [count, size, size, bands], row-major")
    path = meta_path.with_name(f"hwc_{meta_path.name}")
    path.write_text(json.dumps(meta))
    return path


def stream_rate(urls: list[str], count: int) -> float:
    """Images/s of ``webdataset.WebDataset`` streaming ``urls`` (cycled) and decoding ``count`` ``.npy`` samples."""
    import webdataset as wds

    start, seen = time.perf_counter(), 0
    while seen < count:
        for sample in wds.WebDataset(urls, shardshuffle=False).decode():
            sample["npy"], seen = torch.from_numpy(sample["npy"]), seen + 1
            if seen == count:
                break
    return count / (time.perf_counter() - start)


def litdata_item(meta_path: str, index: int) -> dict:
    """One packed sample as LitData's ``optimize`` stores it: uint8 [3, S, S] array + label (top level: picklable)."""
    pixels, label = datasets.build_dataset(Path(meta_path))[index]
    return {"image": pixels.numpy(), "label": label}


def litdata_rates(meta_path: Path, folder: Path, count: int) -> dict[str, float]:
    """Images/s of LitData (if installed) on the packed samples, written by ``litdata.optimize`` (chunks of ~16
    samples, as our shards): ``StreamingDataset[i]`` random access and iterating it as a stream, in this process.
    Empty without LitData: it is measured to compare formats, not a dependency."""
    try:
        import litdata
    except ImportError:
        print("litdata is not installed: its rates left out", flush=True)
        return {}
    from functools import partial

    dataset = datasets.build_dataset(meta_path)
    litdata.optimize(
        fn=partial(litdata_item, str(meta_path)),
        inputs=list(range(len(dataset))),
        output_dir=str(folder),
        chunk_bytes=16 * dataset[0][0].numel(),
        num_workers=1,
        mode="overwrite",
    )
    stream = litdata.StreamingDataset(str(folder))
    rates = {}
    start = time.perf_counter()
    for i in range(count):
        torch.as_tensor(stream[i % len(stream)]["image"])
    rates["litdata StreamingDataset[i], local disk"] = count / (time.perf_counter() - start)
    start, seen = time.perf_counter(), 0
    while seen < count:
        for sample in litdata.StreamingDataset(str(folder)):
            torch.as_tensor(sample["image"])
            seen += 1
            if seen == count:
                break
    rates["litdata streamed (iteration), local disk"] = count / (time.perf_counter() - start)
    return rates


def http_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """``python -m http.server`` serving ``folder`` on a free 127.0.0.1 port, once it answers; (process, base URL)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("http.server did not start")


def streaming_rates(pre: Path, manifest: Path, packed: Path, count: int) -> None:
    """``--streaming``: in-process rates of the shards read as a stream (webdataset) and of LitData's format."""
    rates = {}
    try:
        import webdataset  # noqa: F401
    except ImportError:
        print("webdataset is not installed: streaming rates left out", flush=True)
    else:
        names = [shard["name"] for shard in json.loads(manifest.read_text())["shards"]]
        server, base = http_server(pre)
        try:
            for name, urls in (
                ("shards streamed by webdataset, local disk", [str(pre / n) for n in names]),
                ("shards streamed by webdataset, http://127.0.0.1", [f"{base}/{n}" for n in names]),
            ):
                stream_rate(urls, min(16, count))
                rates[name] = stream_rate(urls, count)
        finally:
            server.kill()
            server.wait()
    rates.update(litdata_rates(packed, pre / "litdata", count))
    for name, rate in rates.items():
        print(f"{name:50s} {rate:9.1f} img/s in one process (no DataLoader)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--input_size", type=int, default=128, help="stored side of the images, pixels")
    parser.add_argument("--tiles", type=int, default=128, help="13-band uint16 tiles generated")
    parser.add_argument("--large_size", type=int, default=1024, help="side of the 'original' JPEGs")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per pipeline (rates are per worker)")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed per pipeline and round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best is shown")
    parser.add_argument("--streaming", action="store_true", help="add webdataset / LitData stream rates")
    parser.add_argument("--source", type=Path, default=REPO / "data" / "sentinel2_rgb" / "images")
    args = parser.parse_args()
    check_ranges(args)  # --workers 0 or --seconds 0 was a ZeroDivisionError after every pipeline had run
    jpegs = sorted(args.source.glob("*.jpg"))[:64]
    if not jpegs:
        raise UsageError(f"--source {args.source}: no .jpg images in it")
    torch.set_num_threads(1)
    size = args.input_size

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "large").mkdir()
        for tile in jpegs:  # originals: the same scenes, up-sampled to fMoW sizes
            Image.open(tile).resize((args.large_size, args.large_size), Image.BICUBIC).save(
                tmp / "large" / tile.name, quality=95
            )
        write_tiles(tmp / "tiles", args.tiles, size)
        pre = tmp / "pre"
        preprocess(tmp / "large", pre, "rgb", size)
        preprocess(tmp / "tiles", pre, "ms", size, "--raster")
        rgb_transform = transforms.build_transform(True, size)
        draft = transforms.draft_size_for(True, size)
        bands = Bands(in_chans=BANDS, mean=(2000.0,) * BANDS, std=(1000.0,) * BANDS)
        packed_rgb, packed_ms = pre / f"rgb_{size}.json", pre / f"ms_{size}.json"
        shards_rgb, shards_ms = pre / f"rgb_{size}{MANIFEST_SUFFIX}", pre / f"ms_{size}{MANIFEST_SUFFIX}"
        item, batch = default_collate, loaders.collate
        # name -> (old dataset, old collate, new dataset, new collate); None: one path only
        pipelines = {
            f"JPEG, pre-resized ({size} px)": (
                datasets.build_dataset(pre / f"rgb_{size}.csv", "auto", rgb_transform, draft_size=draft),
                item,
                None,
                None,
            ),
            f"JPEG, large ({args.large_size} px, PIL draft)": (
                datasets.build_dataset(tmp / "large", "folder", rgb_transform, draft_size=draft),
                item,
                None,
                None,
            ),
            "packed uint8 RGB": (
                ItemByItem(datasets.build_dataset(band_last_copy(packed_rgb))),
                item,
                datasets.build_dataset(packed_rgb),
                batch,
            ),
            "shards uint8 RGB": (
                ItemByItem(datasets.build_dataset(shards_rgb)),
                item,
                datasets.build_dataset(shards_rgb),
                batch,
            ),
            f"GeoTIFF uint16 {BANDS}-band (zlib)": (
                datasets.build_dataset(
                    pre / f"ms_{size}.csv", "auto", transforms.image_transform(bands, size, True), bands=bands
                ),
                item,
                None,
                None,
            ),
            f"packed uint16 {BANDS}-band": (
                ItemByItem(datasets.build_dataset(band_last_copy(packed_ms), bands=bands)),
                item,
                datasets.build_dataset(packed_ms, bands=bands),
                batch,
            ),
            f"shards uint16 {BANDS}-band": (
                ItemByItem(datasets.build_dataset(shards_ms, bands=bands)),
                item,
                datasets.build_dataset(shards_ms, bands=bands),
                batch,
            ),
        }
        best: dict[tuple[str, str], float] = {}
        for _ in range(args.rounds):
            for name, (old, old_collate, new, new_collate) in pipelines.items():
                latest = (new, new_collate) if new is not None else (old, old_collate)
                for path, (dataset, collate), copy in (
                    ("before", (old, old_collate), False),
                    ("now", (new, new_collate), False),
                    ("copied", latest, True),
                ):
                    if dataset is not None:
                        rate = delivered_rate(dataset, collate, args.batch_size, args.workers, args.seconds, copy)
                        best[name, path] = max(rate, best.get((name, path), 0.0))
        workers = f"{args.workers} worker{'s' * (args.workers > 1)}"
        print(
            f"images/s delivered to the training process by a DataLoader of {workers}, batch {args.batch_size}, "
            f"{size} px (best of {args.rounds} rounds of {args.seconds:g} s); workers per GPU = "
            f"ceil({GPU_RATE:,.0f} / rate per worker); 'copied': now, with each batch copied once in the training "
            "process (what its pin-memory thread does on a GPU)",
            flush=True,
        )
        header = ("format", "before", "now", "now/before", "copied", "workers/GPU")
        print(f"{header[0]:42s} " + " ".join(f"{h:>10s}" for h in header[1:5]) + f" {header[5]:>11s}", flush=True)
        for name, (_, _, new, _) in pipelines.items():
            before = best[name, "before"]
            now = best[name, "now"] if new is not None else before
            ratio = f"{now / before:.2f}x" if new is not None else "one-path"
            copied, per_gpu = best[name, "copied"], math.ceil(GPU_RATE / (now / args.workers))
            print(f"{name:42s} {before:10.0f} {now:10.0f} {ratio:>10s} {copied:10.0f} {per_gpu:11d}", flush=True)
        if args.streaming:
            streaming_rates(pre, shards_rgb, packed_rgb, 512)


if __name__ == "__main__":
    run_entry_point(lambda _: main(), None)
