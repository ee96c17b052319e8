"""An exported tiny encoder (RGB or 13 bands) with the flags an embedded-sample run records: what the export tests
load through timm and the field's tools."""

import json
from pathlib import Path

import torch

from model_loading import export_encoder
from models_cross_scale_mae import create_model
from util.config import FMOW_RGB_MEAN, FMOW_RGB_STD

ROOT = Path(__file__).resolve().parents[1]  # the repository root
S2_STATS = ROOT / "data" / "sentinel2_ms" / "band_stats.json"


def run_args(in_chans: int) -> dict:
    """The flags a pretraining run on an embedded sample records (``vars(args)`` / a checkpoint's ``args``)."""
    if in_chans == 3:
        return {
            "model": "cross_scale_mae_vit_tiny",
            "in_chans": 3,
            "train_path": "data/sentinel2_rgb/train.csv",
            "mean": list(FMOW_RGB_MEAN),
            "std": list(FMOW_RGB_STD),
            "epochs": 2,
        }
    stats = json.loads(S2_STATS.read_text())
    return {
        "model": "cross_scale_mae_vit_tiny",
        "in_chans": 13,
        "train_path": "data/sentinel2_ms/train.csv",
        "band_stats": str(S2_STATS),
        "mean": stats["mean"],
        "std": stats["std"],
        "raster": True,
        "epochs": 2,
    }


def exported_tiny(tmp_path, in_chans, **kwargs):
    torch.manual_seed(in_chans)
    mae = create_model("cross_scale_mae_vit_tiny", input_size=32, patch_size=8, in_chans=in_chans, **kwargs).eval()
    with torch.no_grad():  # trained-looking norms and biases: a fresh LayerNorm or a deleted tensor must show
        for name, tensor in mae.encoder.named_parameters():
            if name.endswith("bias") or "norm" in name:
                tensor.add_(0.1 * torch.randn_like(tensor))
    done = export_encoder(mae, tmp_path / "encoder", run_args(in_chans), checkpoint="checkpoint-last.pth", epoch=1)
    return mae, done
