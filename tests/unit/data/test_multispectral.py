"""Multispectral and 16-bit imagery: readers, band statistics, normalisation, pretraining with --in_chans 4 / 13."""

import json

import numpy as np
import pytest
import tifffile
import torch
from conftest import TINY_ONE_EPOCH, bands_of, run_expecting_error
from PIL import Image

import main_pretrain
from util import config
from util.data.datasets import DataError
from util.data.images import NotEightBitError, load_image, read_raster
from util.data.raster_options import RasterOptions
from util.data.transforms import build_raster_transform
from util.run.process import run_entry_point


def raster(bands: int, dtype=np.uint16, size: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(0.1, 0.05, (bands, size, size)).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -3000), min(info.max, 5000), (bands, size, size)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
@pytest.mark.parametrize("bands", [1, 3, 13])
def test_tiff_and_npy_round_trip_every_dtype(tmp_path, dtype, bands):
    data = raster(bands, dtype)
    tifffile.imwrite(tmp_path / "a.tif", data, photometric="minisblack")
    np.save(tmp_path / "a.npy", data)
    for name in ("a.tif", "a.npy"):
        result = read_raster(tmp_path / name)
        assert result.data.dtype == np.float32 and result.dtype == np.dtype(dtype).name and result.mask is None
        np.testing.assert_array_equal(result.data, data.astype(np.float32))


def test_jpeg2000_round_trips_16_bit_and_8_bit_rgb(tmp_path):
    """JPEG 2000 (Pillow / OpenJPEG, lossless by default): a 16-bit band keeps its values on the raster path and is
    refused on the 8-bit RGB path; 8-bit RGB reads band-first."""
    grey = raster(1, np.uint16)[0]
    Image.fromarray(grey).save(tmp_path / "b08.jp2")
    result = read_raster(tmp_path / "b08.jp2")
    assert result.dtype == "uint16" and result.data.shape == (1, 40, 40)
    np.testing.assert_array_equal(result.data[0], grey.astype(np.float32))
    with pytest.raises(NotEightBitError):
        load_image(str(tmp_path / "b08.jp2"))
    rgb = raster(3, np.uint8)
    Image.fromarray(np.moveaxis(rgb, 0, -1)).save(tmp_path / "rgb.jp2")
    np.testing.assert_array_equal(read_raster(tmp_path / "rgb.jp2").data, rgb.astype(np.float32))


def test_interleaved_tiff_and_png_jpeg_read_band_first(tmp_path):
    data = raster(4, np.uint16)
    tifffile.imwrite(tmp_path / "rgbn.tif", np.moveaxis(data, 0, -1), photometric="minisblack", planarconfig="contig")
    np.testing.assert_array_equal(read_raster(tmp_path / "rgbn.tif").data, data)
    rgb = raster(3, np.uint8)
    Image.fromarray(np.moveaxis(rgb, 0, -1)).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_raster(tmp_path / "rgb.png").data, rgb)
    Image.fromarray(np.moveaxis(rgb, 0, -1)).save(tmp_path / "rgb.jpg")
    jpeg = read_raster(tmp_path / "rgb.jpg")
    assert jpeg.data.shape == (3, 40, 40) and jpeg.dtype == "uint8"
    sixteen = raster(1, np.uint16)[0]
    Image.fromarray(sixteen).save(tmp_path / "grey16.png")
    np.testing.assert_array_equal(read_raster(tmp_path / "grey16.png").data[0], sixteen)


def test_nodata_from_flag_and_gdal_tag_is_masked(tmp_path):
    data = raster(3, np.uint16) + 1  # no zero but those set below
    data[:, :5, :5] = 0
    data[1, 10, 10] = 0  # one band enough
    tifffile.imwrite(tmp_path / "tagged.tif", data, photometric="minisblack", extratags=[(42113, "s", 0, "0", True)])
    np.save(tmp_path / "plain.npy", data)
    for result in (read_raster(tmp_path / "tagged.tif"), read_raster(tmp_path / "plain.npy", nodata=0)):
        assert result.mask.sum() == 26 and result.mask[:5, :5].all() and result.mask[10, 10]
    assert read_raster(tmp_path / "plain.npy").mask is None


