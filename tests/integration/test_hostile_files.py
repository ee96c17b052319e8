"""Hostile files and file systems (issue 24): rasters that would exhaust memory or have no pixel, statistics that
cannot normalise, full and read-only disks under the tools and the entry points, cluster file systems without flock
or directory fsync, and messages that named the wrong cause. Each gives the right result or one ``error:`` line
naming the file / flag / value (exit status 1), with nothing left behind."""

from __future__ import annotations

import errno
import json
import os
import stat
import sys

import numpy as np
import pytest
import tifffile
import torch
from conftest import REPO, band_flags, bands_of, make_image, make_tree, write_csv_dataset
from PIL import Image

import main_finetune
import main_knn
import main_linprobe
import main_pretrain
import main_segment
from util import config, files
from util.data import datasets, images, shards
from util.errors import CheckpointError, DataError, UsageError
from util.run import checkpoint, process
from util.run.process import run_entry_point

sys.path.insert(0, str(REPO / "tools"))
import band_stats
import preprocess

REAL_OPEN = open


def one_line(call) -> str:
    """The ``error:`` line a CLI call ends with (exit status 1)."""
    with pytest.raises(SystemExit) as info:
        call()
    message = str(info.value)
    assert isinstance(info.value.code, str) and message.startswith("error: ") and "\n" not in message, message
    return message


# --- rasters -------------------------------------------------------------------------------------------------------


