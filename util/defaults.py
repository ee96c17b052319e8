"""Values the command lines show in ``--help`` (choices, default paths, normalisation statistics), in a module
that imports no torch, so that ``--help`` and flag errors answer before torch, timm and matplotlib load.

``util.datasets``, ``util.transforms`` and ``util.knn`` re-export them under their usual names.
"""
from __future__ import annotations

from pathlib import Path

DATASET_TYPES = ("auto", "fmow_rgb", "csv", "imagefolder", "folder", "coco", "packed", "shards")
DEFAULT_TRAIN_CSV = Path(__file__).resolve().parent.parent / "data" / "sentinel2_rgb" / "train.csv"
DEFAULT_VAL_CSV = DEFAULT_TRAIN_CSV.with_name("val.csv")

FMOW_RGB_MEAN = (0.43392888, 0.43578541, 0.40744025)
FMOW_RGB_STD = (0.19828456, 0.19250111, 0.19454683)

# Images declaring more pixels are refused (``--max_image_pixels``): a tiny PNG can declare 10^10 pixels and
# exhaust memory when decoded. The default admits a full Sentinel-2 tile (10980^2 ~ 120 Mpx).
MAX_IMAGE_PIXELS = 250_000_000

KNN_SCALE_MODES = ("resize", "native")
KNN_POOLS = ("cls", "mean")
