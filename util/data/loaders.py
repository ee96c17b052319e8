"""Data loaders: seeded, sharded and resumable for training; in order and without padding for evaluation."""
from __future__ import annotations

import argparse
import hashlib
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from util.errors import UsageError
from util.run.process import Run, ignore_stop_signals


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
        for index in self.order()[self.start:]:
            yield index, derived_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return self.num_samples - self.start


def train_loader(dataset: Dataset, args: argparse.Namespace, run: Run) -> tuple[DataLoader, SeededSampler]:
    """Shuffled, seeded, sharded across ranks; incomplete last batches are dropped.

    Raises:
        UsageError: fewer images than one global batch.
    """
    if len(dataset) < args.batch_size * run.world_size:
        raise UsageError(
            f"--batch_size {args.batch_size} x {run.world_size} process(es) is more than the {len(dataset)} training images"
        )
    if hasattr(dataset, "make_sampler"):  # an order of its own (util.data.shards: shards read in runs)
        sampler = dataset.make_sampler(run.world_size, run.rank, args.seed)
    else:
        sampler = SeededSampler(dataset, num_replicas=run.world_size, rank=run.rank, shuffle=True, seed=args.seed)
    loader = DataLoader(  # its own generator: worker seeds must not draw from the RNG that masks use
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
        pin_memory=args.pin_mem and run.device.type == "cuda", drop_last=True,
        persistent_workers=args.num_workers > 0, generator=torch.Generator().manual_seed(args.seed),
        worker_init_fn=ignore_stop_signals,
    )
    return loader, sampler


def eval_loader(dataset: Dataset, args: argparse.Namespace, run: Run) -> DataLoader:
    """In order; each rank takes every world_size-th sample (no padding, so no sample counts twice)."""
    indices = list(range(run.rank, len(dataset), run.world_size))
    return DataLoader(  # a generator of its own, so evaluating leaves the training RNG untouched
        torch.utils.data.Subset(dataset, indices), batch_size=args.batch_size, shuffle=False,
        num_workers=args.num_workers, pin_memory=args.pin_mem and run.device.type == "cuda", generator=torch.Generator(),
        worker_init_fn=ignore_stop_signals,
    )
