"""The evaluation benchmarks of the paper, read from their official distributions into this project's manifests.

One ``Benchmark`` per data set: where it is published (URL, archive names, checksums and who published them), its
classes and published counts, and its split sets. A split set is one way of dividing the data (``official``,
torchgeo's, Scale-MAE's, ours); it is written as ``<split set>-<split>.csv`` in the output folder:

- classification: CSV ``label,path,class_name`` (path relative to the CSV; labels index the sorted class names, as
  torchvision's ImageFolder and torchgeo number them), read by every ``--train_path`` / ``--test_path``;
- segmentation: CSV ``image_path,mask_path`` (relative to the CSV; ``util.data.segmentation.pairs_from_csv``).

``summary.json`` records the counts per split (and per class) beside the published ones, where the files came
from, the checksums verified and the flags the paper protocol needs (``benchmarks/paper.py`` reads it).
The layouts, class names and counts were learned from the data sets' papers and from public readers of them
(torchgeo's ``datasets/*.py``, mmsegmentation's ``tools/dataset_converters/{potsdam,vaihingen,loveda}.py``,
Scale-MAE's ``mae/splits``, SatMAE's ``util/datasets.py``); each spec names its sources. ``docs/reproducing.md``
is the user's page.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from util.data.archives import Member, Source, materialize, relative
from util.errors import DataError
from util.files import write_atomically

REPO = Path(__file__).resolve().parents[2]
SPLITS = REPO / "benchmarks" / "splits"
SUMMARY = "summary.json"


@dataclass(frozen=True)
class Archive:
    """One file of an official distribution."""

    name: str
    url: str
    md5: str | None  # None: no checksum is published for it
    checksum_source: str  # who published (or recorded) the md5, or why there is none


@dataclass(frozen=True)
class SplitSet:
    """One division of a data set into splits.

    Attributes:
        name: Manifest prefix (``<name>-<split>.csv``).
        splits: Split names, training split first.
        evaluation: The split results are reported on.
        source: Whose split it is and where it comes from.
        counts: Published images per split (None: no published count).
        count_unit: What ``counts`` count: ``images``, or ``tiles`` (ISPRS: tiles before cutting).
        approx_counts: Manifest rows per split where no exact count is published (GPU-hour budgets before the data
            are prepared).
        lists: Shipped list files per split (paths under ``benchmarks/splits``).
        list_md5s: For lists the user supplies (``--split_file``): {file name: md5 recorded by its publisher}.
    """

    name: str
    splits: tuple[str, ...]
    evaluation: str
    source: str
    counts: Mapping[str, int] | None = None
    count_unit: str = "images"
    approx_counts: Mapping[str, int] | None = None
    lists: Mapping[str, str] | None = None
    list_md5s: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Benchmark:
    """A data set of the paper's evaluation and its official distribution."""

    name: str
    title: str
    task: str  # "classification" or "segmentation"
    archives: tuple[Archive, ...]
    homepage: str
    classes: tuple[str, ...]
    split_sets: tuple[SplitSet, ...]
    reader: str  # "folders", "fmow", "isprs", "loveda"
    layout: str  # the official layout, in words (docs and --list)
    sources: str  # the public code / docs the layout was learned from
    suffixes: tuple[str, ...] = (".jpg",)
    class_counts: Mapping[str, int] | None = None  # published images per class (None: not published)
    approx_eval_size: tuple[int, int] = (0, 0)  # segmentation: typical evaluation image (height, width), for budgets
    total: int | None = None  # published image count
    protocol: Mapping[str, object] = field(default_factory=dict)  # flags the training / evaluation scripts need
    notes: tuple[str, ...] = ()

    def split_set(self, name: str) -> SplitSet:
        for split_set in self.split_sets:
            if split_set.name == name:
                return split_set
        raise DataError(f"{self.name}: no split set {name!r} (it has {', '.join(s.name for s in self.split_sets)})")

    @property
    def published_md5s(self) -> dict[str, tuple[str, str]]:
        return {a.name: (a.md5, a.checksum_source) for a in self.archives if a.md5}


def manifest_name(split_set: str, split: str) -> str:
    return f"{split_set}-{split}.csv"


# --- the data sets -------------------------------------------------------------------------------------------------

NEUMANN = (
    "the train/val/test lists of Neumann et al. 2019, 'In-domain representation learning for remote sensing' "
    "(arXiv:1911.06721), as torchgeo downloads them"
)
TORCHGEO_LISTS = (
    "https://storage.googleapis.com/remote_sensing_representations/{name}-{split}.txt (original), re-hosted by "
    "torchgeo at {mirror}"
)
SCALEMAE = (
    "Scale-MAE's lists (bair-climate-initiative/scale-mae, mae/splits/{train,val}-{name}.txt at commit 89280d8; "
    "CC BY-NC 4.0, shipped gzip-compressed in benchmarks/splits/scalemae, content unchanged): a random 80/20 split"
)


def torchgeo_split_set(name: str, md5s: Mapping[str, str], counts: Mapping[str, int], mirror: str) -> SplitSet:
    return SplitSet(
        "torchgeo",
        ("train", "val", "test"),
        "test",
        f"{NEUMANN}: {TORCHGEO_LISTS.format(name=name, split='{train,val,test}', mirror=mirror)}; pass them "
        "with --split_file",
        counts=counts,
        list_md5s={f"{name}-{split}.txt": md5 for split, md5 in md5s.items()},
    )


def scalemae_split_set(name: str, counts: Mapping[str, int]) -> SplitSet:
    return SplitSet(
        "scalemae",
        ("train", "val"),
        "val",
        SCALEMAE.replace("{name}", name),
        counts=counts,
        lists={split: f"scalemae/{split}-{name}.txt.gz" for split in ("train", "val")},
    )


