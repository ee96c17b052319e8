"""tools/prepare_benchmark.py on fake distributions in each official layout: exact per-split counts and labels."""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import json
import runpy
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from benchmark_fakes import (
    EUROSAT_CLASSES,
    FMOW_FAKE_CATEGORIES,
    LOVEDA_FAKE,
    SMALL_TILE,
    isprs_image,
    make_eurosat,
    make_fmow,
    make_loveda,
    make_potsdam,
    make_resisc45,
    make_ucmerced,
    make_vaihingen,
    make_whu_rs19,
)
from PIL import Image

from util.data import benchmarks
from util.data.archives import Source, verify_checksums
from util.data.benchmarks import (
    BENCHMARKS,
    EUROSAT_COUNTS,
    FMOW_CATEGORIES,
    RESISC45_CLASSES,
    UCMERCED_CLASSES,
    WHU_RS19_CLASSES,
    isprs_crop_boxes,
)
from util.data.images import read_raster
from util.data.segmentation import read_mask
from util.errors import DataError
from util.run.process import run_entry_point

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("prepare_benchmark", REPO / "tools" / "prepare_benchmark.py")
prepare_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_benchmark)


def prepare(name: str, archives, output: Path, *flags) -> dict:
    argv = [name, "--archive", *map(str, archives), "--output", str(output), *map(str, flags)]
    run_entry_point(prepare_benchmark.main, prepare_benchmark.get_args_parser().parse_args(argv))
    return json.loads((output / "summary.json").read_text())


