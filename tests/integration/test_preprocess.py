import json
import subprocess
import sys

import numpy as np
import torch
from conftest import HANG_GUARD_S, REPO, bands_of, make_image, write_csv_dataset
from PIL import Image

import engine_pretrain
import main_pretrain
from util import config
from util.data import datasets, packed, raster_options, transforms


def preprocess(*args):
    return subprocess.run(
        [sys.executable, "tools/preprocess.py", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )


def test_preprocessing_resizes_once_and_is_idempotent(tmp_path):
    source = write_csv_dataset(tmp_path / "raw", 6, "train.csv", size=80)
    make_image(1, seed=9, size=120).resize((120, 90)).save(tmp_path / "raw" / "images" / "train_5.jpg")
    out = tmp_path / "preproc"
    first = preprocess("--input", source, "--output", out, "--size", "32", "--workers", "2")
    assert first.returncode == 0, first.stderr
    assert "0 already done, resizing 6" in first.stdout
    dataset = datasets.build_dataset(out / "train_32.csv", "auto")
    assert len(dataset) == 6 and dataset.targets == [0, 1, 0, 1, 0, 1]
    assert sorted(min(dataset[i][0].size) for i in range(6)) == [32] * 6
    assert dataset[5][0].size == (43, 32)  # aspect ratio kept, shorter side 32
    csv_text = (out / "train_32.csv").read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "train_32").iterdir()}
    second = preprocess("--input", source, "--output", out, "--size", "32", "--workers", "2")
    assert "6 already done, resizing 0" in second.stdout
    assert (out / "train_32.csv").read_text() == csv_text
    assert {p: p.stat().st_mtime_ns for p in (out / "train_32").iterdir()} == mtimes


def test_an_interrupted_run_resumes_with_the_missing_images(tmp_path):
    source = write_csv_dataset(tmp_path / "raw", 4, "val.csv", size=48)
    out = tmp_path / "preproc"
    assert preprocess("--input", source, "--output", out, "--size", "32").returncode == 0
    removed = sorted((out / "val_32").iterdir())[1]
    removed.unlink()
    again = preprocess("--input", source, "--output", out, "--size", "32")
    assert "3 already done, resizing 1" in again.stdout and removed.exists()


def test_packed_array_trains_with_augmentation_on_the_device(tmp_path):
    source = write_csv_dataset(tmp_path / "raw", 8, "train.csv", size=48)
    out = tmp_path / "preproc"
    result = preprocess("--input", source, "--output", out, "--size", "40", "--pack")
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "train_40.json").read_text())
    assert meta["count"] == 8 and meta["size"] == 40 and meta["labels"] == [0, 1] * 4
    assert meta["layout"] == "CHW" and meta["format"] == "uint8 [count, bands, size, size], row-major"
    packed = datasets.build_dataset(out / "train_40.json")
    pixels, label = packed[(3, 0)]
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 40, 40) and label == 1
    jpeg = torch.from_numpy(np.array(Image.open(out / "train_40" / "0000003_train_3.jpg"))).permute(2, 0, 1)
    assert torch.equal(pixels, jpeg)  # square images: the centre square is the whole resized image
    augment = transforms.BatchAugment(32, transforms.FMOW_RGB_MEAN, transforms.FMOW_RGB_STD)
    batch = augment(torch.stack([packed[i][0] for i in range(4)]))
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.float32 and -4 < batch.mean() < 4
    argv = [
        "--model",
        "mae_vit_tiny",
        "--input_size",
        "32",
        "--patch_size",
        "8",
        "--batch_size",
        "4",
        "--epochs",
        "1",
        "--num_workers",
        "0",
        "--train_path",
        str(out / "train_40.json"),
        "--output_dir",
        str(tmp_path / "run"),
    ]
    main_pretrain.main(config.parse_args(main_pretrain.get_args_parser(), argv))
    assert (tmp_path / "run" / "checkpoint-last.pth").exists()


def test_a_truncated_packed_array_is_named(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"size": 4, "count": 2, "labels": [0, 1], "array": "x.u8"}))
    (tmp_path / "x.u8").write_bytes(bytes(10))
    try:
        datasets.build_dataset(tmp_path / "x.json")
    except datasets.DataError as e:
        assert "x.u8: expected 96 bytes for 2 images of 4 px x 3 band(s) of uint8, found 10" in str(e)
    else:
        raise AssertionError("no error")


