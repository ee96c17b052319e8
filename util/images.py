"""Decoding image files to 8-bit RGB."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


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


def load_image(path: str, draft_size: int | None = None) -> Image.Image:
    """Decode ``path`` to RGB. JPEGs larger than ``draft_size`` are decoded at a reduced scale (PIL draft)."""
    with Image.open(path) as img:
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        return to_rgb(img)