def test_the_bomb_guard_bounds_bands_x_pixels_x_bytes_before_decoding(tmp_path):
    """A 64-band 2000 x 2000 zlib TIFF is about a MB and 4 Mpx, far under --max_image_pixels; decoded it takes
    1.3 GB (band_stats peaked at 7.6 GB). Refused before decoding, by the TIFF, .npy and PIL readers, and by
    tools/band_stats.py in one line; 200 bands x 15000^2 too."""
    bomb = tmp_path / "bomb.tif"
    tile = np.zeros((256, 256), np.uint8)
    tifffile.imwrite(  # 64 planes of 8 x 8 tiles of zeros, written without the 256 MB array
        bomb,
        iter([tile] * 64 * 8 * 8),
        shape=(64, 2000, 2000),
        tile=(256, 256),
        dtype=np.uint8,
        compression="zlib",
        compressionargs={"level": 1},
        photometric="minisblack",
        planarconfig="separate",
    )
    assert bomb.stat().st_size < 2 * 2**20  # 1.3 MB (zlib level 1; the issue's, level 6: 552 KB)
    with pytest.raises(
        images.BadImageError, match=r"decoding its 64 band\(s\) of 2000 x 2000 pixels would take 1.3 GB"
    ):
        images.read_raster(bomb)
    huge = tmp_path / "huge.npy"  # only a header: 200 x 15000 x 15000 uint16 (90 GB)
    with open(huge, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<u2", "fortran_order": False, "shape": (200, 15000, 15000)})
    with pytest.raises(images.BadImageError, match=r"200 band\(s\) of 15000 x 15000 pixels would take 270.0 GB"):
        images.read_raster(huge)
    sixteen = tmp_path / "sixteen.png"  # PIL: 1 band of 2 bytes + its float32 copy = 6 bytes per pixel
    Image.fromarray(np.zeros((100, 100), np.uint16)).save(sixteen)
    with pytest.raises(images.BadImageError, match="would take"):
        images.read_raster(sixteen, max_pixels=12_000)  # 10000 px pass the pixel count, 60 kB > 48 kB do not
    assert images.read_raster(sixteen, max_pixels=15_000).data.shape == (1, 100, 100)
    with pytest.raises(images.BadImageError, match="would take"):
        images.load_image(str(sixteen), max_pixels=12_000, stretch=True)
    with pytest.raises(images.BadImageError, match="exceeds limit of 200 pixels"):
        images.load_image(str(sixteen), max_pixels=100, stretch=True)  # leaves PIL's process-wide limit at 100
    assert images.read_raster(sixteen, max_pixels=15_000).data.shape == (1, 100, 100)  # was: PIL's stale 100 px
    (tmp_path / "set").mkdir()
    os.replace(bomb, tmp_path / "set" / "bomb.tif")
    message = one_line(
        lambda: run_entry_point(
            band_stats.main, ["--train_path", str(tmp_path / "set"), "--out", str(tmp_path / "s.json")]
        )
    )
    assert "bomb.tif: cannot read image (decoding its 64 band(s)" in message and "--max_image_pixels" in message
    assert not list(tmp_path.glob("s.json*"))


def test_degenerate_rasters_are_refused_where_they_are_read(tmp_path):
    for shape in ((0, 16, 16), (3, 0, 16), (16, 0)):
        path = tmp_path / f"{'x'.join(map(str, shape))}.npy"
        np.save(path, np.zeros(shape, np.uint16))
        with pytest.raises(images.BadImageError, match="an empty image"):
            images.read_raster(path)
    (tmp_path / "set").mkdir()
    os.replace(tmp_path / "0x16x16.npy", tmp_path / "set" / "a.npy")
    message = one_line(
        lambda: run_entry_point(
            band_stats.main, ["--train_path", str(tmp_path / "set"), "--out", str(tmp_path / "s.json")]
        )
    )
    assert "a.npy: cannot read image (it declares 0 band(s) of 16 x 16 pixels: an empty image)" in message


def test_stretch_of_more_than_three_bands_needs_bands_to_choose_them(tmp_path):
    """13-band Sentinel-2 on the 8-bit path: --stretch took bands 0, 1, 2 (aerosol, blue, green) as RGB."""
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 4000, (13, 16, 16)).astype(np.uint16)
    path = tmp_path / "s2.tif"
    tifffile.imwrite(path, tile, photometric="minisblack", planarconfig="separate")
    with pytest.raises(images.NotEightBitError, match=r"13 band\(s\) of uint16: --stretch shows 3 bands as R G B"):
        images.load_image(str(path), stretch=True)
    chosen = np.asarray(images.load_image(str(path), stretch=True, bands=[3, 2, 1]))
    assert np.array_equal(chosen, np.asarray(images.stretch_to_rgb(tile[[3, 2, 1]].astype(np.float32))))
    bands = bands_of(stretch=True, bands=[3, 2, 1])  # the flags keep the 8-bit path: no --band_stats needed
    assert not bands.raster and bands.bands == (3, 2, 1)
    dataset = datasets.build_dataset(tmp_path, "folder", bands=bands)
    assert np.array_equal(np.asarray(dataset[0][0]), chosen)


def test_8_bit_tiffs_pil_cannot_identify_are_read_and_4_bands_not_rgb_are_refused_as_such(tmp_path):
    """GDAL-style 8-bit TIFFs: 3 bands not marked RGB in planes, planar RGBA: "cannot identify image file", a message
    that blamed the file. 4 bands not marked RGB (B G R NIR?) were that too; now the band-count refusal."""
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (4, 16, 16)).astype(np.uint8)
    for name, data, photometric, extra in (
        ("planes.tif", tile[:3], "minisblack", {}),
        ("rgba.tif", tile, "rgb", {"extrasamples": ["unspecified"]}),
    ):
        tifffile.imwrite(tmp_path / name, data, photometric=photometric, planarconfig="separate", **extra)
        rgb = np.asarray(images.load_image(str(tmp_path / name)))
        assert rgb.shape == (16, 16, 3) and np.array_equal(np.moveaxis(rgb, -1, 0), tile[:3])
    tifffile.imwrite(tmp_path / "bgrn.tif", tile, photometric="minisblack", planarconfig="separate")
    with pytest.raises(images.NotEightBitError, match=r"bgrn.tif: 4 band\(s\) of uint8: --stretch shows 3 bands as"):
        images.load_image(str(tmp_path / "bgrn.tif"), stretch=True)


