"""tools/band_stats.py: statistics equal numpy's, whatever the worker count, and an interrupted run resumes exactly."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import HANG_GUARD_S, REPO

from tools import band_stats as bs
from util.run.process import run_entry_point

NODATA = 7


def write_tiles(folder: Path, dtype, count: int = 6, bands: int = 3) -> list[Path]:
    """``count`` [bands, 16, 16] tiles of ``dtype`` with offsets (large for uint16) and a no-data corner in two."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        if dtype == np.uint16:
            tile = rng.integers(20000, 20000 + 3000 * (i + 1), (bands, 16, 16)).astype(np.uint16)
        else:
            tile = (rng.normal(0.2, 0.05 * (i + 1), (bands, 16, 16)) + 1000).astype(np.float32)
        if i % 3 == 1:
            tile[:, :5, :4] = NODATA
            tile[1, 10, 10] = NODATA  # no-data in one band drops the pixel in every band
        paths.append(folder / f"t{i}.tif")
        tifffile.imwrite(paths[-1], tile, photometric="minisblack")
    return paths


def numpy_values(paths: list[Path]) -> np.ndarray:
    values = np.concatenate([tifffile.imread(p).reshape(3, -1).astype(np.float64) for p in paths], 1)
    return values[:, (values != NODATA).all(0)]


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_statistics_equal_numpy_with_nodata_masked(tmp_path, dtype):
    paths = write_tiles(tmp_path / "tiles", dtype)
    stats = bs.band_stats(paths, nodata=NODATA, chunk=4)
    values = numpy_values(paths)
    assert stats["pixels"] == values.shape[1] < 6 * 256 and stats["dtype"] == np.dtype(dtype).name
    np.testing.assert_allclose(stats["mean"], values.mean(1), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], values.std(1), rtol=1e-9)
    np.testing.assert_array_equal(stats["min"], values.min(1))
    for p in bs.PERCENTILES:
        expected = np.percentile(values, p, axis=1)
        if dtype == np.uint16:  # exact (but for the rounding of the interpolation between two ranks)
            np.testing.assert_allclose(stats["percentiles"][f"{p:g}"], expected, rtol=1e-14)
        else:  # within one bin of the documented histogram
            width = (values.max(1) - values.min(1)) / bs.FLOAT_BINS
            assert (np.abs(np.array(stats["percentiles"][f"{p:g}"]) - expected) <= width).all()


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_two_workers_give_the_same_numbers_as_one(tmp_path, dtype):
    paths = write_tiles(tmp_path / "tiles", dtype, count=7)
    assert bs.band_stats(paths, nodata=NODATA, workers=2, chunk=2) == bs.band_stats(
        paths, nodata=NODATA, workers=1, chunk=2
    )


def counting_reader(monkeypatch, stop_at: int | None = None) -> list:
    """Replace band_stats' reader by one that records each read and raises KeyboardInterrupt at read ``stop_at``."""
    reads, real = [], bs.read_raster

    def read(path, *args):
        reads.append(path)
        if len(reads) == stop_at:
            raise KeyboardInterrupt
        return real(path, *args)

    monkeypatch.setattr(bs, "read_raster", read)
    return reads


@pytest.mark.parametrize(
    "dtype, stop_at, resumed_reads",
    [
        (np.uint16, 5, 4),  # 8 files in chunks of 2: two chunks saved, four files left
        (np.float32, 5, 4 + 8),  # in the first pass; then the whole histogram pass
        (np.float32, 11, 6),  # in the histogram pass, whose first chunk was saved: the first pass is not redone
    ],
)
def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch, dtype, stop_at, resumed_reads):
    paths = write_tiles(tmp_path / "tiles", dtype, count=8)
    expected = bs.band_stats(paths, nodata=NODATA, chunk=2)
    state = tmp_path / "stats.json.partial.npz"
    counting_reader(monkeypatch, stop_at)
    with pytest.raises(KeyboardInterrupt):
        bs.band_stats(paths, nodata=NODATA, chunk=2, state_path=state)
    assert state.exists()
    reads = counting_reader(monkeypatch)
    assert bs.band_stats(paths, nodata=NODATA, chunk=2, state_path=state) == expected
    assert len(reads) == resumed_reads and not state.exists()