def test_image_folder_class_names_are_kept_in_the_csv_and_the_packed_json(tmp_path):
    from conftest import make_tree

    tree = make_tree(tmp_path / "train", ["beach", "forest", "river"], per_class=2)
    out = tmp_path / "preproc"
    result = preprocess("--input", tree, "--output", out, "--size", "24", "--pack", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert (
        "resizing: 6/6 images done in" in result.stdout or "resizing: 6/6 done in" in result.stdout
    )  # plain lines: no terminal
    header, first = (out / "train_24.csv").read_text().splitlines()[:2]
    assert header == "label,image_path,class_name" and first.endswith(",beach")
    dataset = datasets.build_dataset(out / "train_24.csv")
    assert dataset.label_names == {0: "beach", 1: "forest", 2: "river"}
    assert json.loads((out / "train_24.json").read_text())["classes"] == ["beach", "forest", "river"]


def test_a_csv_without_class_names_gets_no_class_name_column(tmp_path):
    source = write_csv_dataset(tmp_path / "raw", 2, "train.csv", size=32)
    assert preprocess("--input", source, "--output", tmp_path / "out", "--size", "24").returncode == 0
    assert (tmp_path / "out" / "train_24.csv").read_text().splitlines()[0] == "label,image_path"


def write_uint16_tiles(folder, count=4, bands=13, size=40, nodata_corner=True):
    """An ImageFolder tree of ``count`` uint16 [bands, size, size] TIFFs, two classes, a no-data (0) corner each."""
    import tifffile

    rng = np.random.default_rng(0)
    tiles = []
    for i in range(count):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        tile = rng.integers(300, 60000, (bands, size, size)).astype(np.uint16)
        if nodata_corner:
            tile[:, :8, :8] = 0
        tifffile.imwrite(folder / f"c{i % 2}" / f"t{i}.tif", tile, photometric="minisblack")
        tiles.append(tile)
    return tiles


def test_raster_preprocessing_is_lossless_and_packs_uint16_of_every_band(tmp_path):
    tiles = write_uint16_tiles(tmp_path / "raw")
    out = tmp_path / "pre"
    result = preprocess(
        "--input",
        tmp_path / "raw",
        "--output",
        out,
        "--size",
        "40",
        "--raster",
        "--nodata",
        "0",
        "--pack",
        "--split",
        "train",
    )
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "train_40.json").read_text())
    assert (meta["dtype"], meta["bands"], meta["nodata"], meta["array"]) == ("uint16", 13, 0.0, "train_40.u16")
    written = sorted((out / "train_40").iterdir())
    assert [p.suffix for p in written] == [".tif"] * 4
    from util.data.images import read_raster

    order = [0, 2, 1, 3]  # ImageFolder order: class c0 (tiles 0, 2), then c1
    for path, i in zip(written, order):  # no resizing at 40 px: values and the no-data tag survive exactly
        raster = read_raster(path)
        assert (
            raster.dtype == "uint16" and raster.nodata == 0 and np.array_equal(raster.data, tiles[i].astype(np.float32))
        )
    dataset = packed.PackedDataset(
        out / "train_40.json", raster=raster_options.RasterOptions(13, None, None, [1.0] * 13)
    )
    for index, i in enumerate(order):
        pixels, label = dataset[index]
        assert pixels.dtype == torch.uint16 and np.array_equal(pixels.numpy(), tiles[i]) and label == i % 2
    stored = np.fromfile(out / "train_40.u16", np.uint16).reshape(4, 13, 40, 40)  # band-first on disk
    assert meta["layout"] == "CHW" and np.array_equal(stored, np.stack([tiles[i] for i in order]))
    message = None
    try:
        datasets.build_dataset(out / "train_40.json")
    except datasets.DataError as e:
        message = str(e)
    assert message and "13 band(s) of uint16" in message and "--in_chans 13" in message


def test_raster_resizing_leaves_nodata_out_of_the_interpolation(tmp_path):
    import tifffile

    from util.data.images import read_raster

    (tmp_path / "raw").mkdir()
    tile = np.full((2, 64, 64), 1000, np.uint16)
    tile[:, :32, :32] = 0
    tifffile.imwrite(tmp_path / "raw" / "a.tif", tile, photometric="minisblack")
    result = preprocess(
        "--input", tmp_path / "raw", "--output", tmp_path / "pre", "--size", "16", "--raster", "--nodata", "0"
    )
    assert result.returncode == 0, result.stderr
    raster = read_raster(next((tmp_path / "pre" / "raw_16").iterdir()))
    assert raster.data.shape == (2, 16, 16) and raster.mask is not None
    assert raster.mask[:8, :8].all() and not raster.mask[8:, :].any()
    assert (raster.data[:, ~raster.mask] == 1000).all()  # the zeros never bled into the data


