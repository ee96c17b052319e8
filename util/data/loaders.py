"""Data loaders: seeded, sharded and resumable for training; in order and without padding for evaluation; and the
interface every dataset offers them (``SampleDataset``)."""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate, get_worker_info

from util.config import Loading
from util.errors import UsageError
from util.run import threads
from util.run.process import Run, ignore_stop_signals


class SampleDataset(Dataset):
    """What the loaders and the entry points rely on, for every dataset of images (files, packed arrays, shards) and
    of cached features. Items are (sample, label) for an index, or for the (index, seed) keys of ``SeededSampler``.

    Attributes (class defaults; subclasses set them):
        targets: Label of every sample, -1 for unlabelled images.
        classes: Class names, index = label (ImageFolder trees); empty when the labels are CSV integers.
        label_names: Name of each label present (label -> name).
        source: The file or folder the samples were read from (messages).
        transform: Applied per sample; None for pre-decoded datasets augmented as whole batches.
        predecoded: Items are whole uint8 / uint16 images [C, S, S]: training crops, flips and normalises them as
            batches on the device (``util.data.transforms.BatchAugment``).
        nodata: The no-data value of pre-decoded pixels (None: none).
        digest: A fingerprint of the data's order-defining content (shards: the manifest's sha256), recorded in
            checkpoints so that a resume reads the same samples in the same order; None where the file list is the
            order.
    """

    targets: list[int] = []
    classes: list[str] = []
    label_names: dict[int, str] = {}
    source: str = ""
    transform = None
    predecoded: bool = False
    nodata: float | None = None
    digest: str | None = None

    def describe(self, index: int) -> str:
        """Names sample ``index`` in error messages (a file, a CSV row, an array element)."""
        return f"{self.source or 'dataset'}[{index}]"

    def make_sampler(self, num_replicas: int, rank: int, seed: int) -> SeededSampler:
        """The training sampler: a seeded shuffle of every sample, sharded over ranks (``SeededSampler``)."""
        return SeededSampler(self, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)


RING = 4  # buffers per worker: prefetch_factor (2) in flight, the batch in use, the one its loop variable still holds
FREE, IN_USE = 0, 1  # a ring buffer's state, in shared memory: the training process sets FREE


@dataclass
class Batch:
    """A batch that a dataset read whole (``PredecodedDataset.__getitems__``): images [B, C, S, S] and labels [B]
    (int64). ``collate`` hands it on as ``[images, labels]``, what ``default_collate`` makes of per-item batches;
    ``flags`` / ``slot``: the worker's ring buffer it lives in (``BatchBuffers``), or None / -1."""

    images: torch.Tensor
    labels: torch.Tensor
    flags: torch.Tensor | None = None
    slot: int = -1


class _Handover:
    """A worker's batch in a ring buffer, on its way to the training process: unpickled there (``_received``)."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def __reduce__(self):
        batch = self.batch
        return _received, (batch.images, batch.labels, batch.flags, batch.slot)


def _received(images: torch.Tensor, labels: torch.Tensor, flags: torch.Tensor, slot: int) -> list:
    """In the training process: the plain ``[images, labels]`` of ``default_collate``, and the worker's buffer marked
    FREE once no tensor here uses its memory any more (the storage's finalizer: torch keeps one Python object per
    storage, alive as long as any tensor or view uses it, pin-memory thread and training loop alike)."""
    weakref.finalize(images.untyped_storage(), flags.__setitem__, slot, FREE)
    return [images, labels]


def collate(items: Batch | list) -> list | _Handover:
    """The loaders' ``collate_fn``: a ``Batch`` passes through untouched (no per-item stacking; from a worker's ring
    buffer, as a ``_Handover`` the training process unpickles into ``[images, labels]``); items of other datasets are
    stacked by ``torch.utils.data.default_collate``."""
    if isinstance(items, Batch):
        return _Handover(items) if items.flags is not None else [items.images, items.labels]
    return default_collate(items)


def shared_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous tensor in shared memory: handing it to another process copies nothing (as
    ``default_collate`` allocates the batches it stacks in a worker: ``collate_tensor_fn``)."""
    nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, tuple(shape))