def test_a_state_of_other_inputs_is_not_resumed(tmp_path, monkeypatch):
    paths = write_tiles(tmp_path / "tiles", np.uint16, count=6)
    state = tmp_path / "stats.json.partial.npz"
    counting_reader(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        bs.band_stats(paths, nodata=NODATA, chunk=2, state_path=state)
    tifffile.imwrite(paths[0], np.full((3, 16, 16), 60000, np.uint16), photometric="minisblack")  # a file already read
    reads = counting_reader(monkeypatch)
    assert bs.band_stats(paths, nodata=NODATA, chunk=2, state_path=state) == bs.band_stats(
        paths, nodata=NODATA, chunk=2
    )
    assert len(reads) == 2 * 6  # the interrupted run's state was dropped: all six files read, twice
    counting_reader(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        bs.band_stats(paths, nodata=NODATA, chunk=2, state_path=state)
    reads = counting_reader(monkeypatch)
    bs.band_stats(paths, nodata=NODATA + 1, chunk=2, state_path=state)  # other flags
    assert len(reads) == 6


def test_a_nodata_only_dataset_is_a_one_line_error(tmp_path):
    folder = tmp_path / "tiles"
    folder.mkdir()
    for i in range(2):
        tifffile.imwrite(folder / f"t{i}.tif", np.full((2, 8, 8), NODATA, np.uint16), photometric="minisblack")
    with pytest.raises(SystemExit) as info:
        run_entry_point(
            bs.main,
            ["--train_path", str(folder), "--nodata", str(NODATA), "--out", str(tmp_path / "s.json"), "--workers", "2"],
        )
    assert str(info.value) == "error: every pixel of the 2 image(s) is no-data: no statistics"
    assert not (tmp_path / "s.json").exists()


def test_the_command_line_writes_the_json_and_removes_its_state(tmp_path):
    paths = write_tiles(tmp_path / "tiles", np.uint16, count=3)
    bs.main(
        [
            "--train_path",
            str(tmp_path / "tiles"),
            "--nodata",
            str(NODATA),
            "--percentiles",
            "5",
            "95",
            "--chunk",
            "1",
            "--out",
            str(tmp_path / "s.json"),
        ]
    )
    stats = json.loads((tmp_path / "s.json").read_text())
    assert set(stats) >= {"bands", "mean", "std", "dtype", "pixels", "percentiles"} and set(stats["percentiles"]) == {
        "5",
        "95",
    }
    np.testing.assert_allclose(stats["percentiles"]["95"], np.percentile(numpy_values(paths), 95, axis=1), rtol=1e-14)
    assert not (tmp_path / "s.json.partial.npz").exists()


def test_the_committed_multispectral_sample():
    """data/sentinel2_ms: 225 tiles of 13 x 64 x 64 uint16 (headers only), the RGB sample's tiles and labels."""
    ms, rgb = REPO / "data" / "sentinel2_ms", REPO / "data" / "sentinel2_rgb"
    tiles = sorted((ms / "images").glob("*.tif"))
    assert len(tiles) == 225
    for path in tiles:
        with tifffile.TiffFile(path) as tif:
            assert tif.series[0].shape == (13, 64, 64) and tif.series[0].dtype == np.uint16
    for split in ("train", "val"):
        table = [
            [(row[0], Path(row[1]).stem) for row in csv.reader(open(folder / f"{split}.csv"))] for folder in (ms, rgb)
        ]
        assert table[0] == table[1]
    assert len(json.loads((ms / "band_stats.json").read_text())["mean"]) == 13


def test_nan_pixels_give_an_error_not_nan_statistics_and_nodata_nan_excludes_them(tmp_path):
    data = np.random.default_rng(0).normal(0, 1, (2, 8, 8)).astype(np.float32)
    data[:, 1, 1] = np.nan
    tifffile.imwrite(tmp_path / "a.tif", data, photometric="minisblack")
    with pytest.raises(SystemExit, match=r"a.tif: 1 pixel\(s\) with NaN"):
        run_entry_point(bs.main, ["--train_path", str(tmp_path), "--out", str(tmp_path / "s.json")])
    run_entry_point(bs.main, ["--train_path", str(tmp_path), "--out", str(tmp_path / "s.json"), "--nodata", "nan"])
    stats = json.loads((tmp_path / "s.json").read_text())
    valid = data.reshape(2, -1)[:, ~np.isnan(data[0]).ravel()]
    np.testing.assert_allclose(stats["mean"], valid.mean(1), rtol=1e-6)
    assert stats["pixels"] == 63


def corrupt_done(state: Path) -> None:
    with np.load(state) as saved:
        arrays = {k: saved[k] for k in saved.files}
    arrays["moments.done"] = np.array(99)  # more files than there are: would skip the rest
    np.savez(state, **arrays)


def corrupt_count(state: Path) -> None:
    with np.load(state) as saved:
        arrays = {k: saved[k] for k in saved.files}
    arrays["moments.count"] = np.array(-5)
    np.savez(state, **arrays)


def corrupt_hist(state: Path) -> None:
    with np.load(state) as saved:
        arrays = {k: saved[k] for k in saved.files}
    arrays["moments.hist"] = np.zeros((3, 7), np.int64)
    np.savez(state, **arrays)


def flip_a_byte(state: Path) -> None:
    data = bytearray(state.read_bytes())
    data[len(data) // 3] ^= 0xFF  # the zip's CRC no longer matches
    state.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "corrupt",
    [corrupt_done, corrupt_count, corrupt_hist, flip_a_byte, lambda state: state.write_bytes(state.read_bytes()[:200])],
)
def test_a_damaged_state_starts_over_instead_of_resuming_to_wrong_numbers(tmp_path, monkeypatch, capsys, corrupt):
    paths = write_tiles(tmp_path / "tiles", np.uint16, count=6)
    expected = bs.band_stats(paths, nodata=NODATA, chunk=2)
    state = tmp_path / "stats.json.partial.npz"
    counting_reader(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        bs.band_stats(paths, nodata=NODATA, chunk=2, state_path=state)
    corrupt(state)
    reads = counting_reader(monkeypatch)
    assert bs.band_stats(paths, nodata=NODATA, chunk=2, state_path=state) == expected
    assert len(reads) == 6 and "starting over" in capsys.readouterr().out


def test_an_unreadable_file_read_by_a_worker_process_is_a_one_line_error_not_a_hang(tmp_path):
    import subprocess
    import sys

    paths = write_tiles(tmp_path / "tiles", np.uint16, count=4)
    paths[2].write_bytes(b"II*\x00garbage")  # a TIFF header and nothing else
    # the worker's error could not be unpickled in the parent, whose pool then waited forever
    done = subprocess.run(
        [
            sys.executable,
            "tools/band_stats.py",
            "--train_path",
            str(tmp_path / "tiles"),
            "--out",
            str(tmp_path / "s.json"),
            "--workers",
            "2",
            "--chunk",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert done.returncode == 1 and done.stderr.startswith("error: ") and "t2.tif: cannot read image" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_image_errors_survive_pickling():
    import pickle

    from util.data.images import BadImageError, NotEightBitError

    for error in (BadImageError("a.tif", "truncated"), NotEightBitError("b.png", "PIL mode I;16")):
        copy = pickle.loads(pickle.dumps(error))
        assert (
            type(copy) is type(error)
            and str(copy) == str(error)
            and (copy.path, copy.reason) == (error.path, error.reason)
        )


def test_a_packed_array_or_shard_manifest_is_refused_in_one_line(tmp_path):
    """band_stats.py (and preprocess.py --raster) read image files: a pre-decoded dataset is named, not a traceback."""
    import subprocess
    import sys

    (tmp_path / "x.json").write_text(json.dumps({"size": 4, "count": 1, "labels": [0], "array": "x.u8"}))
    (tmp_path / "x.u8").write_bytes(bytes(48))
    for tool in (
        ["tools/band_stats.py", "--train_path", str(tmp_path / "x.json"), "--out", str(tmp_path / "s.json")],
        ["tools/preprocess.py", "--input", str(tmp_path / "x.json"), "--output", str(tmp_path / "o"), "--raster"],
    ):
        result = subprocess.run([sys.executable, *tool], cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert result.returncode == 1 and result.stderr.startswith(
            f"error: {tmp_path / 'x.json'}: a pre-decoded dataset"
        )
        assert result.stderr.count("\n") == 1


def test_band_stats_records_band_names_that_exports_of_its_runs_use(tmp_path, capsys):
    from util.weights import metadata

    write_tiles(tmp_path / "tiles", np.uint16, count=2)
    out = tmp_path / "stats.json"
    bs.main(
        [
            "--train_path",
            str(tmp_path / "tiles"),
            "--bands",
            "2",
            "1",
            "0",
            "--band_names",
            "B04",
            "B03",
            "B02",
            "--out",
            str(out),
        ]
    )
    stats = json.loads(out.read_text())
    assert stats["bands"] == [2, 1, 0] and stats["band_names"] == ["B04", "B03", "B02"]
    assert (
        capsys.readouterr()
        .out.rstrip()
        .endswith(f"use --band_stats {out} --bands 2 1 0 --in_chans 3 --rgb_bands 0 1 2")
    )
    assert metadata.band_names_from_stats(out, [2, 1]) == ["B04", "B03"]  # a run's --bands 2 1
    block = metadata.describe(
        {"bands": [2, 1], "band_stats": str(out), "mean": [1, 1], "std": [2, 2]},
        in_chans=2,
        input_size=32,
        patch_size=8,
        final_norm_trained=False,
        sincos_pos_embed=True,
    )
    assert [b["name"] for b in block["bands"]] == ["B04", "B03"] and block["input"]["dtype"] == "uint16"
    with pytest.raises(SystemExit, match="^error: --band_names names 2 band\\(s\\), --bands reads 3$"):
        run_entry_point(
            bs.main,
            [
                "--train_path",
                str(tmp_path / "tiles"),
                "--bands",
                "2",
                "1",
                "0",
                "--band_names",
                "B04",
                "B03",
                "--out",
                str(out),
            ],
        )


@pytest.mark.parametrize(
    "names, expected",
    [
        (["B02", "B03", "B04", "B08"], [2, 1, 0]),  # Sentinel-2 order on disk: --rgb_bands 2 1 0
        (["b8", "b4", "b3", "b2"], [1, 2, 3]),
        (["nir", "red", "green", "blue"], [1, 2, 3]),
        (["B02", "B03", "B08"], None),  # no red: no suggestion
        ([], None),
    ],
)
def test_band_names_make_rgb_bands_a_lookup(names, expected):
    assert bs.rgb_bands(names) == expected