def test_packed_uint16_with_nodata_pretrains_with_the_validity_band(tmp_path):
    write_uint16_tiles(tmp_path / "raw", count=8, bands=4)
    out = tmp_path / "pre"
    assert (
        preprocess(
            "--input",
            tmp_path / "raw",
            "--output",
            out,
            "--size",
            "40",
            "--raster",
            "--nodata",
            "0",
            "--pack",
            "--split",
            "train",
        ).returncode
        == 0
    )
    packed = datasets.build_dataset(
        out / "train_40.json", bands=bands_of(in_chans=4, mean=[30000.0] * 4, std=[17000.0] * 4)
    )
    augment = transforms.BatchAugment(40, [30000.0] * 4, [17000.0] * 4, value_scale=1.0, nodata=packed.nodata)
    torch.manual_seed(0)
    with torch.no_grad():
        batch = augment(torch.stack([packed[i][0] for i in range(4)]))
    images, valid = engine_pretrain.split_valid(batch, 4)
    assert images.shape == (4, 4, 40, 40) and valid.shape == (4, 1, 40, 40)
    assert 0 < valid.mean() < 1 and valid.min() >= 0 and valid.max() <= 1
    assert images[valid.expand_as(images) == 0].abs().max() < 1e-4  # no-data filled with the mean: 0 once normalised
    argv = [
        "--model",
        "mae_vit_tiny",
        "--input_size",
        "32",
        "--patch_size",
        "8",
        "--batch_size",
        "4",
        "--epochs",
        "1",
        "--num_workers",
        "0",
        "--in_chans",
        "4",
        "--mean",
        *["30000"] * 4,
        "--std",
        *["17000"] * 4,
        "--train_path",
        str(out / "train_40.json"),
        "--output_dir",
        str(tmp_path / "run"),
    ]
    main_pretrain.main(config.parse_args(main_pretrain.get_args_parser(), argv))
    assert (tmp_path / "run" / "checkpoint-last.pth").exists()


def test_nan_nodata_does_not_spread_into_valid_pixels_when_resized(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    from preprocess import resize_raster

    from util.data.images import read_raster

    data = np.random.default_rng(0).normal(0.1, 0.05, (2, 40, 40)).astype(np.float32)
    data[:, 10:14, 10:14] = np.nan
    np.save(tmp_path / "nan.npy", data)
    np.save(tmp_path / "fill.npy", np.where(np.isnan(data), -9999, data).astype(np.float32))
    with_nan, _ = resize_raster(read_raster(tmp_path / "nan.npy", nodata=float("nan")), 16)
    with_fill, _ = resize_raster(read_raster(tmp_path / "fill.npy", nodata=-9999), 16)
    np.testing.assert_array_equal(np.where(np.isnan(with_nan), -9999, with_nan), with_fill)
    assert 0 < np.isnan(with_nan).sum() <= 8


def test_repacking_never_leaves_an_earlier_description_beside_the_new_array(tmp_path, monkeypatch):
    """An earlier run's band-last array and JSON (no layout key), re-packed band-first; the new JSON cannot be written
    (a full disk): the old JSON must not describe the new array (the same byte count: read transposed, exit 0)."""
    from tools import preprocess as tool

    for i in range(2):
        make_image(i, seed=i, size=8).save(tmp_path / f"{i}.png")
    rows = [(0, "0.png"), (1, "1.png")]
    stem = tmp_path / "out" / "x_8"
    stem.parent.mkdir()
    tool.pack(rows, tmp_path, 8, stem)
    meta = json.loads(stem.with_suffix(".json").read_text())
    meta.pop("layout")  # as written before the layout key, over band-last pixels of the same size
    stem.with_suffix(".json").write_text(json.dumps(meta))

    def full_disk(path, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tool, "write_atomically", full_disk)
    try:
        tool.pack(rows, tmp_path, 8, stem)
    except OSError:
        pass
    assert stem.with_suffix(".u8").exists() and not stem.with_suffix(".json").exists()
