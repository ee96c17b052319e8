"""Streaming shards: WebDataset tar files of pre-decoded uint8 / uint16 arrays, for data beyond one disk.

Written by ``tools/preprocess.py --shards`` (``write_shards``), read by ``ShardDataset`` in the order a
``ShardSampler`` decides. The format is WebDataset's (https://github.com/webdataset/webdataset): plain POSIX tar
files, each sample two members, ``KEY.npy`` (a numpy ``.npy`` array, dtype [bands, size, size], bands first) and
``KEY.cls`` (the label, decimal text), so ``tar``, Python's ``tarfile`` and ``webdataset.WebDataset`` (locally or
over HTTP) all read them. A JSON manifest beside the shards names them with their sample counts and byte sizes,
and holds the labels, class names, band count and dtype.

Reading is a map-style view over the shards: a worker reads a sample by one byte-range read (``os.pread``) at
the offset the tar header gives, so the training order is decided in the main process by the sampler, and a
resumed run (same seed, same number of processes) sees exactly the batches an uninterrupted one would,
whatever ``--num_workers``.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from util.data import raster_options
from util.data.loaders import PredecodedDataset, SeededSampler, derived_seed
from util.errors import DataError, first_line
from util.files import write_atomically
from util.run.rng import seeded

MANIFEST_SUFFIX = ".shards.json"
FORMAT = "webdataset shards of pre-decoded arrays, v1"
SAMPLE_LAYOUT = "KEY.npy: numpy array [bands, size, size] of dtype; KEY.cls: label as decimal text"
DTYPES = ("uint8", "uint16")
SHARD_BYTES = 256 * 2**20  # WebDataset's advice: shards of 100 MB to a few GB, so that reads are long and sequential
OPEN_SHARDS = 16  # file handles kept open per process: shards are met in runs, a few at a time


def samples_per_shard(sample_bytes: int, target_bytes: int = SHARD_BYTES) -> int:
    """How many samples of ``sample_bytes`` fill a shard of about ``target_bytes`` (at least 1)."""
    return max(1, target_bytes // sample_bytes)


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = (
        len(data),
        0,
        0o644,
    )  # mtime 0: the same input gives the same bytes (and manifest hash)
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    arrays: Iterable[tuple[str, np.ndarray, int]],
    count: int,
    manifest_path: Path,
    per_shard: int,
    classes: Sequence[str] | None = None,
    class_names: dict[int, str] | None = None,
    nodata: float | None = None,
) -> dict:
    """Write ``count`` samples as WebDataset tar shards of ``per_shard`` samples, then the manifest.

    Args:
        arrays: (key, array, label) per sample, in the order they go into the shards; ``array`` is uint8 or
            uint16 [bands, size, size], every sample the same shape and dtype; ``key`` names the sample (no dots).
        manifest_path: ``NAME.shards.json``; the shards go to the folder ``NAME_shards/`` beside it.
        classes: Class names, index = label (ImageFolder trees); or ``class_names``: label -> name (CSVs).
        nodata: The samples' no-data value (recorded in the manifest for ``BatchAugment``), or None.

    Each shard and the manifest are written atomically, the manifest last: a manifest always describes
    complete shards. On any failure the shards this call wrote are removed (and the folder, if it made it). Returns
    the manifest.

    Raises:
        DataError: a sample of another shape or dtype than the first, or a dtype other than uint8 / uint16.
        CheckpointError: a shard or the manifest could not be written (a full disk: ``No space left on device``).
    """
    folder_name = manifest_path.name.removesuffix(MANIFEST_SUFFIX) + "_shards"
    folder = manifest_path.parent / folder_name
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    try:
        return _write(arrays, count, manifest_path, per_shard, classes, class_names, nodata, folder_name, shards)
    except BaseException:  # a full disk, a bad sample, Ctrl-C: no shard of this call stays behind without a manifest
        for shard in shards:
            (manifest_path.parent / shard["name"]).unlink(missing_ok=True)
        if created:
            try:
                folder.rmdir()
            except OSError:
                pass  # files of another writer
        raise


def _write(
    arrays: Iterable[tuple[str, np.ndarray, int]],
    count: int,
    manifest_path: Path,
    per_shard: int,
    classes: Sequence[str] | None,
    class_names: dict[int, str] | None,
    nodata: float | None,
    folder_name: str,
    shards: list[dict],
) -> dict:
    """``write_shards``'s work; each shard written is appended to ``shards`` as it is done."""
    labels, shape, dtype = [], None, None
    samples = iter(arrays)
    for first in range(0, count, per_shard):
        name = f"{folder_name}/{len(shards):06d}.tar"
        batch = [next(samples) for _ in range(min(per_shard, count - first))]  # checked before the shard is written
        for key, array, _ in batch:
            if shape is None:
                shape, dtype = array.shape, str(array.dtype)
                if dtype not in DTYPES or array.ndim != 3 or array.shape[1] != array.shape[2]:
                    raise DataError(
                        f"{key}: {dtype} {list(array.shape)}: shards hold uint8 or uint16 [bands, size, size] arrays"
                    )
            if array.shape != shape or str(array.dtype) != dtype:
                raise DataError(
                    f"{key}: {array.dtype} {list(array.shape)}, but the first sample is {dtype} {list(shape)}: "
                    "every sample of a dataset needs the same bands and size"
                )

        def write(tmp: str, batch: list = batch) -> None:
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for key, array, label in batch:
                    buffer = io.BytesIO()
                    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
                    _tar_member(tar, f"{key}.npy", buffer.getvalue())
                    _tar_member(tar, f"{key}.cls", str(label).encode())

        path = manifest_path.parent / name
        write_atomically(path, write)
        shards.append({"name": name, "count": len(batch), "bytes": path.stat().st_size})
        labels.extend(int(label) for _, _, label in batch)
    manifest = {
        "format": FORMAT,
        "sample": SAMPLE_LAYOUT,
        "count": count,
        "size": shape[1],
        "bands": shape[0],
        "dtype": dtype,
        "nodata": nodata,
        "shards": shards,
        "labels": labels,
    }
    if classes:
        manifest["classes"] = list(classes)
    elif class_names:
        manifest["class_names"] = {str(label): name for label, name in sorted(class_names.items())}
    write_atomically(manifest_path, lambda tmp: Path(tmp).write_text(json.dumps(manifest)))
    return manifest


