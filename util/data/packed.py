"""Pre-decoded images in one memory-mapped array (``tools/preprocess.py --pack``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from util.data.loaders import PredecodedDataset
from util.data.raster_options import PACKED_DTYPES, RasterOptions, check_predecoded, predecoded_image
from util.errors import DataError, first_line
from util.run.rng import seeded

LAYOUTS = {"CHW": "[count, bands, size, size]", "HWC": "[count, size, size, bands]"}  # the JSON's "layout" -> shape
LAYOUT = "CHW"  # what tools/preprocess.py --pack writes: a batch is one fancy index, no transposing copy


class PackedDataset(PredecodedDataset):
    """Pre-decoded images written by ``tools/preprocess.py --pack``, memory-mapped: uint8 or uint16, any band count
    (the JSON's ``dtype`` / ``bands``; older files: uint8 RGB), stored band-first [N, C, S, S] (the JSON's
    ``"layout": "CHW"``) or, in files written before it (no ``layout``), band-last [N, S, S, C] (``"HWC"``).

    Items are uint8 / uint16 tensors [C, S, S] for ``BatchAugment`` to crop, flip and normalise on the device, and a
    DataLoader's batch is one fancy index of the array into one tensor [B, C, S, S] (``PredecodedDataset``; band-last
    files: one transposing copy per batch); with a ``transform`` set, each image goes through it instead (the general,
    slower path): as a PIL image for 8-bit RGB, as a float32 [C, S, S] tensor (no-data filled,
    ``RasterOptions.finish``) with ``raster`` options.

    Raises:
        DataError: a malformed JSON, an array of the wrong size, or bands / sample type the run's flags do not fit
            (multispectral or 16-bit arrays need ``raster`` options: --in_chans / --band_stats).
    """

    def __init__(self, meta_path: Path, transform: Callable | None = None, raster: RasterOptions | None = None) -> None:
        try:
            meta = json.loads(meta_path.read_text())
            self.size, count, self.targets = meta["size"], meta["count"], list(meta["labels"])
            self.array_path = meta_path.parent / meta["array"]
            self.dtype, self.bands, self.nodata = meta.get("dtype", "uint8"), meta.get("bands", 3), meta.get("nodata")
            self.layout = meta.get("layout", "HWC")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(
                f"{meta_path}: not a packed-dataset description ({type(e).__name__}: {first_line(e)})"
            ) from None
        for key, value in (("size", self.size), ("count", count), ("bands", self.bands)):
            if type(value) is not int or value < 1:
                raise DataError(f"{meta_path}: key {key!r} must be a positive integer, got {value!r}")
        if self.dtype not in PACKED_DTYPES:
            raise DataError(f"{meta_path}: key 'dtype' must be one of {', '.join(PACKED_DTYPES)}, got {self.dtype!r}")
        if self.layout not in LAYOUTS:
            raise DataError(f"{meta_path}: key 'layout' must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.nodata is not None and type(self.nodata) not in (int, float):
            raise DataError(f"{meta_path}: key 'nodata' must be a number or null, got {self.nodata!r}")
        bad = next((label for label in self.targets if type(label) is not int or label < -1), None)
        if bad is not None:
            raise DataError(f"{meta_path}: key 'labels' must hold integer class indices (or -1), found {bad!r}")
        if not isinstance(meta["array"], str) or Path(meta["array"]).name != meta["array"]:
            raise DataError(f"{meta_path}: key 'array' must be a file name next to it, got {meta['array']!r}")
        expected = count * self.size * self.size * self.bands * np.dtype(self.dtype).itemsize
        actual = self.array_path.stat().st_size if self.array_path.is_file() else -1
        if actual != expected or len(self.targets) != count:
            raise DataError(
                f"{self.array_path}: expected {expected} bytes for {count} images of {self.size} px x "
                f"{self.bands} band(s) of {self.dtype}, found {actual}"
            )
        check_predecoded(meta_path, self.bands, self.dtype, self.nodata, raster)
        self.raster = raster
        self.transform = transform
        self.classes: list[str] = []
        self.label_names = {label: str(label) for label in sorted(set(self.targets))}
        self.source = str(meta_path)
        self.samples = [(f"{self.array_path}[{i}]", label) for i, label in enumerate(self.targets)]
        self._images: np.ndarray | None = None  # opened lazily, once per worker process

    def __len__(self) -> int:
        return len(self.targets)

    def _array(self) -> np.ndarray:
        """The memory-mapped array, [N, C, S, S] or [N, S, S, C] as ``layout`` says."""
        if self._images is None:
            side = (self.size, self.size)
            shape = (self.bands, *side) if self.layout == "CHW" else (*side, self.bands)
            self._images = np.memmap(self.array_path, dtype=self.dtype, mode="r").reshape(len(self), *shape)
        return self._images

    def read_into(self, indices: list[int], out: np.ndarray) -> None:
        images = self._array()
        if self.layout == "CHW":  # mode "clip": no buffered copy ("raise" buffers ``out``); indices checked already
            np.take(images, indices, axis=0, out=out, mode="clip")
        else:
            out[...] = np.take(images, indices, axis=0).transpose(0, 3, 1, 2)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        pixels = np.array(self._array()[index])  # [C, S, S] or [S, S, C]
        if self.layout == "HWC":
            pixels = np.moveaxis(pixels, -1, 0)
        if self.transform is None:
            return torch.from_numpy(pixels), self.targets[index]
        image = predecoded_image(pixels, self.raster, self.nodata, self.describe(index))
        with seeded(seed) if seed is not None else nullcontext():
            return self.transform(image), self.targets[index]

    def describe(self, index: int) -> str:
        return self.samples[index][0]