@pytest.mark.parametrize("source", ["band_stats", "std"])
def test_statistics_that_cannot_normalise_are_refused_naming_the_band(tmp_path, source):
    if source == "band_stats":
        stats = tmp_path / "stats.json"
        stats.write_text(json.dumps({"mean": [900.0, 5.0, 700.0], "std": [100.0, 1e-30, 80.0], "bands": [2, 5, 7]}))
        flags = band_flags(in_chans=3, band_stats=str(stats), bands=[2, 5, 7])
        expected = f"--band_stats {stats}: band 5 has std 1e-30 (mean 5): too small to normalise by"
    else:
        flags = band_flags(in_chans=3, mean=[900.0, 5.0, 700.0], std=[100.0, 1e-30, 80.0], nodata=0.0)
        expected = "--std: band 1 has std 1e-30 (mean 5)"
    with pytest.raises(UsageError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        config.resolve_bands(flags)


@pytest.mark.parametrize("mean, std", [(1e300, 1.0), (5.0, 1e300)])
def test_statistics_beyond_float32_are_refused_naming_the_band(mean, std):
    """A std of 1e300 became inf in float32 (every input normalised to 0, exit 0); a mean of 1e300 was called "too
    small to normalise by (... multiplied by 1e+00)"."""
    flags = band_flags(in_chans=3, mean=[900.0, mean, 700.0], std=[100.0, std, 80.0], nodata=0.0)
    with pytest.raises(UsageError, match=r"--std: band 1 has mean .*: beyond float32's range \(3.4e\+38\)"):
        config.resolve_bands(flags)


# --- tools and full / read-only disks ------------------------------------------------------------------------------


@pytest.fixture
def small_csv(tmp_path):
    return write_csv_dataset(tmp_path / "data", 4, size=24)


def test_pack_onto_a_full_disk_is_one_line_and_leaves_nothing(small_csv, tmp_path, monkeypatch):
    """Was SIGBUS (exit 135, no error line) through np.memmap, with a partial train_24.u8.tmp left filling the disk:
    the space is reserved first (posix_fallocate), the array written without a map; a full disk is one line."""
    monkeypatch.setattr(np, "memmap", lambda *a, **k: pytest.fail("a memory map would SIGBUS on a full disk"))
    out = tmp_path / "out"

    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    message = one_line(
        lambda: preprocess.main(
            ["--input", str(small_csv), "--output", str(out), "--size", "24", "--pack", "--workers", "1"]
        )
    )
    assert message == f"error: --pack: cannot write {out / 'train_24.u8'}: No space left on device"
    assert not list(out.glob("*.tmp")) and not (out / "train_24.u8").exists() and not (out / "train_24.json").exists()

    def unsupported(fd, offset, length):  # a file system without fallocate: the writes report the full disk
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    real_open = open

    class FullFile:
        def __init__(self, path):
            self.file = real_open(path, "wb")

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.file, name)

    monkeypatch.setattr(
        preprocess,
        "open",
        lambda path, mode="r", **k: FullFile(path) if mode == "wb" else real_open(path, mode, **k),
        raising=False,
    )
    message = one_line(
        lambda: preprocess.main(
            ["--input", str(small_csv), "--output", str(out), "--size", "24", "--pack", "--workers", "1"]
        )
    )
    assert message.endswith("train_24.u8: No space left on device") and not list(out.glob("*.tmp"))
    monkeypatch.undo()
    preprocess.main(["--input", str(small_csv), "--output", str(out), "--size", "24", "--pack", "--workers", "1"])
    assert (out / "train_24.u8").stat().st_size == 4 * 24 * 24 * 3  # with room: written