class ShardDataset(PredecodedDataset):
    """The samples of a shard manifest (``NAME.shards.json``), global index = position across the shards in
    manifest order.

    Items are (pixels, label): pixels uint8 or uint16 [bands, size, size] tensors, as ``PackedDataset`` gives,
    for ``BatchAugment`` to crop, flip and normalise on the device (``predecoded``); with a ``transform`` set,
    each image goes through it instead (``raster_options.predecoded_image``: a PIL image on the 8-bit RGB path, float32
    with no-data filled with ``raster`` options). ``raster``: the run's band flags, checked against the shards
    (``raster_options.check_predecoded``). Keys are ``index`` or (index, seed), as ``SeededSampler`` yields them.

    Every shard is checked to exist with the byte size the manifest records when the dataset is built; a
    worker reads each shard's tar headers once (its sample offsets), then one ``pread`` per sample. A DataLoader's
    batch (``PredecodedDataset.__getitems__``) reads each sample's pixels straight into its row of the batch tensor
    (one ``preadv`` per sample: the ``.npy`` header into a scratch buffer, the pixels into the batch), not one
    contiguous read per batch: a batch's samples are spread over a shuffle buffer of two shards or more
    (``ShardSampler``), so the span holding them is many times the batch.

    Raises:
        DataError: a manifest that cannot be read or lacks a key; a missing or truncated shard (naming it);
            a sample that does not decode to the manifest's dtype and shape.
    """

    def __init__(
        self,
        manifest_path: str | os.PathLike,
        transform: Callable | None = None,
        raster: raster_options.RasterOptions | None = None,
    ) -> None:
        manifest_path = Path(manifest_path)
        try:
            raw = manifest_path.read_bytes()
            manifest = json.loads(raw)
            self.size, self.bands, self.dtype = manifest["size"], manifest["bands"], manifest["dtype"]
            self.nodata = manifest.get("nodata")
            self.targets = [int(label) for label in manifest["labels"]]
            shards = [(str(s["name"]), int(s["count"]), int(s["bytes"])) for s in manifest["shards"]]
        except OSError as e:
            raise DataError(
                f"{manifest_path}: cannot read the shard manifest ({e.strerror or first_line(e)})"
            ) from None
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{manifest_path}: not a shard manifest ({type(e).__name__}: {first_line(e)})") from None
        if self.dtype not in DTYPES or any(type(v) is not int or v < 1 for v in (self.size, self.bands)) or not shards:
            raise DataError(
                f"{manifest_path}: not a shard manifest (dtype {self.dtype!r}, size {self.size!r}, "
                f"bands {self.bands!r}, {len(shards)} shard(s))"
            )
        counts = [count for _, count, _ in shards]
        if sum(counts) != len(self.targets) or min(counts) < 1:
            raise DataError(
                f"{manifest_path}: the shards hold {sum(counts)} samples but it lists {len(self.targets)} labels"
            )
        names = [name for name, _, _ in shards]
        outside = next(
            (name for name in names if Path(name).is_absolute() or ".." in Path(name).parts or not name), None
        )
        if outside is not None:
            raise DataError(
                f"{manifest_path}: shard name {outside!r} points outside its folder: names are paths "
                "relative to the manifest, without '..'"
            )
        twice = next(
            (name for i, name in enumerate(names) if os.path.normpath(name) in map(os.path.normpath, names[:i])), None
        )
        if twice is not None:
            raise DataError(
                f"{manifest_path}: shard {twice!r} is listed more than once (its samples would be seen twice)"
            )
        self.shard_paths = [manifest_path.parent / name for name in names]
        for path, (_, _, expected) in zip(self.shard_paths, shards):
            try:
                actual = path.stat().st_size
            except FileNotFoundError:
                raise DataError(f"{path}: shard missing (listed in {manifest_path})") from None
            except OSError as e:
                raise DataError(f"{path}: cannot read the shard ({e.strerror or first_line(e)})") from None
            if actual != expected:
                raise DataError(
                    f"{path}: shard {'truncated' if actual < expected else 'changed'}: {actual} bytes, "
                    f"{manifest_path.name} says {expected}; rewrite it with tools/preprocess.py --shards"
                )
        if self.nodata is not None and type(self.nodata) not in (int, float):
            raise DataError(f"{manifest_path}: key 'nodata' must be a number or null, got {self.nodata!r}")
        raster_options.check_predecoded(manifest_path, self.bands, self.dtype, self.nodata, raster)
        self.raster = raster
        self.shard_counts = counts
        self.shard_starts = np.cumsum([0, *counts[:-1]]).tolist()
        self.digest = hashlib.sha256(raw).hexdigest()
        self.transform = transform
        self.source = str(manifest_path)
        if "classes" in manifest:
            self.classes = list(manifest["classes"])
            self.label_names = dict(enumerate(self.classes))
        else:
            self.classes = []
            names = manifest.get("class_names", {})
            self.label_names = {label: names.get(str(label), str(label)) for label in sorted(set(self.targets))}
        self._offsets: dict[int, list[tuple[int, int]]] = {}  # per process: shard -> (data offset, size) per sample
        self._files: OrderedDict[int, int] = OrderedDict()  # per process: shard -> open file descriptor
        self._header: bytes | None = None  # the .npy header of every sample, built on first use

    def __getstate__(self) -> dict:  # DataLoader workers (spawn) open their own files
        return {**self.__dict__, "_offsets": {}, "_files": OrderedDict()}

    def __len__(self) -> int:
        return len(self.targets)

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, position in it) of the sample at global ``index``."""
        shard = bisect.bisect_right(self.shard_starts, index) - 1
        return shard, index - self.shard_starts[shard]

    def describe(self, index: int) -> str:
        shard, position = self.locate(index)
        return f"{self.shard_paths[shard]} sample {position}"

    def make_sampler(self, num_replicas: int, rank: int, seed: int) -> ShardSampler:
        """The training sampler ``util.data.loaders.train_loader`` uses for this dataset."""
        return ShardSampler(self, num_replicas=num_replicas, rank=rank, seed=seed)

    def _read_offsets(self, shard: int) -> list[tuple[int, int]]:
        path = self.shard_paths[shard]
        try:
            with tarfile.open(path, "r:") as tar:  # headers only: tarfile seeks over the data
                found = [(m.offset_data, m.size) for m in tar if m.name.endswith(".npy")]
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{path}: unreadable shard ({first_line(e)})") from None
        if len(found) != self.shard_counts[shard]:
            raise DataError(
                f"{path}: {len(found)} sample(s), the manifest says {self.shard_counts[shard]}: truncated or rewritten"
            )
        return found

    def _file(self, shard: int) -> int:
        fd = self._files.pop(shard, None)
        if fd is None:
            try:
                fd = os.open(self.shard_paths[shard], os.O_RDONLY)
            except OSError as e:
                raise DataError(
                    f"{self.shard_paths[shard]}: cannot open the shard ({e.strerror or first_line(e)})"
                ) from None
            if len(self._files) >= OPEN_SHARDS:
                os.close(self._files.popitem(last=False)[1])
        self._files[shard] = fd
        return fd

    def _member(self, index: int) -> tuple[int, int, int]:
        """(shard, data offset, byte size) of sample ``index``'s ``.npy`` member."""
        shard, position = self.locate(index)
        if shard not in self._offsets:
            self._offsets[shard] = self._read_offsets(shard)
        return shard, *self._offsets[shard][position]

    def read_into(self, indices: list[int], out: np.ndarray) -> None:
        header = self._npy_header()
        scratch = bytearray(len(header))
        for row, index in zip(out, indices):
            shard, offset, size = self._member(index)
            if size == len(header) + row.nbytes:  # np.save's layout: the header, then the pixels in C order
                if os.preadv(self._file(shard), [scratch, row], offset) == size and scratch == header:
                    continue
            row[...] = self.read(index)  # anything else: parsed, checked and named as one sample is

    def read(self, index: int) -> np.ndarray:
        """The array [bands, size, size] (uint8 / uint16) of sample ``index``.

        Raises:
            DataError: the shard is unreadable, shorter than its header says, or holds another dtype or shape.
        """
        shard, offset, size = self._member(index)
        position = index - self.shard_starts[shard]  # for the messages: the shard is known, no second search
        data = bytearray(size)  # writable: torch.from_numpy shares it without a copy
        read = os.preadv(self._file(shard), [data], offset)
        path = self.shard_paths[shard]
        if read != size:
            raise DataError(f"{path}: truncated shard: sample {position} needs {size} bytes at {offset}, found {read}")
        header = self._npy_header()
        if (
            data[: len(header)] == header
        ):  # the header np.save writes for the manifest's dtype and shape: skip parsing it
            array = np.frombuffer(data, self.dtype, offset=len(header)).reshape(self.bands, self.size, self.size)
        else:
            try:
                array = np.load(io.BytesIO(data), allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise DataError(f"{path}: sample {position} is not a .npy array ({first_line(e)})") from None
        if str(array.dtype) != self.dtype or array.shape != (self.bands, self.size, self.size):
            raise DataError(
                f"{path}: sample {position} is {array.dtype} {list(array.shape)}, the manifest says "
                f"{self.dtype} {[self.bands, self.size, self.size]}"
            )
        return array

    def _npy_header(self) -> bytes:
        if self._header is None:
            buffer = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                buffer,
                {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(self.dtype)),
                    "fortran_order": False,
                    "shape": (self.bands, self.size, self.size),
                },
            )
            self._header = buffer.getvalue()
        return self._header

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor | Image.Image, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        pixels = self.read(index)
        if self.transform is None:
            return torch.from_numpy(pixels), self.targets[index]
        image = raster_options.predecoded_image(pixels, self.raster, self.nodata, self.describe(index))
        with seeded(seed) if seed is not None else nullcontext():
            return self.transform(image), self.targets[index]


