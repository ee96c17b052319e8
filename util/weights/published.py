"""The published Cross-Scale MAE encoders (upstream's ViT-B / ViT-L, fMoW-RGB, 128 px, 400 epochs) as torchgeo weight
enums define them - ``Weights(url, transforms, meta)`` - without importing torchgeo, and a loader that reads one from
a local file with its hash checked.

torchgeo's convention (``torchgeo/models/vit.py``, ``scale_mae.py``, 0.10.1): the file is a plain timm state dict
named ``<stem>-<sha256[:8]>.pth``; ``Weights.get_state_dict(check_hash=True)`` (torch.hub) refuses a file whose
sha256 does not start with that suffix; ``transforms`` take the raw 0-255 tensor (``Normalize(0, 255)`` then the
training mean / std); ``meta`` holds ``dataset``, ``in_chans``, ``img_size``, ``model`` (a timm name),
``publication``, ``repo``, ``ssl_method``, ``bands``. To upstream one: ``tools/export_weights.py
weights/cross_scale_mae_base_pretrain.pth --output DIR --hashed_pth STEM`` writes the file (from the md5-verified
upstream checkpoint), host it, and give ``torchgeo_weights`` its URL.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from util.config import FMOW_RGB_MEAN, FMOW_RGB_STD
from util.errors import CheckpointError
from util.files import file_sha256
from util.run.checkpoint import PUBLISHED_FILENAMES
from util.weights import metadata

_FMOW_META = {
    "dataset": "fMoW-RGB",
    "in_chans": 3,
    "img_size": 128,
    "publication": metadata.PAPER["url"],
    "repo": metadata.CODE_URL,
    "ssl_method": "cross-scale-mae",
    "licence": metadata.LICENCE,
    "bands": [b.tool_names[0] for b in metadata.RGB],  # torchgeo's spelling: R G B
}

# enum member -> definition. stem: the weight file's name before -<sha256[:8]>.pth; source: the upstream checkpoint
# (and md5) it is exported from; meta["model"]: the timm name that builds it (it fits alone, at img_size 128).
PUBLISHED: dict[str, dict[str, Any]] = {
    "FMOW_RGB_BASE": {
        "enum": "CrossScaleMAEBase16_Weights",
        "stem": "cross_scale_mae_vit_base_patch16_128_fmow_rgb",
        "source": "cross_scale_mae_base_pretrain.pth",
        "embed_dim": 768,
        "depth": 12,
        "patch_size": 16,
        "meta": {**_FMOW_META, "model": "vit_base_patch16_224"},
    },
    "FMOW_RGB_LARGE": {
        "enum": "CrossScaleMAELarge16_Weights",
        "stem": "cross_scale_mae_vit_large_patch16_128_fmow_rgb",
        "source": "cross_scale_mae_large_pretrain.pth",
        "embed_dim": 1024,
        "depth": 24,
        "patch_size": 16,
        "meta": {**_FMOW_META, "model": "vit_large_patch16_224"},
    },
}
for _entry in PUBLISHED.values():
    _entry["source_md5"] = PUBLISHED_FILENAMES[_entry["source"]]
# 8-bit RGB in [0, 255] -> / 255 -> fMoW-RGB mean / std (upstream's ToTensor + Normalize)
SCALE, MEAN, STD = 255.0, list(FMOW_RGB_MEAN), list(FMOW_RGB_STD)


def transforms() -> torch.nn.Sequential:
    """The weights' input transform as torchgeo writes it: ``Normalize(0, 255)`` then fMoW-RGB's mean / std."""
    from torchvision.transforms import v2

    return torch.nn.Sequential(v2.Normalize(mean=[0.0], std=[SCALE]), v2.Normalize(mean=MEAN, std=STD))


def torchgeo_weights(name: str, url: str):
    """torchvision's ``Weights`` (what torchgeo's enums hold) for ``PUBLISHED[name]`` hosted at ``url``; a
    ``file://`` URL of a local file works with ``get_state_dict(check_hash=True)`` too."""
    from torchvision.models._api import Weights

    return Weights(url=url, transforms=transforms(), meta=dict(PUBLISHED[name]["meta"]))


def load_state_dict(name: str, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The encoder state dict of ``PUBLISHED[name]`` from a local ``<stem>-<sha256 prefix>.pth``, hash checked as
    torch.hub does (the file's sha256 must start with the name's suffix) and shapes checked against the definition.

    Raises:
        CheckpointError: another file name, a hash that does not match, or tensors of another encoder.
    """
    entry, path = PUBLISHED[name], Path(path)
    match = re.fullmatch(re.escape(entry["stem"]) + r"-([0-9a-f]{8,64})\.pth", path.name)
    if match is None:
        raise CheckpointError(
            f"{path}: expected {entry['stem']}-<sha256 prefix>.pth (tools/export_weights.py "
            f"{entry['source']} --hashed_pth {entry['stem']})"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    digest = file_sha256(path)
    if not digest.startswith(match.group(1)):
        raise CheckpointError(f"{path}: sha256 {digest} does not start with {match.group(1)}: corrupt or another file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    meta = entry["meta"]
    side = meta["img_size"] // entry["patch_size"]
    width, patch = entry["embed_dim"], entry["patch_size"]
    expected = {
        "patch_embed.proj.weight": (width, meta["in_chans"], patch, patch),
        "pos_embed": (1, 1 + side * side, width),
        f"blocks.{entry['depth'] - 1}.mlp.fc2.bias": (width,),
    }
    wrong = {
        k: tuple(state[k].shape) if k in state else None
        for k, shape in expected.items()
        if k not in state or tuple(state[k].shape) != shape
    }
    if wrong or f"blocks.{entry['depth']}.norm1.weight" in state:
        raise CheckpointError(f"{path}: not the {name} encoder (tensors {wrong or 'of more blocks'})")
    return state
