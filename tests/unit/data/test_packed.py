"""util/data/packed.py: band-first and band-last arrays, whole-batch reads equal to item-by-item reads, workers."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_PRETRAIN, bands_of
from torch.utils.data import DataLoader

from util import config
from util.data import datasets, loaders, packed
from util.data.transforms import build_transform
from util.errors import DataError
from util.run import process

FORMATS = [("uint8", 3), ("uint16", 13)]


def write_packed(folder: Path, arrays: np.ndarray, labels: list[int], layout: str | None) -> Path:
    """``arrays`` [N, C, S, S] as a packed array in ``layout`` ("CHW", "HWC", or None: a file written before the
    layout key, band-last); returns the JSON's path."""
    folder.mkdir(parents=True, exist_ok=True)
    stored = arrays if layout == "CHW" else arrays.transpose(0, 2, 3, 1)
    suffix = {"uint8": ".u8", "uint16": ".u16"}[str(arrays.dtype)]
    (folder / f"x{suffix}").write_bytes(np.ascontiguousarray(stored).tobytes())
    meta = {"size": arrays.shape[-1], "count": len(arrays), "labels": labels, "array": f"x{suffix}"}
    meta.update(dtype=str(arrays.dtype), bands=arrays.shape[1])
    if layout is not None:
        meta["layout"] = layout
    (folder / "x.json").write_text(json.dumps(meta))
    return folder / "x.json"


def random_arrays(count: int, dtype: str, bands: int, size: int = 6, seed: int = 0) -> np.ndarray:
    high = 256 if dtype == "uint8" else 65536
    return np.random.default_rng(seed).integers(0, high, (count, bands, size, size)).astype(dtype)


def open_packed(meta: Path, bands: int):
    if bands == 3:
        return datasets.build_dataset(meta)
    return datasets.build_dataset(meta, bands=bands_of(in_chans=bands, mean=[0.0] * bands, std=[1.0] * bands))


@pytest.mark.parametrize("layout", ["CHW", "HWC", None])
@pytest.mark.parametrize(("dtype", "bands"), FORMATS)
def test_a_batch_read_whole_equals_its_items_read_one_by_one(tmp_path, layout, dtype, bands):
    arrays = random_arrays(7, dtype, bands)
    labels = [3, 1, 4, 1, 5, 9, 2]
    dataset = open_packed(write_packed(tmp_path, arrays, labels, layout), bands)
    assert dataset.layout == (layout or "HWC")
    keys = [(5, 11), (0, 12), (5, 13), (2, 14), (6, 15)]  # (index, seed), as SeededSampler yields them; a repeat
    items = [dataset[key] for key in keys]
    for (index, _), (pixels, label) in zip(keys, items):
        assert pixels.dtype == getattr(torch, dtype) and np.array_equal(pixels.numpy(), arrays[index])
        assert label == labels[index]
    batch = loaders.collate(dataset.__getitems__(keys))
    expected = torch.utils.data.default_collate(items)  # what the per-item path gave
    assert batch[0].dtype == expected[0].dtype and batch[0].shape == (5, bands, 6, 6) and batch[0].is_contiguous()
    assert torch.equal(batch[0], expected[0]) and torch.equal(batch[1], expected[1])
    assert batch[1].dtype == torch.int64 and batch[1].tolist() == [9, 3, 9, 4, 2]
    assert torch.equal(dataset.__getitems__([5, 0]).images, batch[0][:2])  # plain indices (evaluation)
    with pytest.raises(IndexError, match="x.json: sample index 7 out of range 0..6"):
        dataset.__getitems__([0, 7])


def test_band_first_and_band_last_files_of_the_same_images_read_the_same(tmp_path):
    arrays = random_arrays(5, "uint16", 13, seed=1)
    first = open_packed(write_packed(tmp_path / "chw", arrays, [0] * 5, "CHW"), 13)
    last = open_packed(write_packed(tmp_path / "hwc", arrays, [0] * 5, "HWC"), 13)
    assert (tmp_path / "chw" / "x.u16").read_bytes() != (tmp_path / "hwc" / "x.u16").read_bytes()
    keys = [4, 2, 0, 3]
    assert torch.equal(first.__getitems__(keys).images, last.__getitems__(keys).images)


def test_an_unknown_layout_is_refused(tmp_path):
    meta = write_packed(tmp_path, random_arrays(2, "uint8", 3), [0, 1], "NHWC")
    with pytest.raises(DataError, match="x.json: key 'layout' must be one of CHW, HWC, got 'NHWC'"):
        packed.PackedDataset(meta)


def test_with_a_per_image_transform_items_stay_seeded_one_by_one(tmp_path):
    dataset = packed.PackedDataset(
        write_packed(tmp_path, random_arrays(4, "uint8", 3, size=12), [0, 1, 0, 1], "CHW"),
        transform=build_transform(True, 8),
    )
    keys = [(1, 7), (3, 8)]
    batch = loaders.collate(dataset.__getitems__(keys))
    assert batch[0].dtype == torch.float32 and batch[0].shape == (2, 3, 8, 8)
    assert torch.equal(batch[0][0], dataset[(1, 7)][0]) and torch.equal(batch[0][1], dataset[(3, 8)][0])