def test_band_selection_and_bad_index_is_one_line(tmp_path):
    data = raster(13, np.uint16)
    tifffile.imwrite(tmp_path / "s2.tif", data, photometric="minisblack")
    np.testing.assert_array_equal(read_raster(tmp_path / "s2.tif", bands=[3, 2, 1, 7]).data, data[[3, 2, 1, 7]])
    with pytest.raises(DataError) as info:
        read_raster(tmp_path / "s2.tif", bands=[3, 13])
    assert "s2.tif" in str(info.value) and "13 band(s)" in str(info.value) and "\n" not in str(info.value)


def test_band_stats_equals_numpy(tmp_path):
    from tools.band_stats import main as band_stats_main

    tiles = [raster(4, np.uint16, seed=s) + 30000 for s in range(3)]
    tiles[1][:, :7, :] = 7
    for i, tile in enumerate(tiles):
        tifffile.imwrite(tmp_path / f"t{i}.tif", tile, photometric="minisblack")
    band_stats_main(
        ["--train_path", str(tmp_path), "--nodata", "7", "--bands", "2", "0", "--out", str(tmp_path / "s.json")]
    )
    stats = json.loads((tmp_path / "s.json").read_text())
    values = np.concatenate([t[[2, 0]].reshape(2, -1).astype(np.float64) for t in tiles], 1)
    values = values[:, (values != 7).all(0)]
    assert stats["bands"] == [2, 0] and stats["dtype"] == "uint16"
    np.testing.assert_allclose(stats["mean"], values.mean(1), rtol=1e-10)
    np.testing.assert_allclose(stats["std"], values.std(1), rtol=1e-7)


def test_one_band_and_three_band_uint16_follow_the_same_rule(tmp_path):
    three = raster(3, np.uint16)
    tifffile.imwrite(tmp_path / "three.tif", three, photometric="minisblack")
    Image.fromarray(three[0]).save(tmp_path / "one.png")
    for name in ("three.tif", "one.png"):  # the 8-bit path: refused alike, naming the tool
        with pytest.raises(NotEightBitError, match="tools/band_stats.py"):
            load_image(str(tmp_path / name))
    outputs = {}
    for name, bands in (("three.tif", 3), ("one.png", 1)):  # the raster path: (x - mean) / std in the file's units
        tensor = RasterOptions(bands, None, None, [1000.0] * bands).load(str(tmp_path / name), name)
        torch.testing.assert_close(tensor, torch.from_numpy(three[:bands].astype(np.float32)))
        outputs[name] = build_raster_transform(False, 32, [1000.0] * bands, [500.0] * bands)(tensor)
    torch.testing.assert_close(outputs["one.png"][0], outputs["three.tif"][0])
    assert abs(outputs["one.png"].mean().item() - (three[0].mean() - 1000) / 500) < 0.2  # not stretched, not near 0


def write_tiles(folder, bands, count=4, nodata_corner=False):
    folder.mkdir()
    for i in range(count):
        tile = raster(bands, np.uint16, seed=i)
        if nodata_corner:
            tile[:, :4, :4] = 0
        tifffile.imwrite(folder / f"tile{i}.tif", tile, photometric="minisblack")
    return folder


@pytest.mark.parametrize("bands", [4, 13])
def test_pretrain_one_epoch_on_multispectral_tiffs(tmp_path, bands):
    tiles = write_tiles(tmp_path / "tiles", bands, nodata_corner=True)
    from tools.band_stats import main as band_stats_main

    band_stats_main(["--train_path", str(tiles), "--nodata", "0", "--out", str(tmp_path / "stats.json")])
    out = tmp_path / "out"
    main_pretrain.main(
        config.parse_args(
            main_pretrain.get_args_parser(),
            [
                *TINY_ONE_EPOCH,
                "--in_chans",
                str(bands),
                "--band_stats",
                str(tmp_path / "stats.json"),
                "--nodata",
                "0",
                "--train_path",
                str(tiles),
                "--output_dir",
                str(out),
            ],
        )
    )
    assert (out / "checkpoint-last.pth").exists()
    assert (out / "plots" / "reconstruction_epoch0000.png").exists()