class ShardSampler(SeededSampler):
    """This rank's (index, seed) pairs of an epoch over a ``ShardDataset``, streaming-friendly and resumable.

    Per epoch: the shards are shuffled (seeded by seed and epoch, the same on every rank) and laid end to end;
    rank r takes the r-th of ``num_replicas`` equal contiguous slices of that stream (so each rank reads whole
    runs of shards, at most two of them shared with a neighbour), and shuffles it within consecutive blocks of
    ``buffer`` samples (seeded by seed, epoch and rank), WebDataset's shuffle buffer made deterministic. Every
    rank gets floor(N / num_replicas) samples; the remainder (fewer than ``num_replicas``, at the end of the
    epoch's stream, so other samples each epoch) is left out, as ``DistributedSampler(drop_last=True)``.
    ``set_start`` skips the samples of the batches already trained, for a resume mid-epoch.

    The order depends on the seed, the epoch, ``num_replicas`` and the manifest, never on the number of
    DataLoader workers (they only fetch the indices handed to them).

    Args:
        buffer: Samples shuffled together (default: two of the largest shards, so a block spans at most three).
    """

    def __init__(
        self, dataset: ShardDataset, num_replicas: int, rank: int, seed: int = 0, buffer: int | None = None
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.buffer = buffer or 2 * max(dataset.shard_counts)

    def order(self) -> list[int]:
        dataset = self.dataset
        shards = np.random.default_rng(derived_seed(self.seed, self.epoch, "shards")).permutation(
            len(dataset.shard_counts)
        )
        stream = np.concatenate(
            [np.arange(dataset.shard_starts[k], dataset.shard_starts[k] + dataset.shard_counts[k]) for k in shards]
        )
        mine = stream[self.rank * self.num_samples : (self.rank + 1) * self.num_samples]
        rng = np.random.default_rng(derived_seed(self.seed, self.epoch, "rank", self.rank))
        for first in range(0, len(mine), self.buffer):
            rng.shuffle(mine[first : first + self.buffer])  # a view: shuffles the block in place
        return mine.tolist()
