"""util/data/shards.py and tools/preprocess.py --shards: round trips, per-rank order, exact resume, damaged shards."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HANG_GUARD_S, REPO, TINY_PRETRAIN, bands_of, write_csv_dataset

import main_pretrain
from util import config
from util.data import datasets, loaders, raster_options, shards
from util.errors import DataError
from util.run import checkpoint, loop, process
from util.run.process import run_entry_point


def preprocess(*args):
    return subprocess.run(
        [sys.executable, "tools/preprocess.py", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )


def make_shards(folder: Path, count: int, per_shard: int, bands: int = 3, dtype=np.uint8, size: int = 8, seed: int = 0):
    """Random arrays [bands, size, size] with labels i % 3, written as shards; returns (manifest path, arrays)."""
    rng = np.random.default_rng(seed)
    high = 256 if dtype == np.uint8 else 65536
    arrays = [rng.integers(0, high, (bands, size, size)).astype(dtype) for _ in range(count)]
    manifest = folder / f"train_{size}{shards.MANIFEST_SUFFIX}"
    shards.write_shards(
        ((f"{i:07d}", a, i % 3) for i, a in enumerate(arrays)), count, manifest, per_shard, classes=["a", "b", "c"]
    )
    return manifest, arrays


def test_uint16_13_band_shards_round_trip_bytes_and_labels(tmp_path):
    manifest, arrays = make_shards(tmp_path, 7, per_shard=3, bands=13, dtype=np.uint16)
    dataset = datasets.build_dataset(manifest, bands=bands_of(in_chans=13, mean=[0.0] * 13, std=[1.0] * 13))
    assert len(dataset) == 7 and dataset.shard_counts == [3, 3, 1] and dataset.targets == [i % 3 for i in range(7)]
    assert dataset.label_names == {0: "a", 1: "b", 2: "c"} and dataset.predecoded
    for i, array in enumerate(arrays):
        pixels, label = dataset[(i, 123)]
        assert pixels.dtype == torch.uint16 and pixels.shape == (13, 8, 8) and label == i % 3
        assert pixels.numpy().tobytes() == array.tobytes()
    assert torch.stack([dataset[i][0] for i in range(4)]).float().shape == (
        4,
        13,
        8,
        8,
    )  # collates, converts on the device
    with pytest.raises(DataError, match="13 band\\(s\\) of uint16: give --in_chans 13"):
        datasets.build_dataset(manifest)  # the 8-bit RGB path refuses it


def test_webdataset_reads_the_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    manifest, arrays = make_shards(tmp_path, 5, per_shard=2)
    urls = [str(tmp_path / s["name"]) for s in json.loads(manifest.read_text())["shards"]]
    got = [(s["__key__"], s["npy"], s["cls"]) for s in wds.WebDataset(urls, shardshuffle=False).decode()]
    assert [key for key, _, _ in got] == [f"{i:07d}" for i in range(5)]
    assert all(np.array_equal(npy, arrays[i]) and cls == i % 3 for i, (_, npy, cls) in enumerate(got))


def test_preprocess_writes_rgb_shards_equal_to_the_packed_array(tmp_path):
    source = write_csv_dataset(tmp_path / "raw", 6, "train.csv", size=40)
    out = tmp_path / "out"
    result = preprocess(
        "--input",
        source,
        "--output",
        out,
        "--size",
        "32",
        "--pack",
        "--shards",
        "--shard_samples",
        "4",
        "--workers",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 2 shard(s) of 3 band(s) of uint8" in result.stdout
    packed = datasets.build_dataset(out / "train_32.json")
    sharded = datasets.build_dataset(out / "train_32.shards.json")
    assert sorted(sharded.targets) == sorted(packed.targets) and len(sharded) == 6
    # the shards hold the packed images in a seeded random order: each packed image appears once, with its label
    packed_items = [packed[i] for i in range(6)]
    matches = sorted(
        next(j for j, (image, label) in enumerate(packed_items) if torch.equal(image, pixels) and label == target)
        for pixels, target in (sharded[i] for i in range(6))
    )
    assert matches == list(range(6))


def test_preprocess_raster_shards_keep_uint16_and_refuse_float(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "tiles").mkdir()
    arrays = [rng.integers(0, 65536, (13, 16, 16)).astype(np.uint16) for _ in range(5)]
    for i, array in enumerate(arrays):
        np.save(tmp_path / "tiles" / f"{i}.npy", array)
    (tmp_path / "train.csv").write_text("label,image_path\n" + "".join(f"{i % 2},tiles/{i}.npy\n" for i in range(5)))
    result = preprocess(
        "--input",
        tmp_path / "train.csv",
        "--output",
        tmp_path / "out",
        "--size",
        "16",
        "--raster",
        "--shards",
        "--shard_samples",
        "2",
        "--workers",
        "1",
    )
    assert result.returncode == 0, result.stderr
    with pytest.raises(DataError, match="13 band.s. of uint16: give --in_chans 13"):  # not on the RGB path
        shards.ShardDataset(tmp_path / "out" / "train_16.shards.json")
    dataset = shards.ShardDataset(
        tmp_path / "out" / "train_16.shards.json", raster=raster_options.RasterOptions(13, None, None, [0.0] * 13)
    )
    assert dataset.dtype == "uint16" and dataset.bands == 13 and dataset.shard_counts == [2, 2, 1]
    got = {dataset[i][0].numpy().tobytes(): dataset.targets[i] for i in range(5)}
    assert got == {array.tobytes(): i % 2 for i, array in enumerate(arrays)}
    np.save(tmp_path / "tiles" / "3.npy", arrays[3].astype(np.float32))
    refused = preprocess(
        "--input", tmp_path / "train.csv", "--output", tmp_path / "out2", "--size", "16", "--raster", "--shards"
    )
    assert refused.returncode == 1 and refused.stderr.strip().count("\n") == 0
    assert (
        refused.stderr.startswith("error: ")
        and "0000003_3.tif: float32 samples; packed arrays and shards hold uint8 or uint16" in refused.stderr
    )


def order(dataset, rank, epoch, world=2, seed=0):
    sampler = shards.ShardSampler(dataset, num_replicas=world, rank=rank, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_two_ranks_see_every_sample_exactly_once_per_epoch(tmp_path):
    manifest, _ = make_shards(tmp_path, 22, per_shard=4)  # shards of 4, 4, 4, 4, 4, 2
    dataset = shards.ShardDataset(manifest)
    epochs = []
    for epoch in range(3):
        ranks = [[index for index, _ in order(dataset, rank, epoch)] for rank in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == 11
        assert sorted(ranks[0] + ranks[1]) == list(range(22))
        epochs.append(ranks)
    assert epochs[0] != epochs[1] != epochs[2]  # shard and sample order change per epoch
    assert order(dataset, 0, 1) == order(dataset, 0, 1)  # and only with the epoch
    seeds = [seed for _, seed in order(dataset, 0, 0)]
    assert len(set(seeds)) == len(seeds)
    odd, _ = make_shards(tmp_path / "odd", 23, per_shard=4)
    odd = shards.ShardDataset(odd)
    both = [index for rank in (0, 1) for index, _ in order(odd, rank, 0)]
    assert len(both) == 22 and len(set(both)) == 22  # the remainder (one sample) is left out, the same count per rank


def test_each_rank_reads_runs_of_shards_and_set_start_skips_finished_batches(tmp_path):
    manifest, _ = make_shards(tmp_path, 40, per_shard=5)
    dataset = shards.ShardDataset(manifest)
    sampler = shards.ShardSampler(dataset, num_replicas=2, rank=1, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    shards_read = {dataset.locate(index)[0] for index, _ in full}
    assert len(shards_read) <= 5  # half the data: four shards, five where a shard is split between the ranks
    sampler.set_start(8)
    assert list(sampler) == full[8:] and len(sampler) == 12


def test_workers_do_not_change_the_batches(tmp_path):
    manifest, _ = make_shards(tmp_path, 16, per_shard=3)
    dataset = shards.ShardDataset(manifest)
    run = process.Run.__new__(process.Run)
    run.world_size, run.rank, run.device = 1, 0, torch.device("cpu")
    batches = []
    for workers in (0, 2):
        args = config.argparse.Namespace(batch_size=4, seed=5, num_workers=workers, pin_mem=False)
        loader, sampler = loaders.train_loader(dataset, args, run)
        assert isinstance(sampler, shards.ShardSampler)
        sampler.set_epoch(1)
        batches.append([(images, labels) for images, labels in loader])
    assert len(batches[0]) == 4
    for (a, la), (b, lb) in zip(*batches):
        assert torch.equal(a, b) and torch.equal(la, lb)


@pytest.mark.parametrize(("bands", "dtype"), [(3, np.uint8), (13, np.uint16)])
def test_a_batch_read_whole_equals_its_items_read_one_by_one(tmp_path, bands, dtype):
    manifest, arrays = make_shards(tmp_path, 9, per_shard=4, bands=bands, dtype=dtype)
    raster = None if bands == 3 else raster_options.RasterOptions(bands, None, None, [0.0] * bands)
    dataset = shards.ShardDataset(manifest, raster=raster)
    keys = [(8, 1), (0, 2), (5, 3), (8, 4), (3, 5)]  # three shards, a repeat
    items = [dataset[key] for key in keys]
    batch = loaders.collate(dataset.__getitems__(keys))
    expected = torch.utils.data.default_collate(items)
    assert batch[0].shape == (5, bands, 8, 8) and batch[0].dtype == expected[0].dtype
    assert torch.equal(batch[0], expected[0]) and torch.equal(batch[1], expected[1])
    assert np.array_equal(batch[0].numpy(), np.stack([arrays[i] for i, _ in keys]))
    assert batch[1].tolist() == [i % 3 for i, _ in keys]


def test_a_sample_with_another_npy_header_is_parsed_in_a_batch_too(tmp_path, monkeypatch):
    manifest, arrays = make_shards(tmp_path, 5, per_shard=2)
    dataset = shards.ShardDataset(manifest)
    header = dataset._npy_header()
    monkeypatch.setattr(dataset, "_header", header.replace(b"'|u1'", b"'<u1'"))  # same length, never written
    assert dataset._npy_header() != header
    batch = dataset.__getitems__([4, 1, 2])
    assert np.array_equal(batch.images.numpy(), np.stack([arrays[4], arrays[1], arrays[2]]))


def test_missing_or_truncated_shard_and_bad_manifest_give_one_line_naming_them(tmp_path):
    manifest, _ = make_shards(tmp_path, 6, per_shard=2)
    second = tmp_path / "train_8_shards" / "000001.tar"
    data = second.read_bytes()
    second.write_bytes(data[:1000])
    with pytest.raises(DataError) as error:
        datasets.build_dataset(manifest)
    assert str(error.value).startswith(f"{second}: shard truncated: 1000 bytes") and "\n" not in str(error.value)
    second.unlink()
    with pytest.raises(DataError, match=f"^{second}: shard missing \\(listed in {manifest}\\)$"):
        datasets.build_dataset(manifest)
    second.write_bytes(data[:1000] + bytes(len(data) - 1000))  # the right size, the content cut: found when read
    dataset = datasets.build_dataset(manifest)
    with pytest.raises(DataError, match=f"^{second}: "):
        [dataset[i] for i in range(6)]
    with pytest.raises(DataError, match=f"^{second}: "):
        dataset.__getitems__(list(range(6)))  # a whole batch: the same one line
    manifest.write_text(manifest.read_text()[:50])
    with pytest.raises(DataError, match=f"^{manifest}: not a shard manifest \\(JSONDecodeError"):
        datasets.build_dataset(manifest)


TINY_RUN = [*TINY_PRETRAIN, "--num_workers", "0"]


def pretrain(argv):
    main_pretrain.main(config.parse_args(main_pretrain.get_args_parser(), argv))


def test_a_run_stopped_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    manifest, _ = make_shards(tmp_path / "data", 26, per_shard=5, size=40)  # 6 steps per epoch, 2 samples left out
    flags = [*TINY_RUN, "--train_path", str(manifest)]
    pretrain([*flags, "--output_dir", str(tmp_path / "straight")])
    calls = []

    def stop_at_epoch_1_step_3(run):  # what SIGTERM does, at a chosen step
        calls.append(1)
        return len(calls) == 6 + 3

    monkeypatch.setattr(loop, "stop_requested", stop_at_epoch_1_step_3)
    out = tmp_path / "interrupted"
    pretrain([*flags, "--output_dir", str(out)])
    state = checkpoint.read_checkpoint(out / "checkpoint-last.pth")
    assert (state["epoch"], state["next_step"]) == (0, 3) and len(state["args"]["shard_manifest"]) == 64
    monkeypatch.setattr(loop, "stop_requested", lambda run: False)
    pretrain([*flags, "--output_dir", str(out), "--resume", "auto"])
    assert "continuing at epoch 1 step 3" in capsys.readouterr().out
    expected = checkpoint.read_checkpoint(tmp_path / "straight" / "checkpoint-last.pth")["model"]
    got = checkpoint.read_checkpoint(out / "checkpoint-last.pth")["model"]
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key

    make_shards(tmp_path / "data", 26, per_shard=4, size=40)  # other shards: another order
    with pytest.raises(SystemExit) as exit_info:
        run_entry_point(
            main_pretrain.main,
            config.parse_args(
                main_pretrain.get_args_parser(),
                [*flags, "--output_dir", str(tmp_path / "straight"), "--resume", "auto", "--epochs", "3"],
            ),
        )
    message = str(exit_info.value)
    assert message.startswith("error: ") and "\n" not in message and "shard manifest sha256" in message


@pytest.mark.parametrize("name", ["../x.tar", "/abs/x.tar", "train_8_shards/../../x.tar", ""])
def test_a_shard_name_outside_the_manifest_folder_is_refused(tmp_path, name):
    manifest, _ = make_shards(tmp_path, 6, per_shard=2)
    meta = json.loads(manifest.read_text())
    meta["shards"][0]["name"] = name
    manifest.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="points outside its folder"):
        datasets.build_dataset(manifest)


def test_a_shard_listed_twice_is_refused(tmp_path):
    manifest, _ = make_shards(tmp_path, 6, per_shard=2)
    meta = json.loads(manifest.read_text())
    meta["shards"][1] = dict(meta["shards"][0], name="train_8_shards/./000000.tar")
    manifest.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="listed more than once"):
        datasets.build_dataset(manifest)


def test_shards_of_another_nodata_or_sample_type_than_the_band_stats_are_refused(tmp_path):
    manifest, _ = make_shards(tmp_path, 4, per_shard=2, bands=2, dtype=np.uint16)
    stats = tmp_path / "s.json"
    for recorded, message in (
        (  # not "give --nodata 0": the value was fixed when the shards were written
            {"dtype": "uint16", "nodata": 0},
            "its no-data value is none, recorded when it was written, but --band_stats .* computed with --nodata 0: "
            "preprocess again with tools/preprocess.py --raster --nodata 0",
        ),
        ({"dtype": "float32", "nodata": None}, "uint16 samples, but --band_stats"),
    ):
        stats.write_text(json.dumps({"mean": [1, 1], "std": [1, 1], **recorded}))
        with pytest.raises(DataError, match=message):
            datasets.build_dataset(manifest, bands=bands_of(in_chans=2, band_stats=str(stats)))
