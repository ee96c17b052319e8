"""Fake benchmark distributions in their official layouts (file names, folders, class names, archive kinds, image
formats and band counts as published; few images per class, and ISPRS / LoveDA tiles far smaller than the real
6000 / ~2000 / 1024 px), for tests/test_prepare_benchmark.py and tests/test_paper_rows.py.

Each ``make_*`` writes the archive(s) under ``root`` and returns (the paths to give as ``--archive``, the split-list
files to give as ``--split_file`` or []), plus what the reader must produce where a test needs it.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from util.data.benchmarks import (
    EUROSAT_COUNTS,
    FMOW_SKIPPED,
    POTSDAM_TEST,
    POTSDAM_TRAIN,
    RESISC45_CLASSES,
    UCMERCED_CLASSES,
    VAIHINGEN_TEST,
    VAIHINGEN_TRAIN,
    WHU_RS19_CLASSES,
)
from util.data.segmentation import ISPRS

EUROSAT_CLASSES = tuple(sorted(EUROSAT_COUNTS))
FMOW_FAKE_CATEGORIES = ("airport", "crop_field", "zoo")


def image_bytes(label: int, index: int, size: tuple[int, int], fmt: str) -> bytes:
    """A smooth RGB image whose brightness depends on the label (learnable, compresses well)."""
    h, w = size
    ramp = np.linspace(0, 40, w, dtype=np.float32)[None, :, None]
    base = 30 + (label * 37) % 180 + index % 7
    pixels = np.clip(base + ramp + np.zeros((h, w, 3), np.float32), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def write_lists(folder: Path, prefix: str, splits: dict[str, list[str]]) -> list[Path]:
    """torchgeo-style lists ``<prefix>-<split>.txt``: one file name per line."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, names in splits.items():
        path = folder / f"{prefix}-{split}.txt"
        path.write_text("\n".join(names) + "\n")
        paths.append(path)
    return paths


def split_names(names_per_class: dict[str, list[str]]) -> dict[str, list[str]]:
    """Per class: the first two images train, the third val, the rest test."""
    out = {"train": [], "val": [], "test": []}
    for names in names_per_class.values():
        out["train"] += names[:2]
        out["val"] += names[2:3]
        out["test"] += names[3:]
    return out


def make_resisc45(root: Path, per_class: int = 4) -> tuple[list[Path], list[Path]]:
    """``NWPU-RESISC45.zip``: NWPU-RESISC45/<class>/<class>_<NNN>.jpg, 256 x 256 JPEG; torchgeo-style lists."""
    files, names = {}, {}
    for label, name in enumerate(RESISC45_CLASSES):
        names[name] = [f"{name}_{i:03d}.jpg" for i in range(1, per_class + 1)]
        for i, file in enumerate(names[name]):
            files[f"NWPU-RESISC45/{name}/{file}"] = image_bytes(label, i, (256, 256), "JPEG")
    return [write_zip(root / "NWPU-RESISC45.zip", files)], write_lists(root / "lists", "resisc45", split_names(names))


def make_ucmerced(root: Path, per_class: int = 4) -> tuple[list[Path], list[Path]]:
    """``UCMerced_LandUse.zip``: UCMerced_LandUse/Images/<class>/<class><NN>.tif, 256 x 256 RGB TIFF."""
    files, names = {}, {}
    for label, name in enumerate(UCMERCED_CLASSES):
        names[name] = [f"{name}{i:02d}.tif" for i in range(per_class)]
        for i, file in enumerate(names[name]):
            files[f"UCMerced_LandUse/Images/{name}/{file}"] = image_bytes(label, i, (256, 256 if i else 247), "TIFF")
    return [write_zip(root / "UCMerced_LandUse.zip", files)], write_lists(
        root / "lists", "uc_merced", split_names(names)
    )


