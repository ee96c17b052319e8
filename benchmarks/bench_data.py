"""Images per second of the training data pipeline in one worker (decode + crop + flip + normalise).

    python benchmarks/bench_data.py --input_size 128

Pipelines on the same images: small pre-resized JPEGs (what tools/preprocess.py writes), large original
JPEGs (decoded with PIL draft), the packed uint8 array and the WebDataset shards (``util.data.shards``): what a
worker does (memory-mapped read; one ``pread`` + ``.npy`` parse per sample), and that plus crop/flip/normalise
of the batch by ``BatchAugment`` on this CPU (on a GPU that part is the device's, not the worker's). The shards
are also streamed whole by ``webdataset.WebDataset`` (if installed) from local disk and from a throwaway
``python -m http.server`` on 127.0.0.1, to show what reading them as a stream costs, and, if LitData is installed,
the same samples in LitData's format (``litdata.optimize``), read by random access and as a stream.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from util.data import datasets, transforms  # noqa: E402
from util.data.shards import MANIFEST_SUFFIX  # noqa: E402


def per_worker_rate(dataset, count: int, batch_transform=None, batch_size: int = 64) -> float:
    """Images/s of ``dataset[i]`` for ``count`` items in this one process (plus the batch transform)."""
    start = time.perf_counter()
    for first in range(0, count, batch_size):
        items = [dataset[(i % len(dataset), i)][0] for i in range(first, min(first + batch_size, count))]
        if batch_transform is not None:
            batch_transform(torch.stack(items))
    return count / (time.perf_counter() - start)


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
    samples, as our shards): ``StreamingDataset[i]`` random access (what a map-style worker does) and iterating it
    as a stream. Empty without LitData: it is measured to compare formats, not a dependency."""
    try:
        import litdata
    except ImportError:
        print("litdata is not installed: its rates left out", flush=True)
        return {}
    from functools import partial

    total = datasets.build_dataset(meta_path).__len__()
    sample_bytes = datasets.build_dataset(meta_path)[0][0].numel()
    litdata.optimize(
        fn=partial(litdata_item, str(meta_path)),
        inputs=list(range(total)),
        output_dir=str(folder),
        chunk_bytes=16 * sample_bytes,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="images decoded per pipeline")
    parser.add_argument("--input_size", type=int, default=128)
    parser.add_argument("--large_size", type=int, default=1024, help="side of the 'original' JPEGs")
    parser.add_argument("--source", type=Path, default=REPO / "data" / "sentinel2_rgb" / "images")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one data-loader worker

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiles = sorted(args.source.glob("*.jpg"))[:64]
        (tmp / "large").mkdir()
        for tile in tiles:  # originals: the same scenes, up-sampled to fMoW-like sizes
            Image.open(tile).resize((args.large_size, args.large_size), Image.BICUBIC).save(
                tmp / "large" / tile.name, quality=95
            )
        subprocess.run(
            [
                sys.executable,
                str(REPO / "tools" / "preprocess.py"),
                "--input",
                str(tmp / "large"),
                "--output",
                str(tmp / "pre"),
                "--size",
                str(args.input_size),
                "--split",
                "small",
                "--workers",
                "1",
                "--pack",
                "--shards",
                "--shard_samples",
                "16",
            ],
            check=True,
            capture_output=True,
        )
        manifest = tmp / "pre" / f"small_{args.input_size}{MANIFEST_SUFFIX}"
        transform = transforms.build_transform(True, args.input_size)
        pipelines = {
            f"pre-resized JPEG ({args.input_size} px shorter side)": (
                datasets.build_dataset(
                    tmp / "pre" / f"small_{args.input_size}.csv",
                    "auto",
                    transform,
                    draft_size=transforms.draft_size_for(True, args.input_size),
                ),
                None,
            ),
            f"large JPEG ({args.large_size} px, PIL draft)": (
                datasets.build_dataset(
                    tmp / "large", "folder", transform, draft_size=transforms.draft_size_for(True, args.input_size)
                ),
                None,
            ),
            "packed uint8: worker only (memory-mapped read)": (
                datasets.build_dataset(tmp / "pre" / f"small_{args.input_size}.json"),
                None,
            ),
            "packed uint8 + BatchAugment on this CPU": (
                datasets.build_dataset(tmp / "pre" / f"small_{args.input_size}.json"),
                transforms.BatchAugment(args.input_size, transforms.FMOW_RGB_MEAN, transforms.FMOW_RGB_STD),
            ),
            "shards: worker only (pread + .npy parse)": (datasets.build_dataset(manifest), None),
            "shards + BatchAugment on this CPU": (
                datasets.build_dataset(manifest),
                transforms.BatchAugment(args.input_size, transforms.FMOW_RGB_MEAN, transforms.FMOW_RGB_STD),
            ),
        }
        rates = {}
        for name, (dataset, batch_transform) in pipelines.items():
            per_worker_rate(dataset, min(16, args.images), batch_transform)  # warm-up: page cache, allocator
            rates[name] = per_worker_rate(dataset, args.images, batch_transform)
            print(f"{name:48s} {rates[name]:9.1f} img/s per worker", flush=True)
        try:
            import webdataset  # noqa: F401
        except ImportError:
            print("webdataset is not installed: streaming rates left out", flush=True)
        else:
            names = [shard["name"] for shard in json.loads(manifest.read_text())["shards"]]
            server, base = http_server(tmp / "pre")
            try:
                for name, urls in (
                    ("shards streamed by webdataset, local disk", [str(tmp / "pre" / n) for n in names]),
                    ("shards streamed by webdataset, http://127.0.0.1", [f"{base}/{n}" for n in names]),
                ):
                    stream_rate(urls, min(16, args.images))
                    rates[name] = stream_rate(urls, args.images)
                    print(f"{name:48s} {rates[name]:9.1f} img/s per worker", flush=True)
            finally:
                server.kill()
                server.wait()
        for name, rate in litdata_rates(
            tmp / "pre" / f"small_{args.input_size}.json", tmp / "litdata", args.images
        ).items():
            rates[name] = rate
            print(f"{name:48s} {rate:9.1f} img/s per worker", flush=True)
        small, large, packed, packed_cpu, sharded = list(rates.values())[:5]
        print(
            f"packed worker / pre-resized JPEG: {packed / small:.1f}x (augmentation on a GPU); "
            f"with the augmentation on this CPU core: {packed_cpu / small:.1f}x; "
            f"pre-resized / large JPEG: {small / large:.1f}x; shards / packed worker: {sharded / packed:.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
