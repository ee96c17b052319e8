"""Decoding image files to 8-bit RGB."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from util.defaults import MAX_IMAGE_PIXELS
from util.errors import DataError, first_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
_max_pixels = MAX_IMAGE_PIXELS
# Our own check below refuses what PIL would only warn about (between 1x and 2x its limit)
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


class BadImageError(DataError):
    """An image file that cannot be decoded (any decoder failure); ``reason`` is the decoder's one-line message."""

    def __init__(self, path, reason: str) -> None:
        super().__init__(f"{path}: cannot read image ({reason})")
        self.path, self.reason = str(path), reason


def set_max_image_pixels(limit: float | None) -> None:
    """The pixel limit of ``load_image`` in this process (``Image.MAX_IMAGE_PIXELS`` too); datasets carry it into
    DataLoader workers (``max_image_pixels``)."""
    global _max_pixels
    _max_pixels = int(limit) if limit else MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = _max_pixels


def max_image_pixels() -> int:
    return _max_pixels


Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def is_image(path: Path) -> bool:
    """A file whose extension is one of ``IMAGE_EXTENSIONS`` (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; 16-bit and float images are stretched from their 1st to 99th percentile."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(img, dtype=np.float32)
        low, high = np.percentile(values, [1, 99])
        values = np.clip((values - low) / max(high - low, 1e-6), 0, 1) * 255
        img = Image.fromarray(values.round().astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path: str, draft_size: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Decode ``path`` to RGB. JPEGs larger than ``draft_size`` are decoded at a reduced scale (PIL draft).

    Raises:
        BadImageError: for any failure of the decoder (corrupt, truncated, not an image, declaring more than
            ``max_pixels`` (default: ``--max_image_pixels``) pixels), with the file and the decoder's reason.
    """
    limit = max_pixels or _max_pixels
    if Image.MAX_IMAGE_PIXELS != limit:
        Image.MAX_IMAGE_PIXELS = limit
    try:
        with Image.open(path) as img:
            if img.width * img.height > limit:
                raise BadImageError(path, f"it declares {img.width} x {img.height} pixels, more than --max_image_pixels "
                                          f"{limit}: a decompression bomb?")
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            return to_rgb(img)
    except BadImageError:
        raise
    except MemoryError:
        raise BadImageError(path, "out of memory while decoding") from None
    except Exception as e:  # PIL's decoders raise OSError, SyntaxError, ValueError, struct.error, IndexError, ...
        raise BadImageError(path, f"{type(e).__name__}: {first_line(e)}" if not isinstance(e, OSError) else first_line(e)) from None