def make_whu_rs19(root: Path, counts: dict[str, int] | None = None) -> Path:
    """An unpacked ``WHU-RS19`` folder: <Class>/<class>_<NN>.jpg, 600 x 600 JPEG (uneven class sizes)."""
    folder = root / "WHU-RS19"
    for label, name in enumerate(WHU_RS19_CLASSES):
        count = (counts or {}).get(name, 5)
        (folder / name).mkdir(parents=True)
        for i in range(1, count + 1):
            (folder / name / f"{name.lower()}_{i:02d}.jpg").write_bytes(image_bytes(label, i, (600, 600), "JPEG"))
    return folder


def make_eurosat(root: Path, bands: str, per_class: int = 4) -> tuple[list[Path], list[Path]]:
    """``EuroSAT.zip`` (2750/<Class>/<Class>_<N>.jpg, 64 x 64 RGB) or ``EuroSATallBands.zip``
    (ds/images/remote_sensing/otherDatasets/sentinel_2/tif/<Class>/<Class>_<N>.tif, 64 x 64 x 13 uint16); the lists
    name .jpg files (torchgeo's lists do)."""
    import tifffile

    files, names = {}, {}
    for label, name in enumerate(EUROSAT_CLASSES):
        names[name] = [f"{name}_{i}.jpg" for i in range(1, per_class + 1)]
        for i in range(1, per_class + 1):
            if bands == "rgb":
                files[f"2750/{name}/{name}_{i}.jpg"] = image_bytes(label, i, (64, 64), "JPEG")
            else:
                buffer = io.BytesIO()
                tifffile.imwrite(
                    buffer, np.full((13, 64, 64), 1000 + 100 * label + i, np.uint16), photometric="minisblack"
                )
                files[f"ds/images/remote_sensing/otherDatasets/sentinel_2/tif/{name}/{name}_{i}.tif"] = (
                    buffer.getvalue()
                )
    archive = root / ("EuroSAT.zip" if bands == "rgb" else "EuroSATallBands.zip")
    return [write_zip(archive, files)], write_lists(root / "lists", "eurosat", split_names(names))


def make_fmow(root: Path) -> Path:
    """``fmow-rgb.tar.gz``: fmow-rgb/{train,val}/<category>/<category>_<loc>/<category>_<loc>_<n>_rgb.jpg (+ .json,
    _msrgb.jpg siblings, a false_detection category and an unlabelled test/ folder, all left out)."""
    path = root / "fmow-rgb.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))

        for split, locations in (("train", 2), ("val", 1)):
            for label, category in enumerate((*FMOW_FAKE_CATEGORIES, FMOW_SKIPPED)):
                for loc in range(locations):
                    for n in range(2):
                        stem = f"fmow-rgb/{split}/{category}/{category}_{loc}/{category}_{loc}_{n}"
                        add(f"{stem}_rgb.jpg", image_bytes(label, n, (30 + 10 * n, 40), "JPEG"))
                        add(f"{stem}_rgb.json", b"{}")
                        add(f"{stem}_msrgb.jpg", image_bytes(label, n, (8, 8), "JPEG"))
        add("fmow-rgb/test/0000000/0000000_0_rgb.jpg", image_bytes(0, 0, (20, 20), "JPEG"))
    return path


def isprs_label(size: tuple[int, int], tile_index: int, eroded: bool) -> np.ndarray:
    """An RGB colour-coded reference: vertical stripes of the six ISPRS colours (shifted per tile); eroded: the
    pixels next to a stripe boundary black, as ISPRS's noBoundary references."""
    h, w = size
    columns = (np.arange(w) // 8 + tile_index) % len(ISPRS.colors)
    label = np.array(ISPRS.colors, np.uint8)[columns][None].repeat(h, 0)
    if eroded:
        edge = np.arange(w) % 8 == 0
        label[:, edge] = 0
    return label


def tif_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="TIFF", compression="tiff_lzw")
    return buffer.getvalue()


def isprs_image(size: tuple[int, int], tile_index: int) -> np.ndarray:
    h, w = size
    return np.clip(np.arange(w)[None, :, None] * 3 + tile_index + np.zeros((h, w, 3)), 0, 255).astype(np.uint8)


BIG_TILE = (600, 1100)  # (height, width): 2 x 3 training crops of 512 (the last flush with the border)
SMALL_TILE = (40, 48)  # smaller than a crop: one crop, the whole tile