def storage_lives_with_its_tensors() -> bool:
    """Whether a storage's Python object (and so its finalizer) lives as long as any tensor or view uses the storage,
    which ``_received`` relies on to free a ring buffer (torch >= 2.1 keeps one object per storage); checked, not
    assumed."""
    released = []
    tensor = torch.empty(4)
    weakref.finalize(tensor.untyped_storage(), released.append, True)
    view = tensor[1:]
    del tensor
    alive = not released and view.untyped_storage() is view.untyped_storage()
    del view
    return alive and released == [True]


class BatchBuffers:
    """Where a process reads whole batches: outside DataLoader workers a new tensor per batch; in a worker, a ring of
    ``RING`` shared-memory buffers reused once the training process has let go of them.

    A fresh shared-memory segment per batch (what ``default_collate`` does) costs more than reading the batch: its
    pages are allocated, zeroed and faulted in every time (a 13-band uint16 batch of 256 at 128 px: ~109 MB, ~80 ms on
    a 2-core VM, against ~12 ms to copy the pixels into a buffer already mapped). A ring buffer is reused only when
    its flag, in shared memory, says FREE: the training process sets it when the last tensor using the batch's memory
    there is gone (``_received``), whatever holds it (the pin-memory thread, the training step, a kept view); until
    then the worker reads into another buffer, or a fresh one when all ``RING`` are in use (always, with a torch whose
    storage objects do not live as long as their tensors: ``storage_lives_with_its_tensors``). A batch the training
    process never receives (a loader abandoned mid-epoch) keeps its buffer until the worker ends.
    """

    def __init__(self) -> None:
        self.flags: torch.Tensor | None = None  # uint8 [RING]: FREE / IN_USE
        self.ring: list[torch.Tensor | None] = [None] * RING

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(buffer of ``shape`` / ``dtype``, flags, slot), slot -1 and flags None for a buffer outside the ring."""
        if get_worker_info() is None:
            return torch.empty(tuple(shape), dtype=dtype), None, -1
        if self.flags is None:
            self.flags = shared_empty((RING,), torch.uint8).fill_(FREE if storage_lives_with_its_tensors() else IN_USE)
        states = self.flags.numpy()
        for slot, buffer in enumerate(self.ring):
            if states[slot] == FREE:
                if buffer is None or buffer.shape != tuple(shape) or buffer.dtype != dtype:
                    buffer = self.ring[slot] = shared_empty(shape, dtype)
                states[slot] = IN_USE
                return buffer, self.flags, slot
        return shared_empty(shape, dtype), None, -1


class PredecodedDataset(SampleDataset):
    """Pre-decoded images (``util.data.packed``, ``util.data.shards``): uint8 / uint16 arrays of ``bands`` x ``size``
    x ``size`` pixels, read a whole batch at a time.

    Without a ``transform``, a DataLoader's batch of keys (``__getitems__``) is read by ``read_into`` straight into one
    tensor [B, C, S, S] (inside a worker, a reused shared-memory buffer: ``BatchBuffers``) and handed on as a
    ``Batch``: no per-item tensors, no stacking copy. The pixels are those of ``dataset[key]`` item by item: crops,
    flips and normalisation run later on the whole batch (``util.data.transforms.BatchAugment``), drawing from the
    training process's generator, so which worker read a batch, and how, changes nothing. With a ``transform``
    (per-image augmentation seeded by each key's seed) the items are read one by one as before.
    """

    predecoded = True
    size: int
    bands: int
    dtype: str  # "uint8" / "uint16"
    _buffers: BatchBuffers | None = None

    def read_into(self, indices: list[int], out: np.ndarray) -> None:
        """Write the pixels of samples ``indices`` into ``out`` [len(indices), bands, size, size] (``dtype``)."""
        raise NotImplementedError

    def __getitems__(self, keys: list) -> Batch | list:
        if self.transform is not None:
            return [self[key] for key in keys]
        indices = [key[0] if isinstance(key, tuple) else key for key in keys]
        outside = next((index for index in indices if not 0 <= index < len(self)), None)
        if outside is not None:  # read_into indexes without bounds checks
            raise IndexError(f"{self.source}: sample index {outside} out of range 0..{len(self) - 1}")
        if self._buffers is None:  # per process: a worker makes its own ring
            self._buffers = BatchBuffers()
        shape = (len(indices), self.bands, self.size, self.size)
        images, flags, slot = self._buffers.take(shape, getattr(torch, self.dtype))
        self.read_into(indices, images.numpy())
        return Batch(images, torch.tensor([self.targets[i] for i in indices], dtype=torch.int64), flags, slot)


def derived_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` (e.g. seed, epoch, index): blake2b of their text, the same on every machine."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededSampler(DistributedSampler):
    """``DistributedSampler`` that yields (index, seed) so each sample's augmentation depends only on
    (seed, epoch, index); ``set_start`` skips the samples of batches already trained in this epoch.
    Subclasses change the order by overriding ``order`` (``util.data.shards.ShardSampler``).
    """

    def __init__(self, dataset: Dataset, *args, **kwargs) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    def order(self) -> list[int]:
        """This rank's sample indices of the epoch (``set_epoch``), in training order."""
        return list(super().__iter__())

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.order()[self.start :]:
            yield index, derived_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return self.num_samples - self.start


_TOLD: set[int] = set()  # the runs (by id) whose default worker count rank 0 has printed


def worker_count(loading: Loading, run: Run) -> int:
    """DataLoader worker processes: ``--num_workers`` where given, else this process's share of the CPUs less one for
    the training process (``util.run.threads.default_workers``), which rank 0 prints once per run with its reason."""
    if loading.num_workers is not None:
        return loading.num_workers
    workers, reason = threads.default_workers()
    if run.is_main and id(run) not in _TOLD:
        _TOLD.add(id(run))
        print(f"data workers: {workers} per process (--num_workers not given; {reason})", flush=True)
    return workers


def train_loader(dataset: SampleDataset, loading: Loading, run: Run) -> tuple[DataLoader, SeededSampler]:
    """Shuffled, seeded (``loading.seed``), sharded across ranks in the dataset's own order (``make_sampler``);
    incomplete last batches are dropped.

    Raises:
        UsageError: fewer images than one global batch.
    """
    if len(dataset) < loading.batch_size * run.world_size:
        raise UsageError(
            f"--batch_size {loading.batch_size} x {run.world_size} process(es) is more than the {len(dataset)} "
            "training images"
        )
    sampler = dataset.make_sampler(run.world_size, run.rank, loading.seed)
    workers = worker_count(loading, run)
    loader = DataLoader(  # its own generator: worker seeds must not draw from the RNG that masks use
        dataset,
        batch_size=loading.batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=loading.pin_mem and run.device.type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(loading.seed),
        worker_init_fn=ignore_stop_signals,
    )
    return loader, sampler


def eval_loader(dataset: Dataset, loading: Loading, run: Run) -> DataLoader:
    """In order; each rank takes every world_size-th sample (no padding, so no sample counts twice)."""
    indices = list(range(run.rank, len(dataset), run.world_size))
    return DataLoader(  # a generator of its own, so evaluating leaves the training RNG untouched
        torch.utils.data.Subset(dataset, indices),
        batch_size=loading.batch_size,
        shuffle=False,
        num_workers=worker_count(loading, run),
        pin_memory=loading.pin_mem and run.device.type == "cuda",
        collate_fn=collate,
        generator=torch.Generator(),
        worker_init_fn=ignore_stop_signals,
    )