def prepare_error(name: str, archives, output: Path, *flags) -> str:
    with pytest.raises(SystemExit) as info:
        prepare(name, archives, output, *flags)
    message = str(info.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def read_manifest(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def counts(summary: dict, split_set: str) -> dict[str, int]:
    return {split: c["images"] for split, c in summary["split_sets"][split_set]["counts"].items()}


def check_classification_manifest(path: Path, classes: tuple[str, ...]) -> list[dict]:
    """Header label,path,class_name; label = index of class_name in the sorted classes; every path exists."""
    rows = read_manifest(path)
    assert list(rows[0]) == ["label", "path", "class_name"]
    for row in rows:
        assert classes[int(row["label"])] == row["class_name"]
        assert not Path(row["path"]).is_absolute() and (path.parent / row["path"]).is_file()
    return rows


def test_resisc45_zip_with_torchgeo_lists(tmp_path):
    archives, lists = make_resisc45(tmp_path / "raw")
    out = tmp_path / "resisc45"
    summary = prepare("resisc45", archives, out, "--split_file", *lists, "--no_verify")
    assert summary["all"]["images"] == 45 * 4 and set(summary["all"]["per_class"].values()) == {4}
    assert counts(summary, "torchgeo") == {"train": 90, "val": 45, "test": 45}
    assert summary["split_sets"]["torchgeo"]["matches_published"] is False  # 45 x 4 fake images, not 31,500
    assert "scalemae" not in summary["split_sets"]  # its lists name images the fake lacks: noted, not written
    assert any("split set scalemae: not written" in note for note in summary["notes"])
    rows = check_classification_manifest(out / "torchgeo-test.csv", RESISC45_CLASSES)
    assert Counter(r["class_name"] for r in rows) == dict.fromkeys(RESISC45_CLASSES, 1)
    assert {r["path"] for r in rows if r["class_name"] == "wetland"} == {"images/wetland/wetland_004.jpg"}
    train = check_classification_manifest(out / "torchgeo-train.csv", RESISC45_CLASSES)
    assert {r["label"] for r in train if r["class_name"] == "airplane"} == {"0"}
    assert {r["label"] for r in train if r["class_name"] == "wetland"} == {"44"}
    with Image.open(out / "images" / "airplane" / "airplane_001.jpg") as image:
        assert image.size == (256, 256)
    assert not (out / ".cache").exists()


def test_published_md5_is_verified_and_a_mismatch_stops(tmp_path):
    archives, lists = make_resisc45(tmp_path / "raw", per_class=2)
    message = prepare_error("resisc45", archives, tmp_path / "out", "--split_file", *lists)
    assert (
        "NWPU-RESISC45.zip: md5" in message
        and "75206b2e16446591afa88e2628744886" in message
        and "--no_verify" in message
    )
    assert not (tmp_path / "out" / "summary.json").exists()


def test_verify_checksums_remembers_verified_files(tmp_path):
    archive = tmp_path / "Train.zip"
    archive.write_bytes(b"LoveDA" * 1000)
    published = {"Train.zip": (hashlib.md5(archive.read_bytes()).hexdigest(), "test table")}
    state = tmp_path / "state.json"
    assert "verified (test table)" in verify_checksums([archive], published, state)[0]
    assert "verified earlier" in verify_checksums([archive], published, state)[0]
    assert "no published checksum" in verify_checksums([tmp_path / "state.json"], published, state)[0]
    archive.write_bytes(b"truncated")
    with pytest.raises(DataError, match="does not match"):
        verify_checksums([archive], published, state)


def test_shipped_scalemae_lists_cover_each_data_set_once():
    """Scale-MAE's lists (benchmarks/splits/scalemae): RESISC45 25,200 / 6,300, 700 per class in all; EuroSAT
    21,600 / 5,400 with the published class sizes; no image in both splits."""
    for bench, classes in (("resisc45", dict.fromkeys(RESISC45_CLASSES, 700)), ("eurosat-rgb", EUROSAT_COUNTS)):
        split_set = BENCHMARKS[bench].split_set("scalemae")
        lines = {
            split: gzip.decompress((benchmarks.SPLITS / rel).read_bytes()).decode().split()
            for split, rel in split_set.lists.items()
        }
        assert {split: len(names) for split, names in lines.items()} == dict(split_set.counts)
        assert not set(lines["train"]) & set(lines["val"])
        per_class = Counter(name.split("/")[1] for names in lines.values() for name in names)
        assert per_class == classes


def test_shipped_lists_applied_to_an_archive_they_fit(tmp_path, monkeypatch):
    archives, _ = make_resisc45(tmp_path / "raw", per_class=3)
    lists = tmp_path / "splits" / "scalemae"
    lists.mkdir(parents=True)
    train = [f"./{c}/{c}_{i:03d}.jpg" for c in RESISC45_CLASSES for i in (1, 2)]
    val = [f"./{c}/{c}_003.jpg" for c in RESISC45_CLASSES]
    (lists / "train-resisc.txt.gz").write_bytes(gzip.compress("\n".join(train).encode()))
    (lists / "val-resisc.txt.gz").write_bytes(gzip.compress("\n".join(val).encode()))
    monkeypatch.setattr(benchmarks, "SPLITS", tmp_path / "splits")
    summary = prepare("resisc45", archives, tmp_path / "out", "--no_verify")
    assert counts(summary, "scalemae") == {"train": 90, "val": 45}
    assert summary["split_sets"]["scalemae"]["evaluation"] == "val"
    assert any("split set torchgeo: not written" in note for note in summary["notes"])
    check_classification_manifest(tmp_path / "out" / "scalemae-val.csv", RESISC45_CLASSES)


def test_ucmerced_tif_with_torchgeo_lists(tmp_path):
    archives, lists = make_ucmerced(tmp_path / "raw")
    summary = prepare("ucmerced", archives, tmp_path / "out", "--split_file", *lists, "--no_verify")
    assert counts(summary, "torchgeo") == {"train": 42, "val": 21, "test": 21}
    rows = check_classification_manifest(tmp_path / "out" / "torchgeo-val.csv", UCMERCED_CLASSES)
    assert [r["path"] for r in rows[:2]] == ["images/agricultural/agricultural02.tif", "images/airplane/airplane02.tif"]
    assert rows[-1]["label"] == "20" and rows[-1]["class_name"] == "tenniscourt"


def test_split_list_naming_images_not_in_the_archive_is_refused(tmp_path):
    archives, lists = make_ucmerced(tmp_path / "raw")
    lists[0].write_text(lists[0].read_text() + "harbor99.tif\n")
    message = prepare_error("ucmerced", archives, tmp_path / "out", "--split_file", *lists, "--no_verify")
    assert "uc_merced-train.txt: 1 of its 43 images are not in the --archive given (first: harbor99)" in message


def test_split_list_md5_is_checked(tmp_path):
    archives, lists = make_ucmerced(tmp_path / "raw")
    renamed = archives[0].rename(archives[0].with_name("ucm.zip"))  # a name without a published md5: lists checked next
    message = prepare_error("ucmerced", [renamed], tmp_path / "out", "--split_file", *lists)
    assert "uc_merced-train.txt: md5" in message and "recorded by torchgeo" in message


def test_whu_rs19_folder_in_place_with_the_seeded_split(tmp_path):
    folder = make_whu_rs19(tmp_path / "raw", {"Airport": 7, "footballField": 4})
    out = tmp_path / "out"
    summary = prepare("whu-rs19", [folder], out)
    per_class = {name: 7 if name == "Airport" else 4 if name == "footballField" else 5 for name in WHU_RS19_CLASSES}
    assert summary["all"]["per_class"] == dict(sorted(per_class.items())) and summary["all"]["images"] == 96
    split = summary["split_sets"]["seeded"]["counts"]
    assert (
        split["train"]["per_class"]["Airport"] == 4 and split["val"]["per_class"]["Airport"] == 1
    )  # round(4.2), round(1.4)
    assert split["test"]["per_class"]["Airport"] == 2 and split["train"]["per_class"]["Bridge"] == 3
    assert counts(summary, "seeded") == {"train": 57, "val": 19, "test": 20}
    rows = check_classification_manifest(out / "seeded-train.csv", WHU_RS19_CLASSES)
    assert all(r["path"].startswith("../raw/WHU-RS19/") for r in rows)  # used where they are
    assert not (out / "images").exists()
    assert "checksum" in " ".join(summary["checksums"])  # none is published: said so
    again = prepare("whu-rs19", [folder], tmp_path / "copy", "--copy")
    assert again["split_sets"]["seeded"]["counts"] == summary["split_sets"]["seeded"]["counts"]  # the same split
    copied = read_manifest(tmp_path / "copy" / "seeded-train.csv")
    assert [Path(r["path"]).name for r in copied] == [Path(r["path"]).name for r in rows]
    assert all(r["path"].startswith("images/") for r in copied)


@pytest.mark.parametrize("bands", ["rgb", "ms"])
def test_eurosat_rgb_and_13_bands(tmp_path, bands):
    archives, lists = make_eurosat(tmp_path / "raw", bands)
    name = "eurosat-rgb" if bands == "rgb" else "eurosat-ms"
    summary = prepare(name, archives, tmp_path / "out", "--split_file", *lists, "--no_verify")
    assert counts(summary, "torchgeo") == {"train": 20, "val": 10, "test": 10}  # lists name .jpg: matched by stem
    rows = check_classification_manifest(tmp_path / "out" / "torchgeo-train.csv", EUROSAT_CLASSES)
    assert rows[0]["path"] == "images/AnnualCrop/AnnualCrop_1." + ("jpg" if bands == "rgb" else "tif")
    if bands == "ms":
        assert summary["protocol"] == {"in_chans": 13}
        raster = read_raster(tmp_path / "out" / rows[-1]["path"])
        assert raster.data.shape == (13, 64, 64) and raster.data.max() == 1000 + 100 * 9 + 2


def test_fmow_tar_gz_official_train_val(tmp_path):
    summary = prepare("fmow-rgb", [make_fmow(tmp_path / "raw")], tmp_path / "out")
    assert counts(summary, "official") == {"train": 12, "val": 6}  # 3 categories x locations x 2 views
    assert any("left out 6 images of category false_detection" in note for note in summary["notes"])
    rows = check_classification_manifest(tmp_path / "out" / "official-train.csv", FMOW_CATEGORIES)
    assert {r["class_name"]: int(r["label"]) for r in rows} == {
        c: FMOW_CATEGORIES.index(c) for c in FMOW_FAKE_CATEGORIES
    }
    assert {int(r["label"]) for r in rows} == {0, 11, 61}
    assert rows[0]["path"] == "images/train/airport/airport_0/airport_0_0_rgb.jpg"
    assert FMOW_CATEGORIES == tuple(sorted(FMOW_CATEGORIES)) and len(FMOW_CATEGORIES) == 62


def test_isprs_class_names_are_the_palettes():
    from util.data.segmentation import ISPRS

    assert benchmarks.ISPRS_CLASSES == ISPRS.names  # the manifests' masks are indices into the isprs palette


def test_isprs_crop_grid_is_mmsegmentations():
    assert len(isprs_crop_boxes(6000, 6000)) == 144  # x 24 Potsdam training tiles = 3,456 crops
    assert isprs_crop_boxes(600, 1100) == [(0, 0), (0, 512), (0, 588), (88, 0), (88, 512), (88, 588)]
    assert isprs_crop_boxes(40, 48) == [(0, 0)]


def test_potsdam_nested_zips_crops_and_eroded_test_tiles(tmp_path):
    out = tmp_path / "out"
    summary = prepare("potsdam", [make_potsdam(tmp_path / "raw")], out)
    entry = summary["split_sets"]["official"]
    assert entry["counts"] == {"train": {"images": 6 + 23, "tiles": 24}, "test": {"images": 14, "tiles": 14}}
    assert entry["matches_published"] is True and summary["protocol"]["exclude_classes"] == [5]
    train, test = read_manifest(out / "official-train.csv"), read_manifest(out / "official-test.csv")
    assert list(train[0]) == ["image_path", "mask_path"] and len(train) == 29 and len(test) == 14
    assert train[0] == {"image_path": "train/images/2_10_0_0.png", "mask_path": "train/masks/2_10_0_0.png"}
    assert {r["image_path"] for r in test} == {f"test/images/{t}.png" for t in benchmarks.POTSDAM_TEST}
    with Image.open(out / "train" / "images" / "2_10_88_588.png") as crop:
        assert crop.size == (512, 512)
    full = read_mask(out / "train" / "masks" / "2_10_0_0.png")
    stripes = np.arange(512) // 8 % 6  # the fake's colours in ISPRS order: index = stripe (tile 2_10 is index 0)
    assert (full == stripes[None]).all()
    eroded = read_mask(out / "test" / "masks" / "2_13.png")
    assert (eroded[:, 0::8] == 255).all() and set(np.unique(eroded)) <= {*range(6), 255}
    assert summary["tile_sizes"]["train"]["2_10"] == [600, 1100]


def test_vaihingen_two_zips_irrg_tiles(tmp_path):
    summary = prepare("vaihingen", make_vaihingen(tmp_path / "raw"), tmp_path / "out", "--no_verify")
    entry = summary["split_sets"]["official"]
    assert entry["counts"] == {"train": {"images": 6 + 15, "tiles": 16}, "test": {"images": 17, "tiles": 17}}
    test = read_manifest(tmp_path / "out" / "official-test.csv")
    assert "test/images/area9.png" not in {r["image_path"] for r in test}  # a label without an image
    index = (benchmarks.VAIHINGEN_TRAIN + benchmarks.VAIHINGEN_TEST).index("area3")
    image = np.asarray(Image.open(tmp_path / "out" / "train" / "images" / "area3_0_0.png"))
    assert (image == isprs_image(SMALL_TILE, index)).all()  # the image, not its reference of the same file name
    assert {r["image_path"] for r in test} == {f"test/images/{t}.png" for t in benchmarks.VAIHINGEN_TEST}


def test_missing_official_tiles_are_named(tmp_path):
    archives = make_vaihingen(tmp_path / "raw")
    message = prepare_error("vaihingen", archives[:1], tmp_path / "out", "--no_verify")
    assert "17 file(s) of the official tiles are missing" in message and "area2 eroded" in message


def test_loveda_urban_rural_train_val(tmp_path):
    out = tmp_path / "out"
    summary = prepare("loveda", make_loveda(tmp_path / "raw"), out, "--no_verify")
    assert counts(summary, "official") == {"train": 5, "val": 3}
    assert counts(summary, "urban") == {"train": 3, "val": 2} and counts(summary, "rural") == {"train": 2, "val": 1}
    assert summary["split_sets"]["official"]["counts"]["train"] == {"images": 5, "urban": 3, "rural": 2}
    rows = read_manifest(out / "official-val.csv")
    assert rows[0] == {
        "image_path": "images/Val/Urban/images_png/5.png",
        "mask_path": "images/Val/Urban/masks_png/5.png",
    }
    mask = read_mask(out / rows[0]["mask_path"], zero_is_nodata=True)  # --reduce_zero_label: 0 -> 255, k -> k - 1
    assert set(np.unique(mask)) == {*range(7), 255}
    assert summary["protocol"]["reduce_zero_label"] is True and len(summary["protocol"]["class_names"]) == 7
    assert LOVEDA_FAKE[("Val", "Rural")] == 1


def test_an_interrupted_run_resumes(tmp_path):
    archives, lists = make_ucmerced(tmp_path / "raw", per_class=3)
    out = tmp_path / "out"
    first = prepare("ucmerced", archives, out, "--split_file", *lists, "--no_verify")
    kept = out / "images" / "beach" / "beach00.tif"
    stamp = kept.stat().st_mtime_ns
    (out / "images" / "beach" / "beach01.tif").unlink()  # as if stopped before these were written
    (out / "torchgeo-train.csv").unlink()
    second = prepare("ucmerced", archives, out, "--split_file", *lists, "--no_verify")
    assert second["split_sets"] == first["split_sets"]
    assert kept.stat().st_mtime_ns == stamp and (out / "images" / "beach" / "beach01.tif").is_file()


def test_wrong_archive_and_unreadable_formats_are_one_line_errors(tmp_path):
    archives, _ = make_ucmerced(tmp_path / "raw", per_class=1)
    message = prepare_error("resisc45", archives, tmp_path / "out", "--no_verify")
    assert (
        "resisc45: no .jpg images in class folder(s) airplane, airport" in message
        and "NWPU-RESISC45/<class>" in message
    )
    rar = tmp_path / "NWPU-RESISC45.rar"
    rar.write_bytes(b"Rar!")
    message = prepare_error("resisc45", [rar], tmp_path / "out", "--no_verify")
    assert "unpack it (unrar x NWPU-RESISC45.rar) and give the folder" in message
    broken = tmp_path / "Train.zip"
    broken.write_bytes(b"PK\x03\x04 truncated")
    assert "not a readable zip archive" in prepare_error("loveda", [broken], tmp_path / "out", "--no_verify")


def test_command_line_error_is_one_line(tmp_path, monkeypatch):
    """The script as ``python tools/prepare_benchmark.py ...`` runs it (in this process: no second interpreter)."""
    monkeypatch.setattr(sys, "argv", ["tools/prepare_benchmark.py", "loveda", "--archive", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(REPO / "tools" / "prepare_benchmark.py"), run_name="__main__")
    assert str(info.value) == f"error: --archive {tmp_path / 'nothing'}: no such file or folder"


def test_list_names_every_archive_and_split_source(capsys):
    run_entry_point(prepare_benchmark.main, prepare_benchmark.get_args_parser().parse_args(["--list"]))
    text = capsys.readouterr().out
    for bench in BENCHMARKS.values():
        assert f"{bench.name}: {bench.title}" in text
        assert all(f"archive {a.name}:" in text for a in bench.archives)
    assert "storage.googleapis.com/remote_sensing_representations/resisc45-{train,val,test}.txt" in text


def test_source_reads_archives_inside_a_folder(tmp_path):
    archives = make_loveda(tmp_path / "raw" / "LoveDA")
    source = Source([tmp_path / "raw" / "LoveDA"], tmp_path / "cache")
    assert sorted(source.archive_files) == sorted(archives)  # inner archives of a folder: verifiable files
    assert "LoveDA/Val.zip/Val/Rural/images_png/7.png" in source.members