def test_shards_onto_a_full_disk_leave_no_shard_behind(tmp_path, monkeypatch):
    real = files.write_atomically
    calls = []

    def fills_at_the_second(path, write):
        calls.append(path)
        if len(calls) == 2:
            raise CheckpointError(
                f"could not write {path}: No space left on device; the previous file, if any, is intact"
            )
        real(path, write)

    monkeypatch.setattr(shards, "write_atomically", fills_at_the_second)
    samples = [(f"{i:07d}", np.full((3, 8, 8), i, np.uint8), i % 2) for i in range(6)]
    manifest = tmp_path / "train_8.shards.json"
    with pytest.raises(CheckpointError, match="000001.tar: No space left on device"):
        shards.write_shards(iter(samples), 6, manifest, per_shard=2)
    assert not manifest.exists() and not (tmp_path / "train_8_shards").exists()


def test_output_inside_an_image_folder_input_is_left_out(tmp_path, capsys):
    """Run twice, --output inside the ImageFolder --input read its own output as a class 'out' (16 images, classes
    a b out)."""
    tree = make_tree(tmp_path / "tree", ["a", "b"], per_class=4)
    for _ in range(2):
        preprocess.main(["--input", str(tree), "--output", str(tree / "out"), "--size", "24", "--workers", "1"])
        rows = (tree / "out" / "tree_24.csv").read_text().splitlines()
        assert len(rows) == 1 + 8 and {r.split(",")[2] for r in rows[1:]} == {"a", "b"}
    assert f"note: {tree}: left out out/" in capsys.readouterr().out
    tree = make_tree(tmp_path / "same", ["a", "b"], per_class=4)
    for _ in range(2):  # --output the --input itself: its same_24/ was read as a third class (8 images, a b same_24)
        preprocess.main(["--input", str(tree), "--output", str(tree), "--size", "24", "--workers", "1"])
        rows = (tree / "same_24.csv").read_text().splitlines()
        assert len(rows) == 1 + 8 and {r.split(",")[2] for r in rows[1:]} == {"a", "b"}
    csv = tree / "same_24.csv"
    message = one_line(
        lambda: preprocess.main(["--input", str(csv), "--output", str(tree), "--split", "same", "--size", "24"])
    )
    assert message == f"error: --output {tree}: its same_24.csv would replace --input {csv}"


def test_band_stats_on_a_read_only_file_system_is_one_line(tmp_path, monkeypatch):
    np.save(tmp_path / "a.npy", np.arange(48, dtype=np.uint16).reshape(3, 4, 4))
    out = tmp_path / "ro" / "stats.json"
    out.parent.mkdir()
    real = files.tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):  # root ignores chmod: a read-only mount, as the kernel reports it
        if dir is not None and os.path.samefile(dir, out.parent):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    message = one_line(lambda: run_entry_point(band_stats.main, ["--train_path", str(tmp_path), "--out", str(out)]))
    assert message.startswith(f"error: could not write {out}.partial.npz: Read-only file system")
    assert list(out.parent.iterdir()) == []


class FullLock:
    """The output folder's lock file on a disk with no free byte: opening works, writing does not."""

    def __init__(self, path, mode):
        self.file = REAL_OPEN(path, mode)  # builtins.open is this test's

    def flush(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.file, name)


@pytest.mark.parametrize(
    "module", [main_pretrain, main_finetune, main_linprobe, main_knn, main_segment], ids=lambda m: m.__name__
)
def test_an_output_dir_without_a_free_byte_is_one_line_in_every_entry_point(small_csv, tmp_path, monkeypatch, module):
    real_open = open
    monkeypatch.setattr(
        "builtins.open",
        lambda path, mode="r", *a, **k: (
            FullLock(path, mode) if str(path).endswith(".lock") else real_open(path, mode, *a, **k)
        ),
    )
    out = tmp_path / "o"
    common = ["--output_dir", str(out), "--num_workers", "0", "--device", "cpu"]
    model = "--model vit_tiny_patch16 --input_size 32".split()
    labelled = ["--train_path", str(small_csv), "--test_path", str(small_csv)]
    argv = {
        main_pretrain: "--model mae_vit_tiny --input_size 32 --patch_size 8".split() + ["--train_path", str(small_csv)],
        main_finetune: model + labelled,
        main_linprobe: model + labelled,
        main_knn: ["--checkpoints", "none", *model, *labelled],
        main_segment: [*model, "--patch_size", "8"],
    }[module]
    message = one_line(lambda: run_entry_point(module.main, config.parse_args(module.get_args_parser(), argv + common)))
    assert message == f"error: --output_dir {out}: cannot write into it (No space left on device)"