def test_pretrain_with_selected_bands(tmp_path):
    tiles = write_tiles(tmp_path / "tiles", 13)
    main_pretrain.main(
        config.parse_args(
            main_pretrain.get_args_parser(),
            [
                *TINY_ONE_EPOCH,
                "--in_chans",
                "1",
                "--bands",
                "7",
                "--mean",
                "1000",
                "--std",
                "500",
                "--train_path",
                str(tiles),
                "--output_dir",
                str(tmp_path / "out"),
            ],
        )
    )
    assert (tmp_path / "out" / "checkpoint-last.pth").exists()


def test_one_line_errors(tmp_path):
    tiles = write_tiles(tmp_path / "tiles", 4)
    base = [*TINY_ONE_EPOCH, "--train_path", str(tiles), "--output_dir", str(tmp_path / "out")]
    assert "tools/band_stats.py" in run_expecting_error([*base, "--in_chans", "4"])
    assert "--mean has 3 value(s) but --in_chans is 4" in run_expecting_error(
        [*base, "--in_chans", "4", "--mean", "1", "2", "3", "--std", "1", "1", "1", "1"]
    )
    (tmp_path / "s.json").write_text(json.dumps({"bands": [0, 1], "mean": [1, 2], "std": [1, 1], "dtype": "uint16"}))
    assert "--band_stats" in run_expecting_error([*base, "--in_chans", "4", "--band_stats", str(tmp_path / "s.json")])
    message = run_expecting_error(
        [*base, "--in_chans", "2", "--bands", "1", "9", "--mean", "1", "1", "--std", "1", "1"]
    )
    assert "tile0.tif" in message and "4 band(s)" in message
    assert "tools/band_stats.py" in run_expecting_error(base)  # 16-bit on the 8-bit path
    empty = tmp_path / "empty"
    empty.mkdir()
    tifffile.imwrite(empty / "void.tif", np.zeros((4, 40, 40), np.uint16), photometric="minisblack")
    tifffile.imwrite(empty / "ok.tif", raster(4, np.uint16), photometric="minisblack")
    assert "every pixel is no-data" in run_expecting_error(
        [
            *TINY_ONE_EPOCH,
            "--batch_size",
            "2",
            "--train_path",
            str(empty),
            "--output_dir",
            str(tmp_path / "o2"),
            "--in_chans",
            "4",
            "--nodata",
            "0",
            "--mean",
            "1",
            "1",
            "1",
            "1",
            "--std",
            "1",
            "1",
            "1",
            "1",
        ]
    )