def test_a_workers_ring_buffers_are_reused_only_once_the_training_process_let_go_of_them(tmp_path):
    """Batches kept here (a whole batch, a view of another) keep their pixels while the worker goes on reusing the
    buffers of the batches dropped."""
    arrays = random_arrays(12, "uint16", 13)
    dataset = open_packed(write_packed(tmp_path, arrays, list(range(12)), "CHW"), 13)
    order = np.random.default_rng(5).integers(0, 12, 48).tolist()  # no period a reused buffer could repeat
    loader = DataLoader(dataset, batch_size=2, sampler=order, num_workers=1, collate_fn=loaders.collate)
    segments, kept = set(), []
    for n, (images, labels) in enumerate(loader):
        indices = order[2 * n : 2 * n + 2]
        assert np.array_equal(images.numpy(), arrays[indices]) and labels.tolist() == indices
        segments.add(os.fstat(images.untyped_storage()._share_fd_cpu_()[0]).st_ino)  # the shared-memory file
        if n in (1, 2):
            kept.append((images if n == 1 else images[1:], indices if n == 1 else indices[1:]))
    assert len(segments) < 24  # buffers were reused
    for images, indices in kept:
        assert np.array_equal(images.numpy(), arrays[indices])


def test_without_storage_objects_that_live_with_their_tensors_every_batch_gets_fresh_shared_memory(
    tmp_path, monkeypatch
):
    arrays = random_arrays(4, "uint8", 3)
    dataset = open_packed(write_packed(tmp_path, arrays, [0] * 4, "CHW"), 3)
    monkeypatch.setattr(loaders, "storage_lives_with_its_tensors", lambda: False)  # the workers fork with it
    loader = DataLoader(dataset, batch_size=2, sampler=[0, 1, 2, 3] * 3, num_workers=1, collate_fn=loaders.collate)
    segments = set()
    for n, (images, _) in enumerate(loader):
        assert np.array_equal(images.numpy(), arrays[[0, 1, 2, 3][2 * (n % 2) : 2 * (n % 2) + 2]])
        segments.add(os.fstat(images.untyped_storage()._share_fd_cpu_()[0]).st_ino)
        del images
    assert len(segments) == 6  # never reused


def fake_run() -> process.Run:
    run = process.Run.__new__(process.Run)
    run.world_size, run.rank, run.device = 1, 0, torch.device("cpu")
    return run


@pytest.mark.parametrize(("dtype", "bands"), FORMATS)
def test_two_workers_give_the_batches_of_none_and_of_the_item_by_item_path(tmp_path, monkeypatch, dtype, bands):
    arrays = random_arrays(12, dtype, bands)
    dataset = open_packed(write_packed(tmp_path, arrays, list(range(12)), "CHW"), bands)
    monkeypatch.setattr(packed.PackedDataset, "__getitem__", None)  # whole batches only, in the workers too
    epochs = []
    for workers in (0, 2):
        loader, sampler = loaders.train_loader(
            dataset, config.Loading(batch_size=4, num_workers=workers, pin_mem=False, seed=3), fake_run()
        )
        sampler.set_epoch(1)
        epochs.append([(images, labels) for images, labels in loader])
        order = sampler.order()
    assert len(epochs[0]) == 3
    for (a, la), (b, lb), first in zip(*epochs, range(0, 12, 4)):
        assert torch.equal(a, b) and torch.equal(la, lb)
        indices = order[first : first + 4]
        assert np.array_equal(a.numpy(), arrays[indices]) and la.tolist() == indices


def test_a_run_stopped_mid_epoch_resumes_with_workers_to_the_weights_of_an_uninterrupted_one(
    tmp_path, monkeypatch, capsys
):
    """Whole-batch reads in 2 workers after the resume, in the main process before it, in the default number of
    workers for the uninterrupted run: the same weights."""
    import main_pretrain
    from util.run import checkpoint, loop

    meta = write_packed(tmp_path / "data", random_arrays(24, "uint8", 3, size=40), [0] * 24, "CHW")
    flags = [*TINY_PRETRAIN, "--train_path", str(meta)]

    def pretrain(*argv):
        main_pretrain.main(config.parse_args(main_pretrain.get_args_parser(), [*flags, *argv]))

    pretrain("--output_dir", str(tmp_path / "straight"))  # no --num_workers: the CPU share less one, at least 1
    assert "data workers: " in capsys.readouterr().out
    calls = []
    monkeypatch.setattr(loop, "stop_requested", lambda run: calls.append(1) or len(calls) == 6 + 3)  # as SIGTERM
    out = tmp_path / "interrupted"
    pretrain("--num_workers", "0", "--output_dir", str(out))
    assert checkpoint.read_checkpoint(out / "checkpoint-last.pth")["next_step"] == 3
    monkeypatch.setattr(loop, "stop_requested", lambda run: False)
    pretrain("--num_workers", "2", "--output_dir", str(out), "--resume", "auto")
    expected = checkpoint.read_checkpoint(tmp_path / "straight" / "checkpoint-last.pth")["model"]
    got = checkpoint.read_checkpoint(out / "checkpoint-last.pth")["model"]
    assert got.keys() == expected.keys() and all(torch.equal(got[key], value) for key, value in expected.items())


@pytest.mark.parametrize("recorded", [None, 7])
def test_a_nodata_flag_other_than_the_recorded_one_is_refused(tmp_path, recorded):
    """--nodata cannot change a pre-decoded array's no-data value: it was ignored (those pixels trained as data)."""
    meta = write_packed(tmp_path, random_arrays(2, "uint16", 2), [0, 1], "CHW")
    description = json.loads(meta.read_text())
    meta.write_text(json.dumps({**description, "nodata": recorded}))
    with pytest.raises(DataError, match=f"its no-data value is {recorded or 'none'}, recorded when it was written; "):
        datasets.build_dataset(meta, bands=bands_of(in_chans=2, mean=[0.0] * 2, std=[1.0] * 2, nodata=0.0))
    same = datasets.build_dataset(meta, bands=bands_of(in_chans=2, mean=[0.0] * 2, std=[1.0] * 2, nodata=recorded))
    assert same.nodata == recorded