def test_a_checkpoint_write_that_fills_the_disk_says_no_space_left(tmp_path, monkeypatch):
    """torch.save to a path reports a full disk as "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs
    0"; checkpoints are saved through a file object (OSError ENOSPC), and any writer's opaque error on a disk with no
    free byte reads "No space left on device"."""
    path = tmp_path / "checkpoint-last.pth"
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        f.write(b"PK")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=f"could not write {path}: No space left on device; the previous"):
        checkpoint.save_checkpoint({"epoch": 0}, path)
    monkeypatch.setattr(torch, "save", real_save)

    def opaque(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(os, "statvfs", lambda folder: os.statvfs_result((4096,) * 4 + (0,) * 6))  # f_bavail 0
    with pytest.raises(CheckpointError, match=r"No space left on device \(\[enforce fail at inline_container"):
        files.write_atomically(path, opaque)
    assert list(tmp_path.iterdir()) == []


# --- cluster file systems ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP])
def test_a_file_system_without_flock_warns_and_the_run_goes_on(tmp_path, monkeypatch, capsys, code):
    """Lustre mounted without -o flock (ENOSYS), NFS without a lock daemon (ENOLCK): every run was refused as "in use
    by another run (unknown process)"."""
    import fcntl

    def no_locks(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    process.prepare_output_dir(tmp_path / "o")
    try:
        assert "its file system cannot lock files" in capsys.readouterr().err
        assert "pid " in (tmp_path / "o" / ".lock").read_text()
    finally:
        process.release_output_dirs()


@pytest.mark.parametrize("code", [errno.EWOULDBLOCK, errno.EACCES])
def test_a_lock_held_by_another_process_is_still_refused(tmp_path, monkeypatch, code):
    import fcntl

    def held(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", held)
    with pytest.raises(UsageError, match="is in use by another run"):
        process.prepare_output_dir(tmp_path / "o")


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP, errno.EBADF])
def test_a_directory_fsync_the_file_system_refuses_is_ignored_after_the_rename(tmp_path, monkeypatch, code):
    """FUSE / object-store mounts (EINVAL) and CIFS (ENOTSUP) refuse fsync on a folder: rank 0 died with a bare
    OSError after the checkpoint was renamed. Another error is reported in one line."""
    real = os.fsync

    def refuses_folders(fd, error=code):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(error, os.strerror(error))
        return real(fd)

    monkeypatch.setattr(os, "fsync", refuses_folders)
    checkpoint.save_checkpoint({"epoch": 3}, tmp_path / "c.pth")
    assert checkpoint.read_checkpoint(tmp_path / "c.pth") == {"epoch": 3}
    monkeypatch.setattr(os, "fsync", lambda fd: refuses_folders(fd, errno.EIO))
    with pytest.raises(CheckpointError, match="could not make its folder durable: Input/output error"):
        checkpoint.save_checkpoint({"epoch": 4}, tmp_path / "c.pth")


def test_a_folder_that_can_be_written_but_not_opened_keeps_the_checkpoint(tmp_path, monkeypatch):
    """A folder of mode -wx (root ignores modes: its os.open is refused here as the kernel would): the checkpoint was
    renamed into place, then reported as failed ("could not make its folder durable: Permission denied")."""
    real = os.open

    def unreadable_folder(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise OSError(errno.EACCES, "Permission denied")
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", unreadable_folder)
    checkpoint.save_checkpoint({"epoch": 3}, tmp_path / "c.pth")
    monkeypatch.undo()
    assert checkpoint.read_checkpoint(tmp_path / "c.pth") == {"epoch": 3}


# --- messages that named the wrong cause, and two old silent cases --------------------------------------------------


def test_nan_in_a_float_tiff_on_the_8_bit_path_advises_what_works_there(tmp_path):
    data = np.ones((3, 8, 8), np.float32)
    data[0, 2, 3] = np.nan
    tifffile.imwrite(tmp_path / "f.tif", data, photometric="minisblack", planarconfig="separate")
    with pytest.raises(DataError) as info:
        images.load_image(str(tmp_path / "f.tif"), stretch=True)
    assert "the 8-bit RGB path (--stretch) has no no-data handling" in str(info.value)
    assert "--band_stats FILE.json --nodata nan" in str(info.value)


def test_nodata_on_8_bit_rgb_is_refused_for_what_it_needs_not_as_non_8_bit_data():
    with pytest.raises(UsageError) as info:
        bands_of(nodata=0.0)
    message = str(info.value)
    assert message.startswith("--nodata 0 reads the files as rasters (values in the file's units, 0..255")
    assert "non-8-bit" not in message and "tools/band_stats.py --nodata 0" in message


def test_a_link_to_dev_zero_is_named_as_a_device_not_as_missing(tmp_path):
    link = tmp_path / "images" / "zero.jpg"
    link.parent.mkdir()
    link.symlink_to("/dev/zero")
    (tmp_path / "train.csv").write_text("label,image_path\n0,images/zero.jpg\n")
    with pytest.raises(
        DataError,
        match=r"not readable files, first row 2: .*zero.jpg is a character device, not a "
        r"regular file \(a link to /dev/zero\)",
    ):
        datasets.build_dataset(tmp_path / "train.csv")
    (tmp_path / "ckpt.pth").symlink_to("/dev/zero")
    with pytest.raises(
        CheckpointError,
        match=r"ckpt.pth: is a character device, not a regular file \(a link to "
        r"/dev/zero\)",
    ):
        checkpoint.read_checkpoint(tmp_path / "ckpt.pth")


def test_a_csv_without_a_header_row_keeps_its_first_image(tmp_path, capsys):
    root = write_csv_dataset(tmp_path, 3).parent
    rows = (root / "train.csv").read_text().splitlines()[1:]
    (root / "headerless.csv").write_text("\n".join(rows) + "\n")
    dataset = datasets.build_dataset(root / "headerless.csv")
    assert len(dataset) == 3 and dataset.samples[0][0].endswith("train_0.jpg")
    assert (
        "row 1 (0, images/train_0.jpg) is an image, not a header: read as the first sample" in capsys.readouterr().out
    )
    assert dataset.describe(1).endswith(f"(row 2 of {root / 'headerless.csv'})")
    assert len(datasets.build_dataset(root / "train.csv")) == 3  # a header row is still a header


def test_hidden_files_macosx_and_empty_folders_are_no_classes_or_samples(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree", ["a", "b"], per_class=2)
    (tree / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # a macOS resource fork
    (tree / ".DS_Store").write_bytes(b"\x00")
    (tree / "__MACOSX" / "a").mkdir(parents=True)
    make_image(0, 0, 16).save(tree / "__MACOSX" / "a" / "._1.png")
    (tree / "empty").mkdir()
    (tree / "b" / "zero.png").symlink_to("/dev/zero")
    dataset = datasets.build_dataset(tree)
    assert dataset.classes == ["a", "b"] and len(dataset) == 4
    note = capsys.readouterr().out
    assert "left out" in note and "__MACOSX/" in note and "empty/ (no images)" in note and "a/._0.png" in note
    assert "b/zero.png (is a character device, not a regular file (a link to /dev/zero))" in note
    assert len(datasets.build_dataset(tree / "a", "folder")) == 2  # an unlabelled folder skips them too