def make_potsdam(root: Path) -> Path:
    """``Potsdam.zip`` holding Potsdam/2_Ortho_RGB.zip (2_Ortho_RGB/top_potsdam_<i>_<j>_RGB.tif),
    Potsdam/5_Labels_all.zip and Potsdam/5_Labels_all_noBoundary.zip (labels at their top level), as ISPRS ships it.
    Tile 2_10 is BIG_TILE, the others SMALL_TILE; one extra 4_Ortho_RGBIR.zip is not needed and left out."""
    images, labels, eroded = {}, {}, {}
    for index, tile in enumerate(POTSDAM_TRAIN + POTSDAM_TEST):
        size = BIG_TILE if tile == "2_10" else SMALL_TILE
        images[f"2_Ortho_RGB/top_potsdam_{tile}_RGB.tif"] = tif_bytes(isprs_image(size, index))
        labels[f"top_potsdam_{tile}_label.tif"] = tif_bytes(isprs_label(size, index, False))
        eroded[f"top_potsdam_{tile}_label_noBoundary.tif"] = tif_bytes(isprs_label(size, index, True))

    def zipped(files: dict[str, bytes]) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        return buffer.getvalue()

    return write_zip(
        root / "Potsdam.zip",
        {
            "Potsdam/2_Ortho_RGB.zip": zipped(images),
            "Potsdam/5_Labels_all.zip": zipped(labels),
            "Potsdam/5_Labels_all_noBoundary.zip": zipped(eroded),
        },
    )


def make_vaihingen(root: Path) -> list[Path]:
    """ISPRS_semantic_labeling_Vaihingen.zip (top/top_mosaic_09cm_area<N>.tif for all 33 tiles,
    gts_for_participants/ the full reference of the 16 training tiles) and
    ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip (..._noBoundary.tif for all tiles and an
    area9 label without an image, as mmsegmentation notes)."""
    data, eroded = {}, {}
    for index, tile in enumerate(VAIHINGEN_TRAIN + VAIHINGEN_TEST):
        size = BIG_TILE if tile == "area1" else SMALL_TILE
        data[f"top/top_mosaic_09cm_{tile}.tif"] = tif_bytes(isprs_image(size, index))
        if tile in VAIHINGEN_TRAIN:
            data[f"gts_for_participants/top_mosaic_09cm_{tile}.tif"] = tif_bytes(isprs_label(size, index, False))
        eroded[f"top_mosaic_09cm_{tile}_noBoundary.tif"] = tif_bytes(isprs_label(size, index, True))
    eroded["top_mosaic_09cm_area9_noBoundary.tif"] = tif_bytes(isprs_label(SMALL_TILE, 0, True))
    return [
        write_zip(root / "ISPRS_semantic_labeling_Vaihingen.zip", data),
        write_zip(root / "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip", eroded),
    ]


LOVEDA_FAKE = {("Train", "Urban"): 3, ("Train", "Rural"): 2, ("Val", "Urban"): 2, ("Val", "Rural"): 1}


def make_loveda(root: Path, size: int = 64) -> list[Path]:
    """Train.zip / Val.zip: <Split>/<Domain>/images_png/<n>.png (RGB) and masks_png/<n>.png (0 no-data, 1..7),
    numbered on from the previous folder as LoveDA numbers its files; a Test.zip without masks."""
    archives, number = [], 0
    for split in ("Train", "Val", "Test"):
        files = {}
        for domain in ("Urban", "Rural"):
            for _ in range(LOVEDA_FAKE.get((split, domain), 1)):
                files[f"{split}/{domain}/images_png/{number}.png"] = image_bytes(number, 0, (size, size), "PNG")
                if split != "Test":
                    mask = (np.arange(size * size).reshape(size, size) // 7 + number) % 8  # 0 (no data) .. 7
                    buffer = io.BytesIO()
                    Image.fromarray(mask.astype(np.uint8), mode="L").save(buffer, format="PNG")
                    files[f"{split}/{domain}/masks_png/{number}.png"] = buffer.getvalue()
                number += 1
        archives.append(write_zip(root / f"{split}.zip", files))
    return archives
