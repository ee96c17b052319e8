"""Vision Transformer encoders and classifiers, built from timm's ``VisionTransformer``.

The same builder makes the Cross-Scale MAE encoder and the fine-tuning / linear-probing
classifier, so weights move between them by name and compute the same features.
"""
from __future__ import annotations

from functools import partial
from typing import Literal

import torch
import torch.nn as nn
from timm.layers import Attention, trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer

from util.pos_embed import get_2d_sincos_pos_embed

NormStyle = Literal["pre", "post"]

# Encoder sizes of upstream's models_mae/__init__.py (tiny and small are NOT ViT-Ti/ViT-S).
ENCODER_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(embed_dim=128, depth=4, num_heads=8),
    "small": dict(embed_dim=512, depth=8, num_heads=8),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
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


def set_fused_attention(model: nn.Module, fused: bool) -> None:
    """Choose timm's attention path: ``scaled_dot_product_attention`` (fused) or explicit matmul + softmax.

    On CPUs the explicit path trains faster for ViT sequence lengths (SDPA's CPU flash backward is slow for
    short sequences); on GPUs SDPA's flash / memory-efficient kernels win.
    """
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = fused


def block_class(norm_style: NormStyle) -> type[Block]:
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
    **{f"vit_{size}_patch16": (size, 16) for size in ENCODER_PRESETS},
    "vit_huge_patch14": ("huge", 14),
}


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
    if name not in CLASSIFIER_PRESETS:
        raise ValueError(f"unknown classifier {name!r}; choose one of: {', '.join(CLASSIFIER_PRESETS)}")
    size, default_patch = CLASSIFIER_PRESETS[name]
    vit = vision_transformer(
        **ENCODER_PRESETS[size], img_size=img_size, patch_size=patch_size or default_patch, in_chans=in_chans,
        num_classes=num_classes, global_pool="avg" if global_pool else "token", drop_path_rate=drop_path_rate,
        norm_style=norm_style, norm_eps=norm_eps,
    )
    trunc_normal_(vit.head.weight, std=head_init_std)
    nn.init.zeros_(vit.head.bias)
    return vit


def preset_for(embed_dim: int, depth: int) -> str:
    """The size preset (``tiny`` ... ``huge``) of an encoder of this width and depth."""
    for size, preset in ENCODER_PRESETS.items():
        if (preset["embed_dim"], preset["depth"]) == (embed_dim, depth):
            return size
    raise ValueError(f"an encoder of width {embed_dim} and depth {depth} matches no preset ({', '.join(ENCODER_PRESETS)})")


def classifier_name_for(embed_dim: int, depth: int, patch_size: int) -> str:
    """The classifier preset an encoder of this width, depth and patch size belongs to."""
    size = preset_for(embed_dim, depth)
    return "vit_huge_patch14" if size == "huge" and patch_size == 14 else f"vit_{size}_patch16"