def seeded_split_set(approx_total: int, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> SplitSet:
    approx = {split: round(f * approx_total) for split, f in zip(("train", "val", "test"), fractions)}
    return SplitSet(
        "seeded",
        ("train", "val", "test"),
        "test",
        f"this project's split (no published one exists): per class, the sorted file names in a seeded random "
        f"order (numpy default_rng(0)), the first {fractions[0]:.0%} train, the next {fractions[1]:.0%} val, "
        "the rest test",
        approx_counts=approx,
    )


RESISC45_CLASSES = (
    "airplane",
    "airport",
    "baseball_diamond",
    "basketball_court",
    "beach",
    "bridge",
    "chaparral",
    "church",
    "circular_farmland",
    "cloud",
    "commercial_area",
    "dense_residential",
    "desert",
    "forest",
    "freeway",
    "golf_course",
    "ground_track_field",
    "harbor",
    "industrial_area",
    "intersection",
    "island",
    "lake",
    "meadow",
    "medium_residential",
    "mobile_home_park",
    "mountain",
    "overpass",
    "palace",
    "parking_lot",
    "railway",
    "railway_station",
    "rectangular_farmland",
    "river",
    "roundabout",
    "runway",
    "sea_ice",
    "ship",
    "snowberg",
    "sparse_residential",
    "stadium",
    "storage_tank",
    "tennis_court",
    "terrace",
    "thermal_power_station",
    "wetland",
)
UCMERCED_CLASSES = (
    "agricultural",
    "airplane",
    "baseballdiamond",
    "beach",
    "buildings",
    "chaparral",
    "denseresidential",
    "forest",
    "freeway",
    "golfcourse",
    "harbor",
    "intersection",
    "mediumresidential",
    "mobilehomepark",
    "overpass",
    "parkinglot",
    "river",
    "runway",
    "sparseresidential",
    "storagetanks",
    "tenniscourt",
)
WHU_RS19_CLASSES = tuple(
    sorted(
        (
            "Airport",
            "Beach",
            "Bridge",
            "Commercial",
            "Desert",
            "Farmland",
            "footballField",
            "Forest",
            "Industrial",
            "Meadow",
            "Mountain",
            "Park",
            "Parking",
            "Pond",
            "Port",
            "railwayStation",
            "Residential",
            "River",
            "Viaduct",
        )
    )
)
EUROSAT_COUNTS = {
    "AnnualCrop": 3000,
    "Forest": 3000,
    "HerbaceousVegetation": 3000,
    "Highway": 2500,
    "Industrial": 2500,
    "Pasture": 2000,
    "PermanentCrop": 2500,
    "Residential": 3000,
    "River": 2500,
    "SeaLake": 3000,
}
# Band order inside EuroSAT's 13-band files: B8A last (phelber/EuroSAT#7; torchgeo#2458 found it by inspecting the
# files and changed torchgeo to it in PR #2480), although the EuroSAT paper lists B8A after B08.
EUROSAT_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A")
# fMoW's 62 categories without "false_detection" (SatMAE's CATEGORIES, util/datasets.py): sorted, so index = label
FMOW_CATEGORIES = (
    "airport",
    "airport_hangar",
    "airport_terminal",
    "amusement_park",
    "aquaculture",
    "archaeological_site",
    "barn",
    "border_checkpoint",
    "burial_site",
    "car_dealership",
    "construction_site",
    "crop_field",
    "dam",
    "debris_or_rubble",
    "educational_institution",
    "electric_substation",
    "factory_or_powerplant",
    "fire_station",
    "flooded_road",
    "fountain",
    "gas_station",
    "golf_course",
    "ground_transportation_station",
    "helipad",
    "hospital",
    "impoverished_settlement",
    "interchange",
    "lake_or_pond",
    "lighthouse",
    "military_facility",
    "multi-unit_residential",
    "nuclear_powerplant",
    "office_building",
    "oil_or_gas_facility",
    "park",
    "parking_lot_or_garage",
    "place_of_worship",
    "police_station",
    "port",
    "prison",
    "race_track",
    "railway_bridge",
    "recreational_facility",
    "road_bridge",
    "runway",
    "shipyard",
    "shopping_mall",
    "single-unit_residential",
    "smokestack",
    "solar_farm",
    "space_facility",
    "stadium",
    "storage_tank",
    "surface_mine",
    "swimming_pool",
    "toll_booth",
    "tower",
    "tunnel_opening",
    "waste_disposal",
    "water_treatment_facility",
    "wind_farm",
    "zoo",
)
FMOW_SKIPPED = "false_detection"
# ISPRS 2D semantic labelling: the official training / test tiles (ISPRS benchmark pages; the same lists in torchgeo's
# Potsdam2D / Vaihingen2D and mmsegmentation's converters)
POTSDAM_TRAIN = (
    "2_10",
    "2_11",
    "2_12",
    "3_10",
    "3_11",
    "3_12",
    "4_10",
    "4_11",
    "4_12",
    "5_10",
    "5_11",
    "5_12",
    "6_7",
    "6_8",
    "6_9",
    "6_10",
    "6_11",
    "6_12",
    "7_7",
    "7_8",
    "7_9",
    "7_10",
    "7_11",
    "7_12",
)
POTSDAM_TEST = (
    "2_13",
    "2_14",
    "3_13",
    "3_14",
    "4_13",
    "4_14",
    "4_15",
    "5_13",
    "5_14",
    "5_15",
    "6_13",
    "6_14",
    "6_15",
    "7_13",
)
VAIHINGEN_TRAIN = tuple(f"area{i}" for i in (1, 3, 5, 7, 11, 13, 15, 17, 21, 23, 26, 28, 30, 32, 34, 37))
VAIHINGEN_TEST = tuple(f"area{i}" for i in (2, 4, 6, 8, 10, 12, 14, 16, 20, 22, 24, 27, 29, 31, 33, 35, 38))
ISPRS_CLASSES = ("impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter")
LOVEDA_CLASSES = ("background", "building", "road", "water", "barren", "forest", "agriculture")
CROP, CROP_STEP = 512, 512  # ISPRS training crops (see isprs_crop_boxes)

ISPRS_PROTOCOL = {"palette": "isprs", "exclude_classes": [5], "eval_ignore_boundary": 0}
ISPRS_SPLIT = (
    "the official ISPRS 2D semantic labelling split (training tiles as first released, the rest the test set, "
    "whose labels were released later); training tiles cut into 512 x 512 crops on a 512-px grid, the last "
    "row / column flush with the border (the crops mmsegmentation's converter writes); test tiles whole, with "
    "the eroded-boundary reference (boundary pixels = 255, ignored)"
)

# The split lists of EuroSAT name .jpg files, matched by file stem: one set of lists for the RGB and the 13-band files.
EUROSAT_SPLIT_SETS = (
    torchgeo_split_set(
        "eurosat",
        {
            "train": "908f142e73d6acdf3f482c5e80d851b1",
            "val": "95de90f2aa998f70a3b2416bfe0687b4",
            "test": "7ae5ab94471417b6e315763121e67c5f",
        },
        {"train": 16200, "val": 5400, "test": 5400},
        "https://hf.co/datasets/torchgeo/eurosat/resolve/1ce6f1bfb56db63fd91b6ecc466ea67f2509774c/",
    ),
    scalemae_split_set("eurosat", {"train": 21600, "val": 5400}),
)

BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            "fmow-rgb",
            "fMoW-RGB (Functional Map of the World, RGB JPEGs)",
            "classification",
            (
                Archive(
                    "fmow-rgb",
                    "s3://spacenet-dataset/Hosted-Datasets/fmow/fmow-rgb/ (aws s3 sync ... --no-sign-request; "
                    "see github.com/fMoW/dataset)",
                    None,
                    "no checksum is published (a folder tree on S3)",
                ),
            ),
            "https://github.com/fMoW/dataset",
            FMOW_CATEGORIES,
            (
                SplitSet(
                    "official",
                    ("train", "val"),
                    "val",
                    "fMoW's own train/ and val/ folders (Christie et al. 2018)",
                    approx_counts={"train": 363_600, "val": 53_000},
                ),
            ),
            "fmow",
            "train/<category>/<category>_<location>/<category>_<location>_<n>_rgb.jpg (+ .json metadata), the same "
            "under val/; test/ and seq/ carry no labels and are ignored; category 'false_detection' is left out (62 "
            "classes, "
            "as SatMAE and upstream Cross-Scale MAE)",
            "fMoW paper (arXiv:1711.07846) and github.com/fMoW/dataset; mlaico/fmow-helper's notes; SatMAE "
            "util/datasets.py (62 "
            "categories)",
            suffixes=(".jpg",),
            notes=(
                (
                    "about 363.6k training and 53.0k validation images (SatMAE paper); the exact counts of fmow-rgb "
                    "are not "
                    "published by its authors, so they are not checked here"
                ),
                "images are the full frames, not the bounding-box crops, as SatMAE and upstream use them",
            ),
        ),
        Benchmark(
            "resisc45",
            "NWPU-RESISC45",
            "classification",
            (
                Archive(
                    "NWPU-RESISC45.rar",
                    "https://1drv.ms/u/s!AmgKYzARBl5ca3HNaHIlzp_IXjs (the authors' OneDrive)",
                    "d824acb73957502b00efd559fc6cfbbb",
                    "recorded by torchgeo (datasets/resisc45.py history), not by the authors",
                ),
                Archive(
                    "NWPU-RESISC45.zip",
                    "https://hf.co/datasets/isaaccorley/resisc45/resolve/"
                    "883edc0eee77b2c84225472f10f126e3ed83fa6e/NWPU-RESISC45.zip (torchgeo's re-packing)",
                    "75206b2e16446591afa88e2628744886",
                    "recorded by torchgeo (datasets/resisc45.py)",
                ),
            ),
            "https://gcheng-nwpu.github.io/#Datasets",
            RESISC45_CLASSES,
            (
                torchgeo_split_set(
                    "resisc45",
                    {
                        "train": "b5a4c05a37de15e4ca886696a85c403e",
                        "val": "a0770cee4c5ca20b8c32bbd61e114805",
                        "test": "3dda9e4988b47eb1de9f07993653eb08",
                    },
                    {"train": 18900, "val": 6300, "test": 6300},
                    "https://hf.co/datasets/isaaccorley/resisc45/resolve/883edc0eee77b2c84225472f10f126e3ed83fa6e/",
                ),
                scalemae_split_set("resisc", {"train": 25200, "val": 6300}),
            ),
            "folders",
            "NWPU-RESISC45/<class>/<class>_<NNN>.jpg, 256 x 256 RGB JPEG, 45 classes x 700",
            "RESISC45 paper (Cheng et al. 2017); torchgeo datasets/resisc45.py and tests/data/resisc45; Scale-MAE "
            "mae/splits",
            class_counts=dict.fromkeys(RESISC45_CLASSES, 700),
            total=31500,
            notes=("the .rar cannot be read by Python: unpack it and give the folder, or give torchgeo's .zip",),
        ),
        Benchmark(
            "ucmerced",
            "UC Merced Land Use",
            "classification",
            (
                Archive(
                    "UCMerced_LandUse.zip",
                    "http://weegee.vision.ucmerced.edu/datasets/UCMerced_LandUse.zip",
                    "5b7ec56793786b6dc8a908e8854ac0e4",
                    "recorded by torchgeo (datasets/ucmerced.py), not by the authors",
                ),
            ),
            "http://weegee.vision.ucmerced.edu/datasets/landuse.html",
            UCMERCED_CLASSES,
            (
                torchgeo_split_set(
                    "uc_merced",
                    {
                        "train": "f2fb12eb2210cfb53f93f063a35ff374",
                        "val": "11ecabfc52782e5ea6a9c7c0d263aca0",
                        "test": "046aff88472d8fc07c4678d03749e28d",
                    },
                    {"train": 1260, "val": 420, "test": 420},
                    "https://hf.co/datasets/torchgeo/ucmerced/resolve/7c5ef3454d9b1cccfa7ccde0c01fc8f00a45909a/",
                ),
            ),
            "folders",
            "UCMerced_LandUse/Images/<class>/<class><NN>.tif, 256 x 256 RGB TIFF (a few are slightly smaller), "
            "21 classes x 100",
            "UC Merced paper (Yang & Newsam 2010); torchgeo datasets/ucmerced.py and tests/data/ucmerced",
            suffixes=(".tif",),
            class_counts=dict.fromkeys(UCMERCED_CLASSES, 100),
            total=2100,
        ),
        Benchmark(
            "whu-rs19",
            "WHU-RS19",
            "classification",
            (
                Archive(
                    "WHU-RS19.zip",
                    "https://captain-whu.github.io/BED4RS/ (links to the download)",
                    None,
                    "no checksum is published",
                ),
            ),
            "https://captain-whu.github.io/BED4RS/",
            WHU_RS19_CLASSES,
            (seeded_split_set(approx_total=1005),),
            "folders",
            "<root>/<Class>/<class>_<NN>.jpg, 600 x 600 RGB JPEG, 19 classes of about 50 images (1005 in all); "
            "class folder names as published (mixed case: footballField, railwayStation)",
            "WHU-RS19 papers (Dai & Yang 2010; Xia et al. 2010); class folder names from public readers of it; "
            "Scale-MAE "
            "mae/dataloaders/whurs.py (notes 4 images that are not 600 x 600)",
            total=1005,
            notes=(
                (
                    "Scale-MAE dropped 4 images that are not 600 x 600; they are kept here (the evaluation resizes "
                    "every "
                    "image)"
                ),
            ),
        ),
        Benchmark(
            "eurosat-rgb",
            "EuroSAT (RGB)",
            "classification",
            (
                Archive(
                    "EuroSAT.zip",
                    "https://madm.dfki.de/files/sentinel/EuroSAT.zip (folder 2750/)",
                    None,
                    "no checksum is published",
                ),
                Archive(
                    "EuroSAT_RGB.zip",
                    "https://zenodo.org/records/7711810 (folder EuroSAT_RGB/)",
                    None,
                    "Zenodo shows an md5 on the record page; it was not available to this project",
                ),
            ),
            "https://github.com/phelber/EuroSAT",
            tuple(sorted(EUROSAT_COUNTS)),
            EUROSAT_SPLIT_SETS,
            "folders",
            "<root>/<Class>/<Class>_<N>.jpg (N from 1), 64 x 64 RGB JPEG, 10 classes, 27,000 images",
            "EuroSAT papers (Helber et al. 2018, 2019); torchgeo datasets/eurosat.py; Scale-MAE mae/splits (class "
            "counts)",
            class_counts=EUROSAT_COUNTS,
            total=27000,
            notes=("split lists name .jpg files; they are matched by file stem, so they serve the 13-band files too",),
        ),
        Benchmark(
            "eurosat-ms",
            "EuroSAT (13-band Sentinel-2)",
            "classification",
            (
                Archive(
                    "EuroSATallBands.zip",
                    "https://madm.dfki.de/files/sentinel/EuroSATallBands.zip "
                    "(folder ds/images/remote_sensing/otherDatasets/sentinel_2/tif/)",
                    "5ac12b3b2557aa56e1826e981e8e200e",
                    "recorded by torchgeo (datasets/eurosat.py), not by the authors",
                ),
                Archive(
                    "EuroSAT_MS.zip",
                    "https://zenodo.org/records/7711810 (folder EuroSAT_MS/)",
                    None,
                    "Zenodo shows an md5 on the record page; it was not available to this project",
                ),
            ),
            "https://github.com/phelber/EuroSAT",
            tuple(sorted(EUROSAT_COUNTS)),
            EUROSAT_SPLIT_SETS,
            "folders",
            f"<root>/<Class>/<Class>_<N>.tif, 64 x 64 GeoTIFF, 13 bands uint16 ({' '.join(EUROSAT_BANDS)}), 10 "
            "classes, 27,000 images",
            "EuroSAT papers; torchgeo datasets/eurosat.py and tests/data/eurosat (folder, band count)",
            suffixes=(".tif",),
            class_counts=EUROSAT_COUNTS,
            total=27000,
            protocol={"in_chans": 13},
            notes=(
                (
                    "band order in the files: B8A last (phelber/EuroSAT#7, torchgeo#2458), not after B08 as the "
                    "EuroSAT paper "
                    "lists it; --bands selects by this order"
                ),
                "read with --in_chans 13 and --band_stats FILE from tools/band_stats.py on the training manifest",
            ),
        ),
        Benchmark(
            "potsdam",
            "ISPRS Potsdam (2D semantic labelling)",
            "segmentation",
            (
                Archive(
                    "2_Ortho_RGB.zip",
                    "https://www.isprs.org/education/benchmarks/UrbanSemLab/2d-sem-label-potsdam.aspx "
                    "(request form; also inside Potsdam.zip)",
                    None,
                    "no checksum is published",
                ),
                Archive(
                    "5_Labels_all.zip",
                    "as above",
                    None,
                    "no checksum is published (torchgeo records a truncated, unusable value)",
                ),
                Archive("5_Labels_all_noBoundary.zip", "as above", None, "no checksum is published"),
            ),
            "https://www.isprs.org/education/benchmarks/UrbanSemLab/2d-sem-label-potsdam.aspx",
            ISPRS_CLASSES,
            (
                SplitSet(
                    "official",
                    ("train", "test"),
                    "test",
                    ISPRS_SPLIT,
                    counts={"train": 24, "test": 14},
                    count_unit="tiles",
                    approx_counts={"train": 3456, "test": 14},
                ),
            ),
            "isprs",
            "2_Ortho_RGB.zip: top_potsdam_<i>_<j>_RGB.tif (6000 x 6000, 8-bit RGB, 5 cm); 5_Labels_all.zip: "
            "top_potsdam_<i>_<j>_label.tif (RGB colour-coded); 5_Labels_all_noBoundary.zip: "
            "top_potsdam_<i>_<j>_label_noBoundary.tif "
            "(eroded: boundary pixels black); these zips may sit inside Potsdam.zip or a folder",
            "ISPRS benchmark pages; torchgeo datasets/potsdam.py (tile lists, file names); mmsegmentation "
            "tools/dataset_converters/potsdam.py (RGB tiles, noBoundary labels, 512 crops)",
            suffixes=(".tif",),
            protocol=ISPRS_PROTOCOL,
            approx_eval_size=(6000, 6000),
            notes=(
                (
                    "24 training tiles give 3,456 crops of 512 x 512 (144 per tile), the count mmsegmentation's "
                    "converter writes"
                ),
            ),
        ),
        Benchmark(
            "vaihingen",
            "ISPRS Vaihingen (2D semantic labelling)",
            "segmentation",
            (
                Archive(
                    "ISPRS_semantic_labeling_Vaihingen.zip",
                    "https://www.isprs.org/education/benchmarks/UrbanSemLab/semantic-labeling.aspx (request form)",
                    "462b8dca7b6fa9eaf729840f0cdfc7f3",
                    "recorded by torchgeo (datasets/vaihingen.py), not by ISPRS",
                ),
                Archive(
                    "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip",
                    "as above",
                    "4802dd6326e2727a352fb735be450277",
                    "recorded by torchgeo (datasets/vaihingen.py), not by ISPRS",
                ),
                Archive(
                    "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip",
                    "as above",
                    None,
                    "no checksum is published",
                ),
            ),
            "https://www.isprs.org/education/benchmarks/UrbanSemLab/semantic-labeling.aspx",
            ISPRS_CLASSES,
            (
                SplitSet(
                    "official",
                    ("train", "test"),
                    "test",
                    ISPRS_SPLIT,
                    counts={"train": 16, "test": 17},
                    count_unit="tiles",
                    approx_counts={"train": 344, "test": 17},
                ),
            ),
            "isprs",
            "ISPRS_semantic_labeling_Vaihingen.zip: top/top_mosaic_09cm_area<N>.tif (about 2000 x 2500, 8-bit IRRG "
            "false colour, 9 cm) and gts_for_participants/top_mosaic_09cm_area<N>.tif (full reference of the training "
            "tiles); "
            "..._ground_truth_COMPLETE.zip: top_mosaic_09cm_area<N>.tif (full reference, all tiles); "
            "..._ground_truth_eroded_COMPLETE.zip: top_mosaic_09cm_area<N>_noBoundary.tif",
            "ISPRS benchmark pages; torchgeo datasets/vaihingen.py (tile lists, zip layout); mmsegmentation "
            "tools/dataset_converters/vaihingen.py (eroded zip, 512 crops)",
            suffixes=(".tif",),
            protocol=ISPRS_PROTOCOL,
            approx_eval_size=(2000, 2500),
            notes=(
                (
                    "IRRG tiles go in as they are: near-infrared in the red slot of RGB-pretrained weights, as in "
                    "every "
                    "published Vaihingen result"
                ),
            ),
        ),
        Benchmark(
            "loveda",
            "LoveDA (semantic segmentation)",
            "segmentation",
            (
                Archive(
                    "Train.zip",
                    "https://zenodo.org/records/5706578/files/Train.zip",
                    "de2b196043ed9b4af1690b3f9a7d558f",
                    "recorded by torchgeo (datasets/loveda.py) from the Zenodo record",
                ),
                Archive(
                    "Val.zip",
                    "https://zenodo.org/records/5706578/files/Val.zip",
                    "84cae2577468ff0b5386758bb386d31d",
                    "recorded by torchgeo (datasets/loveda.py) from the Zenodo record",
                ),
                Archive(
                    "Test.zip",
                    "https://zenodo.org/records/5706578/files/Test.zip",
                    "a489be0090465e01fb067795d24e6b47",
                    "recorded by torchgeo (datasets/loveda.py); no masks: not used",
                ),
            ),
            "https://github.com/Junjue-Wang/LoveDA",
            LOVEDA_CLASSES,
            (
                SplitSet(
                    "official",
                    ("train", "val"),
                    "val",
                    "LoveDA's Train and Val folders, urban and rural together (the test masks are not public)",
                    counts={"train": 2522, "val": 1669},
                ),
                SplitSet("urban", ("train", "val"), "val", "LoveDA's Train and Val folders, Urban only"),
                SplitSet("rural", ("train", "val"), "val", "LoveDA's Train and Val folders, Rural only"),
            ),
            "loveda",
            "Train.zip: Train/{Urban,Rural}/{images_png,masks_png}/<n>.png (1024 x 1024 RGB; masks: 0 no-data, "
            "1 background ... 7 agriculture); Val.zip the same under Val/",
            "LoveDA paper (Wang et al. 2021) and github.com/Junjue-Wang/LoveDA; torchgeo datasets/loveda.py and "
            "tests/data/loveda; "
            "mmsegmentation tools/dataset_converters/loveda.py",
            suffixes=(".png",),
            approx_eval_size=(1024, 1024),
            protocol={"palette": "none", "reduce_zero_label": True, "class_names": list(LOVEDA_CLASSES)},
            notes=(
                (
                    "masks are kept as published (0 = no data); --reduce_zero_label makes 0 the ignore index and 1..7 "
                    "the "
                    "classes 0..6"
                ),
            ),
        ),
    )
}


