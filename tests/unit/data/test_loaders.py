"""util/data/loaders.py: seeded, resumable sampling."""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from util import config
from util.data import loaders
from util.data.datasets import build_dataset
from util.data.transforms import build_transform
from util.run import process


def test_seeded_samples_repeat_their_augmentation(csv_dataset):
    dataset = build_dataset(csv_dataset, "fmow_rgb", build_transform(True, 32))
    torch.manual_seed(0)
    first = dataset[(3, 42)][0]
    torch.manual_seed(1)
    again = dataset[(3, 42)][0]
    other = dataset[(3, 43)][0]
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_sampler_seeds_depend_on_epoch_and_skip_finished_batches(csv_dataset):
    dataset = build_dataset(csv_dataset, "fmow_rgb")
    sampler = loaders.SeededSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(i for i, _ in epoch0) == list(range(8)) and epoch0 != epoch1
    sampler.set_epoch(0)
    sampler.set_start(4)
    assert list(sampler) == epoch0[4:] and len(sampler) == 4


class RingBuffer(Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple[bool, bool, int]:
        buffer, flags, slot = loaders.BatchBuffers().take((2, 3), torch.uint16)
        return buffer.is_shared(), flags is not None and flags.is_shared(), slot


def test_a_batch_is_read_into_shared_memory_in_a_worker_only():
    """In a worker the batch is born in shared memory (a ring buffer), so the hand-over to the training process copies
    nothing; in the training process itself it is a plain tensor."""
    buffer, flags, slot = loaders.BatchBuffers().take((2, 3), torch.uint16)
    assert not buffer.is_shared() and flags is None and slot == -1
    assert list(DataLoader(RingBuffer(), batch_size=None, num_workers=1)) == [[True, True, 0]]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_without_num_workers_the_loaders_take_the_cpu_share_less_one_and_say_why(csv_dataset, monkeypatch, capsys):
    monkeypatch.setattr(loaders.threads, "affinity_cpus", lambda: set(range(8)))
    monkeypatch.setattr(loaders.threads, "cgroup_cpu_quota", lambda *paths: None)
    monkeypatch.setattr(loaders.threads, "measured_once", lambda cpus: 0.0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    dataset = build_dataset(csv_dataset, "fmow_rgb", build_transform(True, 32))
    run = process.Run(0, 1, 0, torch.device("cpu"), None, csv_dataset.parent)
    loader, _ = loaders.train_loader(dataset, config.Loading(4, None), run)
    evaluation = loaders.eval_loader(dataset, config.Loading(4, None), run)
    assert loader.num_workers == evaluation.num_workers == 3  # 4 CPUs per process, one for the training process
    assert capsys.readouterr().out == (
        "data workers: 3 per process (--num_workers not given; 8 CPUs allowed by affinity, cgroup quota none, "
        "2 processes on this node; 4 CPUs per process, one left to the training process)\n"
    )  # once per run
    assert loaders.train_loader(dataset, config.Loading(4, 0), run)[0].num_workers == 0  # --num_workers wins
    assert capsys.readouterr().out == ""


def test_batches_for_a_gpu_are_pinned_unless_no_pin_mem(csv_dataset):
    """Pinned batches are what makes the training loops' ``.to(device, non_blocking=True)`` asynchronous."""
    dataset = build_dataset(csv_dataset, "fmow_rgb", build_transform(True, 32))
    for device, pin_mem, pinned in (("cuda", True, True), ("cuda", False, False), ("cpu", True, False)):
        run = process.Run(0, 1, 0, torch.device(device), None, csv_dataset.parent)
        reading = config.Loading(4, 0, pin_mem)
        assert loaders.train_loader(dataset, reading, run)[0].pin_memory == pinned
        assert loaders.eval_loader(dataset, reading, run).pin_memory == pinned


def test_this_torch_keeps_a_storage_object_as_long_as_its_tensors_as_the_ring_buffers_need():
    assert loaders.storage_lives_with_its_tensors()
