"""PANGAEA-bench encoder for Cross-Scale MAE exports (tools/export_weights.py; timm's layout: config.json +
model.safetensors). Copy this file to ``pangaea/encoders/cross_scale_mae_encoder.py`` and ``cross_scale_mae*.yaml``
to ``configs/encoder/`` of a PANGAEA-bench checkout (docs/weights_elsewhere.md).

Unlike PANGAEA's generic ``VIT_Encoder``, which leaves ``pos_embed`` at zeros when ``input_size`` is not the size the
weights were pretrained at (it skips the "incompatible" tensor with a warning), this encoder makes the position
embeddings for the benchmark's input size: the fixed 2-D sin-cos table of the new patch grid, as PANGAEA's MAE-family
encoders do (``pos_embed_resize: sincos``, for exports whose ``remote_sensing.position_embedding.kind`` is
``fixed-2d-sincos``), or timm's bicubic resampling of the stored table (``bicubic``, what this project's own
fine-tuning does). Every other tensor must load: a missing, left-over or mis-shaped one is an error, not a warning.

Input: ``{"optical": B x C x 1 x H x W}`` (or B x C x H x W) with the export's bands in its order (``input_bands``) at
``input_size``; output: one ``B x embed_dim x H/p x W/p`` map per ``output_layers`` block (the last block's output
passes through the final LayerNorm only where pretraining trained it).
"""

from __future__ import annotations

import json
from logging import Logger
from pathlib import Path

import timm
import torch
from pangaea.encoders.base import Encoder
from pangaea.encoders.pos_embed import get_2d_sincos_pos_embed
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed


class CrossScaleMAE_Encoder(Encoder):
    """A Cross-Scale MAE ViT export as a PANGAEA encoder.

    Args:
        encoder_weights: The export's ``model.safetensors`` (its ``config.json`` beside it).
        input_size: Side of the benchmark's input in pixels (any multiple of the patch size).
        input_bands: ``{"optical": [band names]}`` in PANGAEA's spelling, as many as the export's bands.
        embed_dim, patch_size, depth, num_heads: Must equal the export's (checked against its config.json).
        output_layers: Block indices (0-based) whose outputs are returned.
        output_dim: ``embed_dim``.
        download_url: Where PANGAEA downloads ``encoder_weights`` from when it is missing (null: nowhere).
        pos_embed_resize: ``sincos`` (rebuild the fixed table; default) or ``bicubic``.
    """

    def __init__(
        self,
        encoder_weights,
        input_size,
        input_bands,
        embed_dim,
        output_layers,
        output_dim,
        download_url,
        patch_size=16,
        depth=12,
        num_heads=12,
        pos_embed_resize="sincos",
    ):
        super().__init__(
            model_name="cross_scale_mae",
            encoder_weights=encoder_weights,
            input_bands=input_bands,
            input_size=input_size,
            embed_dim=embed_dim,
            output_layers=output_layers,
            output_dim=output_dim,
            multi_temporal=False,
            multi_temporal_output=False,
            pyramid_output=False,
            download_url=download_url,
        )
        config = json.loads((Path(encoder_weights).parent / "config.json").read_text())
        self.model_args, self.remote_sensing = dict(config["model_args"]), config.get("remote_sensing") or {}
        given = {
            "embed_dim": embed_dim,
            "patch_size": patch_size,
            "depth": depth,
            "num_heads": num_heads,
            "in_chans": len(input_bands["optical"]),
        }
        wrong = {k: (v, self.model_args[k]) for k, v in given.items() if self.model_args[k] != v}
        if wrong:
            raise ValueError(
                f"{encoder_weights}: the config's values differ from the export's (given, export): {wrong}"
            )
        if pos_embed_resize not in ("sincos", "bicubic"):
            raise ValueError(f"pos_embed_resize must be 'sincos' or 'bicubic', got {pos_embed_resize!r}")
        self.pos_embed_resize = pos_embed_resize
        self.patch_size = patch_size
        self.vit = timm.create_model(
            config["architecture"], pretrained=False, **{**self.model_args, "img_size": input_size}
        )

    def position_embedding(self, stored: torch.Tensor) -> torch.Tensor:
        """The export's position embeddings [1, 1 + L, D] for this encoder's patch grid."""
        grid = self.vit.patch_embed.grid_size
        if stored.shape == self.vit.pos_embed.shape:
            return stored
        kind = self.remote_sensing.get("position_embedding", {}).get("kind")
        if self.pos_embed_resize == "sincos" and kind == "fixed-2d-sincos" and grid[0] == grid[1]:
            table = get_2d_sincos_pos_embed(stored.shape[-1], grid[0], cls_token=True)
            return torch.as_tensor(table, dtype=stored.dtype).unsqueeze(0)
        return resample_abs_pos_embed(stored, list(grid), num_prefix_tokens=1)

    def load_encoder_weights(self, logger: Logger) -> None:
        state = load_file(str(self.encoder_weights))
        state["pos_embed"] = self.position_embedding(state["pos_embed"])
        self.vit.load_state_dict(state, strict=True)  # raises on any missing, left-over or mis-shaped tensor
        logger.info(
            f"loaded {len(state)} tensors of {self.encoder_weights} (position embeddings for "
            f"{self.input_size} px: {self.pos_embed_resize})"
        )

    def forward(self, image):
        x = image["optical"]
        x = x.squeeze(2) if x.ndim == 5 else x
        last = len(self.vit.blocks) - 1
        layers = [int(i) for i in self.output_layers]  # Hydra gives a ListConfig
        features = self.vit.forward_intermediates(
            x, indices=layers, norm=False, output_fmt="NCHW", intermediates_only=True
        )
        if self.model_args.get("final_norm") and last in layers:  # a trained final norm: as in pretraining
            i = layers.index(last)
            features[i] = self.vit.norm(features[i].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return features