# --- reading -------------------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """What a reader wrote: manifests and counts, for ``summary.json``."""

    split_sets: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)

    write_atomically(path, write)


def split_record(split_set: SplitSet, counts: Mapping[str, Mapping[str, object]]) -> dict:
    """``summary.json``'s entry of one split set: its manifests, counts per split beside the published ones."""
    published = dict(split_set.counts) if split_set.counts else None
    return {
        "source": split_set.source,
        "evaluation": split_set.evaluation,
        "manifests": {split: manifest_name(split_set.name, split) for split in counts},
        "counts": {split: dict(c) for split, c in counts.items()},
        "published": published,
        "count_unit": split_set.count_unit,
        "matches_published": None
        if published is None
        else all(counts.get(split, {}).get(split_set.count_unit) == n for split, n in published.items()),
    }


def read_list(path: Path) -> list[str]:
    """The file stems a split list names (one name per line; ``./class/name.jpg`` and ``name.jpg`` alike)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        lines = raw.decode().splitlines()
    except (OSError, UnicodeDecodeError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read the split list ({e})") from None
    return [Path(line.strip()).stem for line in lines if line.strip()]


def list_md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def split_of_file(path: Path, splits: Sequence[str]) -> str:
    """The split a user-supplied list is for, from its name (``resisc45-train.txt`` -> ``train``)."""
    match = re.search(r"[-_](" + "|".join(splits) + r")\.txt$", path.name)
    if not match:
        raise DataError(f"--split_file {path}: its name must end in -{'.txt, -'.join(splits)}.txt, to tell its split")
    return match.group(1)


class Classification:
    """Images in class folders (``folders``) or fMoW's train/val trees (``fmow``) -> CSV manifests."""

    def __init__(self, bench: Benchmark, source: Source, output: Path, in_place: bool) -> None:
        self.bench, self.source, self.output, self.in_place = bench, source, output, in_place

    def find(self) -> dict[str, list[tuple[str, Member]]]:
        """{split or 'all': [(class name, member)]}, sorted."""
        if self.bench.reader == "fmow":
            return self._find_fmow()
        classes, found, seen = set(self.bench.classes), defaultdict(list), {}
        for member in self.source:
            name = member.parent.rsplit("/", 1)[-1]
            if name in classes and member.basename.lower().endswith(self.bench.suffixes):
                key = (name, member.basename)
                if key in seen:
                    raise DataError(
                        f"{self.bench.name}: {member.basename} of class {name} appears twice ({seen[key]} and "
                        f"{member.path}); give one copy of the data set as --archive"
                    )
                seen[key] = member.path
                found["all"].append((name, member))
        missing = sorted(classes - {name for name, _ in found["all"]})
        if missing:
            raise DataError(
                f"{self.bench.name}: no {'/'.join(self.bench.suffixes)} images in class folder(s) "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} in the --archive given; expected "
                f"layout: {self.bench.layout}"
            )
        return {"all": sorted(found["all"], key=lambda item: (item[0], item[1].basename))}

    def _find_fmow(self) -> dict[str, list[tuple[str, Member]]]:
        pattern = re.compile(r"(?:^|/)(train|val)/([^/]+)/\2_(\d+)/\2_\3_(\d+)_rgb\.jpg$")
        categories, found, skipped, unknown = set(self.bench.classes), defaultdict(list), Counter(), set()
        for member in self.source:
            match = pattern.search(member.path)
            if not match:
                continue
            split, category = match.group(1), match.group(2)
            if category == FMOW_SKIPPED:
                skipped[split] += 1
            elif category in categories:
                found[split].append((category, member))
            else:
                unknown.add(category)
        if unknown:
            raise DataError(
                f"fmow-rgb: unknown categor{'ies' if len(unknown) > 1 else 'y'} {', '.join(sorted(unknown))} "
                "(not among fMoW's 62)"
            )
        if not found["train"] or not found["val"]:
            raise DataError(
                f"fmow-rgb: no {'training' if not found['train'] else 'validation'} images found; expected "
                f"layout: {self.bench.layout}"
            )
        self.skipped = skipped
        return {split: sorted(items, key=lambda item: item[1].path) for split, items in found.items()}

    def destination(self, member: Member) -> Path:
        if self.bench.reader == "fmow":
            match = re.search(r"(?:^|/)((?:train|val)/.*)$", member.path)
            return self.output / "images" / match.group(1)
        return self.output / "images" / member.parent.rsplit("/", 1)[-1] / member.basename

    def run(self, split_files: Sequence[Path], verify_lists: bool) -> Prepared:
        if split_files and self.bench.reader == "fmow":
            raise DataError("--split_file: fmow-rgb has no split lists to give (its split is the official one)")
        found = self.find()
        members = [member for items in found.values() for _, member in items]
        files = materialize(members, self.destination, self.in_place, f"{self.bench.name}: images")
        label = {name: index for index, name in enumerate(self.bench.classes)}
        prepared = Prepared()

        def rows(items, csv_path: Path) -> list[tuple[int, str, str]]:
            return [(label[name], relative(files[m.path], csv_path.parent), name) for name, m in items]

        def record(split_set: SplitSet, splits: dict[str, list[tuple[str, Member]]]) -> None:
            counts = {}
            for split, items in splits.items():
                path = self.output / manifest_name(split_set.name, split)
                write_csv(path, ("label", "path", "class_name"), sorted(rows(items, path)))
                counts[split] = {"images": len(items), "per_class": dict(sorted(Counter(n for n, _ in items).items()))}
            prepared.split_sets[split_set.name] = split_record(split_set, counts)

        if self.bench.reader == "fmow":
            record(self.bench.split_sets[0], found)
            prepared.notes.append(
                f"left out {sum(self.skipped.values())} images of category {FMOW_SKIPPED} ({dict(self.skipped)})"
            )
            prepared.extra["all_images"] = sum(len(v) for v in found.values())
            return prepared
        everything = found["all"]
        per_class = Counter(name for name, _ in everything)
        prepared.extra["all"] = {
            "manifest": "all.csv",
            "images": len(everything),
            "per_class": dict(sorted(per_class.items())),
            "published_total": self.bench.total,
            "published_per_class": dict(self.bench.class_counts) if self.bench.class_counts else None,
        }
        path = self.output / "all.csv"
        write_csv(path, ("label", "path", "class_name"), sorted(rows(everything, path)))
        by_stem = {}
        for name, member in everything:
            stem = Path(member.basename).stem
            if stem in by_stem:
                raise DataError(
                    f"{self.bench.name}: two images with the file name {stem}.* ({by_stem[stem][1].path}, "
                    f"{member.path}); split lists name images by file name"
                )
            by_stem[stem] = (name, member)
        given = list(split_files)
        for split_set in self.bench.split_sets:
            if split_set.lists:  # shipped lists: an archive they do not fit still gets its other split sets
                try:
                    record(
                        split_set,
                        self._apply_lists(split_set, {s: SPLITS / rel for s, rel in split_set.lists.items()}, by_stem),
                    )
                except DataError as e:
                    prepared.notes.append(f"split set {split_set.name}: not written: {e}")
                continue
            if split_set.list_md5s is None:  # no published split: ours
                record(split_set, seeded_split(everything, split_set.splits))
                continue
            lists = self._user_lists(split_set, given, verify_lists)
            if lists is None:
                prepared.notes.append(
                    f"split set {split_set.name}: not written; give its lists "
                    f"({', '.join(split_set.list_md5s)}) with --split_file (source: {split_set.source})"
                )
                continue
            record(split_set, self._apply_lists(split_set, lists, by_stem))
        if given:
            raise DataError(f"--split_file {given[0]}: not a list of any split set of {self.bench.name}")
        return prepared

    def _user_lists(self, split_set: SplitSet, given: list[Path], verify: bool) -> dict[str, Path] | None:
        mine = [p for p in given if p.name in split_set.list_md5s]
        if not mine:
            return None
        lists = {}
        for path in mine:
            given.remove(path)
            if verify and list_md5(path) != split_set.list_md5s[path.name]:
                raise DataError(
                    f"--split_file {path}: md5 {list_md5(path)} differs from {split_set.list_md5s[path.name]} "
                    "recorded by torchgeo (--no_verify skips this check)"
                )
            lists[split_of_file(path, split_set.splits)] = path
        missing = [s for s in split_set.splits if s not in lists]
        if missing:
            raise DataError(
                f"--split_file: the {split_set.name} split set needs a list per split; missing "
                f"{', '.join(missing)} ({', '.join(split_set.list_md5s)})"
            )
        return lists

    def _apply_lists(self, split_set: SplitSet, lists: Mapping[str, Path], by_stem: dict) -> dict[str, list]:
        assigned: dict[str, str] = {}
        splits = {}
        for split in split_set.splits:
            stems = read_list(lists[split])
            unknown = [s for s in stems if s not in by_stem]
            if unknown:
                raise DataError(
                    f"{lists[split]}: {len(unknown)} of its {len(stems)} images are not in the --archive given "
                    f"(first: {unknown[0]}); an incomplete download, or the list of another data set"
                )
            for stem in stems:
                if stem in assigned:
                    raise DataError(f"{lists[split]}: {stem} is listed twice (also in the {assigned[stem]} list)")
                assigned[stem] = split
            splits[split] = sorted((by_stem[s] for s in stems), key=lambda item: (item[0], item[1].basename))
        return splits