def labelled_tiles(root, bands, per_class=4):
    """An ImageFolder tree of two classes of uint16 tiles that differ in brightness (a learnable task)."""
    for label, name in enumerate(("dark", "bright")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            tile = raster(bands, np.uint16, seed=10 * label + i) // (4 - 3 * label)
            tifffile.imwrite(root / name / f"t{i}.tif", tile, photometric="minisblack")
    return root


@pytest.mark.parametrize("bands", [4, 13])
def test_finetune_linprobe_and_knn_on_multispectral_tiffs(tmp_path, bands):
    """--in_chans C through every downstream entry point: one epoch each from a C-band pretraining checkpoint."""
    import main_finetune
    import main_knn
    import main_linprobe

    tiles = labelled_tiles(tmp_path / "tiles", bands)
    stats = [*["--mean"] + ["1000"] * bands, *["--std"] + ["800"] * bands]
    pretrain = tmp_path / "pretrain"
    main_pretrain.main(
        config.parse_args(
            main_pretrain.get_args_parser(),
            [
                *TINY_ONE_EPOCH,
                "--in_chans",
                str(bands),
                *stats,
                "--train_path",
                str(tiles),
                "--output_dir",
                str(pretrain),
            ],
        )
    )
    checkpoint = str(pretrain / "checkpoint-last.pth")
    common = [
        "--finetune",
        checkpoint,
        "--input_size",
        "32",
        "--batch_size",
        "4",
        "--epochs",
        "1",
        "--num_workers",
        "0",
        "--amp",
        "none",
        "--in_chans",
        str(bands),
        *stats,
        "--train_path",
        str(tiles),
        "--test_path",
        str(tiles),
    ]
    for module, extra in ((main_finetune, ["--mixup", "0", "--cutmix", "0"]), (main_linprobe, [])):
        out = tmp_path / module.__name__
        module.main(config.parse_args(module.get_args_parser(), [*common, *extra, "--output_dir", str(out)]))
        log = (out / "log.txt").read_text()
        assert '"test_acc1"' in log
    main_knn.main(
        config.parse_args(
            main_knn.get_args_parser(),
            [
                "--checkpoints",
                checkpoint,
                "--in_chans",
                str(bands),
                *stats,
                "--train_path",
                str(tiles),
                "--test_path",
                str(tiles),
                "--batch_size",
                "4",
                "--num_workers",
                "0",
                "--amp",
                "none",
                "--scales",
                "0.5",
                "1.0",
                "--output_dir",
                str(tmp_path / "knn"),
            ],
        )
    )
    rows = (tmp_path / "knn" / "knn_results.csv").read_text().splitlines()
    full = [r for r in rows if ",1.0," in r]
    assert len(full) == 2  # weighted and majority at scale 1
    # kNN with the memory set as queries: every tile finds itself, so full resolution is exact
    assert all(float(r.split(",")[-1]) == 100.0 for r in full)


def test_rgb_only_augmentations_are_refused_for_multispectral_data(tmp_path):
    import main_finetune

    tiles = labelled_tiles(tmp_path / "tiles", 4)
    argv = [
        "--model",
        "vit_tiny_patch16",
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
        "1",
        "1",
        "1",
        "1",
        "--std",
        "1",
        "1",
        "1",
        "1",
        "--train_path",
        str(tiles),
        "--test_path",
        str(tiles),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    for flag in (["--aa", "rand-m9-mstd0.5"], ["--color_jitter", "0.4"]):
        with pytest.raises(SystemExit) as info:
            run_entry_point(main_finetune.main, config.parse_args(main_finetune.get_args_parser(), [*argv, *flag]))
        message = str(info.value)
        assert message.startswith(f"error: {flag[0]}") and "RGB-only" in message and "\n" not in message


def test_float32_npy_with_nodata_is_filled_not_written_into_the_file(tmp_path):
    """A float32 .npy is memory-mapped read-only: filling its no-data pixels must work on a copy."""
    data = raster(2, np.float32)
    data[:, :3, :3] = -9999
    np.save(tmp_path / "a.npy", data)
    tensor = RasterOptions(2, None, -9999, [0.5, 0.5]).load(str(tmp_path / "a.npy"), "a.npy")
    assert (tensor[:, :3, :3] == 0.5).all() and torch.equal(tensor[:, 3:, 3:], torch.from_numpy(data[:, 3:, 3:]))
    assert (np.load(tmp_path / "a.npy")[:, :3, :3] == -9999).all()


def test_nan_or_inf_pixels_are_refused_naming_the_file_unless_nodata(tmp_path):
    data = raster(3, np.float32)
    data[:, 2, 5] = np.nan
    data[1, 7, 7] = np.inf
    tifffile.imwrite(tmp_path / "f.tif", data, photometric="minisblack")
    with pytest.raises(DataError) as info:
        read_raster(tmp_path / "f.tif")
    assert "f.tif: 2 pixel(s)" in str(info.value) and "--nodata nan" in str(info.value)
    with pytest.raises(DataError, match="1 pixel"):  # the infinite one is not no-data
        read_raster(tmp_path / "f.tif", nodata=float("nan"))
    data[1, 7, 7] = 0
    tifffile.imwrite(tmp_path / "f.tif", data, photometric="minisblack")
    assert read_raster(tmp_path / "f.tif", nodata=float("nan")).mask.sum() == 1


@pytest.mark.parametrize(
    "stats",
    [
        '{"mean": [NaN, 1], "std": [1, 1]}',
        '{"mean": [1, 1], "std": [1, Infinity]}',
        '{"mean": [1, -Infinity], "std": [1, 1]}',
        '{"mean": [1, 1], "std": [1, NaN]}',
    ],
)
def test_band_stats_file_of_non_finite_statistics_is_refused(tmp_path, stats):
    (tmp_path / "s.json").write_text(stats)
    with pytest.raises(config.UsageError, match="s.json: mean must be finite"):
        config.read_band_stats(str(tmp_path / "s.json"), None, 2)


def test_infinite_mean_flag_is_refused():
    with pytest.raises(config.UsageError, match="--mean must be finite"):
        config.check_ranges(config.flags(mean=[0.0, float("inf")], std=[1.0, 1.0]))


def stats_args(stats_path, **flags):
    """The resolved ``Bands`` of 2 bands with ``--band_stats stats_path``."""
    return bands_of(**{"in_chans": 2, "band_stats": str(stats_path), **flags})


def test_files_of_another_sample_type_than_the_band_stats_are_refused(tmp_path):
    from util.data.raster_options import raster_options

    np.save(tmp_path / "u16.npy", raster(2, np.uint16))
    np.save(tmp_path / "f32.npy", raster(2, np.float32))
    stats = tmp_path / "s.json"
    stats.write_text(json.dumps({"mean": [1, 1], "std": [1, 1], "dtype": "uint16", "nodata": None}))
    options = raster_options(stats_args(stats))
    assert options.load(str(tmp_path / "u16.npy"), "u16.npy").shape == (2, 40, 40)
    with pytest.raises(
        DataError, match="f32.npy: float32 samples, but --band_stats .*s.json was computed on uint16 data"
    ):
        options.load(str(tmp_path / "f32.npy"), "f32.npy")


def test_a_nodata_value_other_than_the_band_stats_one_is_refused(tmp_path):
    from util.data.raster_options import raster_options

    np.save(tmp_path / "a.npy", raster(2, np.uint16) + 1)
    stats = tmp_path / "s.json"
    stats.write_text(json.dumps({"mean": [1, 1], "std": [1, 1], "dtype": "uint16", "nodata": 0}))
    with pytest.raises(config.UsageError, match="computed with --nodata 0, this run has --nodata 5"):
        stats_args(stats, nodata=5.0)
    with pytest.raises(
        DataError, match="a.npy: no-data None in force, but .* computed with --nodata 0: give --nodata 0"
    ):
        raster_options(stats_args(stats)).load(str(tmp_path / "a.npy"), "a.npy")
    raster_options(stats_args(stats, nodata=0.0)).load(str(tmp_path / "a.npy"), "a.npy")
    stats.write_text(json.dumps({"mean": [1, 1], "std": [1, 1], "dtype": "uint16", "nodata": None}))
    with pytest.raises(config.UsageError, match="computed with no --nodata"):
        stats_args(stats, nodata=0.0)
    stats.write_text(json.dumps({"mean": [1, 1], "std": [1, 1], "nodata": float("nan")}))
    stats_args(stats, nodata=float("nan"))  # NaN equals NaN


@pytest.mark.parametrize(
    "stats",
    [
        {"mean": [1, 2], "std": [1, 1], "bands": [0, 1, 2, 3]},
        {"mean": [1, 2], "std": [1], "bands": [0, 1]},
        {"mean": [1, 2], "std": [1, 1], "bands": [0, 0]},
    ],
)
def test_band_stats_file_whose_bands_and_statistics_disagree_is_refused(tmp_path, stats):
    (tmp_path / "s.json").write_text(json.dumps(stats))
    for bands in ([1, 0], None):
        with pytest.raises(config.UsageError, match="s.json: bands .* need as many means and stds"):
            config.read_band_stats(str(tmp_path / "s.json"), bands, 2)


def test_complex_or_text_samples_and_float64_beyond_float32_are_refused(tmp_path):
    from util.data.images import BadImageError

    np.save(tmp_path / "c.npy", np.ones((2, 8, 8), np.complex64))
    np.save(tmp_path / "s.npy", np.full((2, 8, 8), "ab"))
    np.save(tmp_path / "big.npy", np.full((2, 8, 8), 1e300))
    for name in ("c.npy", "s.npy"):
        with pytest.raises(BadImageError, match=f"{name}: cannot read image \\(samples of type .*: not real numbers"):
            read_raster(tmp_path / name)
    with pytest.raises(DataError, match="big.npy: 64 pixel.*beyond float32's range"):
        read_raster(tmp_path / "big.npy")
