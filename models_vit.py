"""Vision Transformer encoders and classifiers, built from timm's ``VisionTransformer``.

The same builder makes the Cross-Scale MAE encoder and the fine-tuning / linear-probing
classifier, so weights move between them by name and compute the same features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer

from util.weights.pos_embed import get_2d_sincos_pos_embed

NormStyle = Literal["pre", "post"]


@dataclass(frozen=True)
class SizePreset:
    """Encoder and MAE-decoder sizes of one model size."""

    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int

    def encoder(self) -> dict[str, int]:
        """``embed_dim``, ``depth``, ``num_heads``."""
        return {k: v for k, v in asdict(self).items() if not k.startswith("decoder_")}

    def decoder(self) -> dict[str, int]:
        """``decoder_embed_dim``, ``decoder_depth``, ``decoder_num_heads``."""
        return {k: v for k, v in asdict(self).items() if k.startswith("decoder_")}


# The sizes of upstream's models_mae/__init__.py (tiny and small are NOT ViT-Ti / ViT-S).
PRESETS: dict[str, SizePreset] = {
    "tiny": SizePreset(128, 4, 8, decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8),
    "small": SizePreset(512, 8, 8, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "base": SizePreset(768, 12, 12, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "large": SizePreset(1024, 24, 16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
    "huge": SizePreset(1280, 32, 16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
}


class PostNormBlock(Block):
    """Transformer block with post-normalisation: ``x = norm(x + f(x))``.

    This is what upstream's xFormers blocks (``residual_norm_style="post"``) compute; weights trained
    in them are only meaningful here. Parameter names are timm's ``Block`` names.
    """

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = self.norm1(x + self.drop_path1(self.ls1(self.attn(x, attn_mask=attn_mask, is_causal=is_causal))))
        x = self.norm2(x + self.drop_path2(self.ls2(self.mlp(x))))
        return x


def block_class(norm_style: NormStyle) -> type[Block]:
    """timm's pre-norm ``Block`` or upstream's xFormers-style ``PostNormBlock``.

    Raises:
        ValueError: another ``norm_style``.
    """
    if norm_style not in ("pre", "post"):
        raise ValueError(f"norm_style must be 'pre' or 'post', got {norm_style!r}")
    return Block if norm_style == "pre" else PostNormBlock


def vision_transformer(
    embed_dim: int,
    depth: int,
    num_heads: int,
    img_size: int = 224,
    patch_size: int = 16,
    in_chans: int = 3,
    num_classes: int = 0,
    global_pool: Literal["token", "avg"] = "token",
    drop_path_rate: float = 0.0,
    norm_style: NormStyle = "pre",
    norm_eps: float = 1e-6,
    dynamic_img_size: bool = False,
) -> VisionTransformer:
    """A timm ``VisionTransformer`` with MAE's conventions.

    Args:
        embed_dim: Token width.
        depth: Number of blocks.
        num_heads: Attention heads.
        img_size: Input side in pixels.
        patch_size: Patch side in pixels; must divide ``img_size``.
        in_chans: Input channels.
        num_classes: Classes of the linear head; 0 for a feature extractor.
        global_pool: ``token`` (cls token after ``norm``) or ``avg`` (mean of patch tokens, then ``fc_norm``).
        drop_path_rate: Stochastic depth rate.
        norm_style: ``pre`` (timm/MAE blocks) or ``post`` (upstream xFormers blocks).
        norm_eps: LayerNorm epsilon.
        dynamic_img_size: Accept other input sizes, resampling position embeddings on the fly.
    """
    if img_size % patch_size:
        raise ValueError(f"input size {img_size} is not divisible by patch size {patch_size}")
    vit = VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=num_classes,
        global_pool=global_pool,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=norm_eps),
        block_fn=block_class(norm_style),
        dynamic_img_size=dynamic_img_size,
    )
    grid = vit.patch_embed.grid_size
    vit.pos_embed.data.copy_(get_2d_sincos_pos_embed(embed_dim, grid, cls_token=True))
    return vit


# Classifier name -> (size preset, default patch size); upstream's models_vit names included.
CLASSIFIER_PRESETS: dict[str, tuple[str, int]] = {
    **{f"vit_{size}_patch16": (size, 16) for size in PRESETS},
    "vit_huge_patch14": ("huge", 14),
}


def shape_text(encoder: VisionTransformer) -> str:
    """The shape of ``encoder`` in words, e.g. ``ViT 128 wide, 4 deep, patch 8`` (a preset's name can hide it: the
    ``vit_tiny_patch16`` preset runs at patch 8 on the embedded sample)."""
    return f"ViT {encoder.embed_dim} wide, {len(encoder.blocks)} deep, patch {encoder.patch_embed.patch_size[0]}"


def classifier_preset(name: str) -> tuple[str, int]:
    """(size preset, default patch size) of a classifier name.

    Raises:
        ValueError: unknown name (the message starts with ``model``, as the flag that takes it).
    """
    if name not in CLASSIFIER_PRESETS:
        raise ValueError(f"model {name}: unknown; choose one of {', '.join(CLASSIFIER_PRESETS)}")
    return CLASSIFIER_PRESETS[name]


def create_classifier(
    name: str,
    num_classes: int,
    img_size: int = 224,
    patch_size: int | None = None,
    in_chans: int = 3,
    global_pool: bool = True,
    drop_path_rate: float = 0.0,
    norm_style: NormStyle = "pre",
    norm_eps: float = 1e-6,
    head_init_std: float = 2e-5,
) -> VisionTransformer:
    """A ViT classifier for fine-tuning and linear probing, sized like the pretraining presets.

    Args:
        name: ``vit_{tiny,small,base,large,huge}_patch16`` or ``vit_huge_patch14``.
        num_classes: Classes of the head.
        img_size: Input side in pixels.
        patch_size: Overrides the name's patch size.
        in_chans: Input channels.
        global_pool: Mean of the patch tokens then ``fc_norm`` (MAE fine-tuning); False: cls token after ``norm``.
        drop_path_rate: Stochastic depth rate.
        norm_style: ``post`` for weights from upstream's xFormers blocks.
        norm_eps: LayerNorm epsilon.
        head_init_std: Std of the head's truncated-normal initialisation (MAE fine-tuning: 2e-5).
    """
    size, default_patch = classifier_preset(name)
    vit = vision_transformer(
        **PRESETS[size].encoder(),
        img_size=img_size,
        patch_size=patch_size or default_patch,
        in_chans=in_chans,
        num_classes=num_classes,
        global_pool="avg" if global_pool else "token",
        drop_path_rate=drop_path_rate,
        norm_style=norm_style,
        norm_eps=norm_eps,
    )
    trunc_normal_(vit.head.weight, std=head_init_std)
    nn.init.zeros_(vit.head.bias)
    return vit


def preset_for(embed_dim: int, depth: int) -> str:
    """The size preset (``tiny`` ... ``huge``) of an encoder of this width and depth."""
    for size, preset in PRESETS.items():
        if (preset.embed_dim, preset.depth) == (embed_dim, depth):
            return size
    raise ValueError(f"an encoder of width {embed_dim} and depth {depth} matches no preset ({', '.join(PRESETS)})")


def classifier_name_for(embed_dim: int, depth: int, patch_size: int) -> str:
    """The classifier preset an encoder of this width, depth and patch size belongs to."""
    size = preset_for(embed_dim, depth)
    return "vit_huge_patch14" if size == "huge" and patch_size == 14 else f"vit_{size}_patch16"