def seeded_split(
    items: Sequence[tuple[str, Member]],
    splits: Sequence[str],
    fractions: tuple[float, ...] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> dict[str, list]:
    """Per class: file names sorted, shuffled by ``numpy.random.default_rng(seed)`` (one generator for the whole set,
    classes in sorted order), the first round(f0 * n) to the first split, the next round(f1 * n) to the second, the
    rest to the last."""
    rng = np.random.default_rng(seed)
    by_class = defaultdict(list)
    for name, member in items:
        by_class[name].append((name, member))
    out = {split: [] for split in splits}
    for name in sorted(by_class):
        members = sorted(by_class[name], key=lambda item: item[1].basename)
        order = rng.permutation(len(members))
        cut1 = round(fractions[0] * len(members))
        cut2 = cut1 + round(fractions[1] * len(members))
        for position, index in enumerate(order):
            split = splits[0] if position < cut1 else splits[1] if position < cut2 else splits[2]
            out[split].append(members[index])
    return {split: sorted(v, key=lambda item: (item[0], item[1].basename)) for split, v in out.items()}


# --- ISPRS ----------------------------------------------------------------------------------------------------------


def isprs_crop_boxes(height: int, width: int, crop: int = CROP, step: int = CROP_STEP) -> list[tuple[int, int]]:
    """(y, x) origins of the training crops: every ``step`` px, the last row / column flush with the border; a side
    shorter than ``crop`` gives one crop of the whole side.

    This is the grid mmsegmentation's ISPRS converters write: they take ``--stride_size 256`` but place boxes at
    multiples of the clip size (``xmin = x * clip_size``), so a 6000-px Potsdam tile gives 12 x 12 = 144 crops.
    """

    def starts(size: int) -> list[int]:
        if size <= crop:
            return [0]
        out = list(range(0, size - crop + 1, step))
        return out if out[-1] == size - crop else out + [size - crop]

    return [(y, x) for y in starts(height) for x in starts(width)]


def isprs_files(bench: Benchmark, source: Source) -> dict[str, dict[str, Member]]:
    """{tile: {"image", "label", "eroded"}: member}, for the tiles of the official lists."""
    if bench.name == "potsdam":
        kinds = {
            "image": re.compile(r"^top_potsdam_(\d+_\d+)_RGB\.tif$"),
            "label": re.compile(r"^top_potsdam_(\d+_\d+)_label\.tif$"),
            "eroded": re.compile(r"^top_potsdam_(\d+_\d+)_label_noBoundary\.tif$"),
        }
    else:
        kinds = {
            "image": re.compile(r"^top_mosaic_09cm_(area\d+)\.tif$"),
            "label": re.compile(r"^top_mosaic_09cm_(area\d+)\.tif$"),
            "eroded": re.compile(r"^top_mosaic_09cm_(area\d+)_noBoundary\.tif$"),
        }
    files: dict[str, dict[str, Member]] = defaultdict(dict)
    for member in sorted(source, key=lambda m: m.path):
        for kind, pattern in kinds.items():
            match = pattern.match(member.basename)
            if not match:
                continue
            if bench.name == "vaihingen" and kind in ("image", "label"):
                in_top = member.parent.rsplit("/", 1)[-1] == "top"  # images lie in top/, full references elsewhere
                if in_top != (kind == "image"):
                    continue
            files[match.group(1)].setdefault(kind, member)
    return files


class Isprs:
    """ISPRS Potsdam / Vaihingen: training tiles -> 512 x 512 crops with the full reference; test tiles whole with
    the eroded reference; colour labels -> class-index PNGs (palette ``isprs``, unknown colours -> 255)."""

    def __init__(self, bench: Benchmark, source: Source, output: Path, in_place: bool) -> None:
        self.bench, self.source, self.output, self.in_place = bench, source, output, in_place

    def run(self, split_files: Sequence[Path], verify_lists: bool) -> Prepared:
        from util.data.segmentation import ISPRS, rgb_to_index, write_mask
        from util.run.logger import progress

        if split_files:
            raise DataError(
                f"--split_file: {self.bench.name} has no split lists to give (its split is the official one)"
            )
        train, test = (
            (POTSDAM_TRAIN, POTSDAM_TEST) if self.bench.name == "potsdam" else (VAIHINGEN_TRAIN, VAIHINGEN_TEST)
        )
        files = isprs_files(self.bench, self.source)
        needed = [(tile, "train", "label") for tile in train] + [(tile, "test", "eroded") for tile in test]
        missing = [
            f"{tile} {kind}" for tile, _, ref in needed for kind in ("image", ref) if kind not in files.get(tile, {})
        ]
        if missing:
            raise DataError(
                f"{self.bench.name}: {len(missing)} file(s) of the official tiles are missing from the --archive "
                f"given (first: {missing[0]}); expected layout: {self.bench.layout}"
            )
        tiles = materialize(
            [files[t][k] for t, _, ref in needed for k in ("image", ref)],
            lambda m: self.output / ".cache" / "tiles" / m.path,
            self.in_place,  # Vaihingen: one name, two files
            f"{self.bench.name}: tiles",
        )
        rows: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
        sizes: dict[str, dict[str, list[int]]] = {"train": {}, "test": {}}
        for tile, split, ref in progress(needed, f"{self.bench.name}: cutting tiles", unit="tile"):
            image_path, label_path = tiles[files[tile]["image"].path], tiles[files[tile][ref].path]
            with Image.open(image_path) as image:
                size = image.size  # (width, height), read from the header only
            boxes = isprs_crop_boxes(size[1], size[0]) if split == "train" else [None]
            outputs = [
                (self.output / split / kind / (f"{tile}.png" if box is None else f"{tile}_{box[0]}_{box[1]}.png"))
                for box in boxes
                for kind in ("images", "masks")
            ]
            sizes[split][tile] = [size[1], size[0]]
            if not all(p.is_file() for p in outputs):  # a tile already cut (resume) is not decoded again
                image = read_tile(image_path, "RGB")
                label = rgb_to_index(read_tile(label_path, "RGB"), ISPRS)
                if label.shape != image.shape[:2]:
                    raise DataError(
                        f"{label_path}: {label.shape[1]} x {label.shape[0]} px, its image {image_path} "
                        f"{image.shape[1]} x {image.shape[0]} px"
                    )
                for box in boxes:
                    name = f"{tile}.png" if box is None else f"{tile}_{box[0]}_{box[1]}.png"
                    window = (
                        (slice(None), slice(None))
                        if box is None
                        else (slice(box[0], box[0] + CROP), slice(box[1], box[1] + CROP))
                    )
                    write_atomically(
                        self.output / split / "images" / name,
                        lambda tmp, a=image[window]: Image.fromarray(a).save(tmp, format="PNG"),
                    )
                    write_atomically(
                        self.output / split / "masks" / name,
                        lambda tmp, a=label[window]: write_png_mask(tmp, a, write_mask, ISPRS),
                    )
            for box in boxes:
                name = f"{tile}.png" if box is None else f"{tile}_{box[0]}_{box[1]}.png"
                rows[split].append((f"{split}/images/{name}", f"{split}/masks/{name}"))
        prepared = Prepared()
        split_set = self.bench.split_sets[0]
        for split, pairs in rows.items():
            write_csv(self.output / manifest_name(split_set.name, split), ("image_path", "mask_path"), pairs)
        counts = {
            "train": {"images": len(rows["train"]), "tiles": len(train)},
            "test": {"images": len(rows["test"]), "tiles": len(test)},
        }
        prepared.split_sets[split_set.name] = split_record(split_set, counts)
        prepared.extra["tile_sizes"] = sizes  # per split, [height, width] per tile (budgets: sliding windows)
        return prepared


def read_tile(path: Path, mode: str) -> np.ndarray:
    """A tile as a uint8 [H, W, 3] array."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read the tile ({e})") from None


def write_png_mask(tmp: str, mask: np.ndarray, write_mask: Callable, palette) -> None:
    """``util.data.segmentation.write_mask`` into the atomic writer's temporary file (it wants a .png name)."""
    staging = tmp + ".png"
    write_mask(staging, mask, palette)
    os.replace(staging, tmp)


# --- LoveDA ---------------------------------------------------------------------------------------------------------


class LoveDA:
    """LoveDA's Train / Val folders: image / mask pairs per domain, masks kept as published."""

    PATTERN = re.compile(r"(?:^|/)(Train|Val)/(Urban|Rural)/(images_png|masks_png)/([^/]+\.png)$")

    def __init__(self, bench: Benchmark, source: Source, output: Path, in_place: bool) -> None:
        self.bench, self.source, self.output, self.in_place = bench, source, output, in_place

    def run(self, split_files: Sequence[Path], verify_lists: bool) -> Prepared:
        if split_files:
            raise DataError("--split_file: loveda has no split lists to give (its split is the official one)")
        found: dict[tuple[str, str, str], dict[str, Member]] = defaultdict(dict)
        for member in self.source:
            match = self.PATTERN.search(member.path)
            if match:
                split, domain, kind, name = match.groups()
                if name in found[split, domain, kind]:
                    raise DataError(f"loveda: {split}/{domain}/{kind}/{name} appears twice; give one copy as --archive")
                found[split, domain, kind][name] = member
        pairs = {}
        for split in ("Train", "Val"):
            for domain in ("Urban", "Rural"):
                images, masks = found[split, domain, "images_png"], found[split, domain, "masks_png"]
                if not images:
                    raise DataError(
                        f"loveda: no images in {split}/{domain}/images_png; expected layout: {self.bench.layout}"
                    )
                unmatched = sorted(set(images) ^ set(masks))
                if unmatched:
                    raise DataError(
                        f"loveda: {split}/{domain}: {len(unmatched)} image(s) without a mask or masks without "
                        f"an image (first: {unmatched[0]})"
                    )
                pairs[split, domain] = [(images[n], masks[n]) for n in sorted(images, key=natural_key)]
        members = [m for items in pairs.values() for pair in items for m in pair]
        files = materialize(
            members,
            lambda m: self.output / "images" / re.search(self.PATTERN, m.path).group(0).lstrip("/"),
            self.in_place,
            "loveda: images",
        )
        prepared = Prepared()
        for split_set in self.bench.split_sets:
            domains = ("Urban", "Rural") if split_set.name == "official" else (split_set.name.capitalize(),)
            counts = {}
            for split, folder in (("train", "Train"), ("val", "Val")):
                path = self.output / manifest_name(split_set.name, split)
                rows = [
                    (relative(files[i.path], path.parent), relative(files[m.path], path.parent))
                    for domain in domains
                    for i, m in pairs[folder, domain]
                ]
                write_csv(path, ("image_path", "mask_path"), rows)
                counts[split] = {"images": len(rows), **{d.lower(): len(pairs[folder, d]) for d in domains}}
            prepared.split_sets[split_set.name] = split_record(split_set, counts)
        return prepared


def natural_key(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


READERS = {"folders": Classification, "fmow": Classification, "isprs": Isprs, "loveda": LoveDA}


def prepare(
    bench: Benchmark,
    source: Source,
    output: Path,
    split_files: Sequence[Path] = (),
    in_place: bool = True,
    verify_lists: bool = True,
    checksum_notes: Sequence[str] = (),
) -> dict:
    """Read ``source`` and write the manifests and ``summary.json`` into ``output``; returns the summary.

    Raises:
        DataError: the archive is not this data set's layout, files are missing, split lists do not fit.
    """
    output.mkdir(parents=True, exist_ok=True)
    prepared = READERS[bench.reader](bench, source, output, in_place).run(list(split_files), verify_lists)
    summary = {
        "benchmark": bench.name,
        "title": bench.title,
        "task": bench.task,
        "classes": list(bench.classes),
        "homepage": bench.homepage,
        "layout": bench.layout,
        "layout_sources": bench.sources,
        "inputs": sorted({m.path.split("/", 1)[0] for m in source}),
        "checksums": list(checksum_notes),
        "split_sets": prepared.split_sets,
        "protocol": dict(bench.protocol),
        **prepared.extra,
        "notes": list(bench.notes) + prepared.notes,
        "files_in_place": in_place and any(m.local_path() is not None for m in source),
    }
    write_atomically(output / SUMMARY, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1) + "\n"))
    return summary


def published_count_problems(summary: Mapping) -> list[str]:
    """Differences between the counts written and the published ones, one line each (empty: none, or none published)."""
    problems = []
    every = summary.get("all")
    if every and every.get("published_total") is not None and every["images"] != every["published_total"]:
        problems.append(f"{every['images']} images, published {every['published_total']}")
    if every and every.get("published_per_class"):
        wrong = {c: n for c, n in every["per_class"].items() if every["published_per_class"].get(c) != n}
        if wrong:
            name, count = next(iter(wrong.items()))
            problems.append(
                f"{len(wrong)} class(es) differ from the published per-class counts (first: {name} has "
                f"{count}, published {every['published_per_class'].get(name)})"
            )
    for name, split_set in summary.get("split_sets", {}).items():
        if split_set.get("matches_published") is False:
            unit = split_set["count_unit"]
            found = {split: counts.get(unit) for split, counts in split_set["counts"].items()}
            problems.append(f"split set {name}: {unit} {found}, published {split_set['published']}")
    return problems
