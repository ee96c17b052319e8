"""Semantic segmentation around a ``models_vit`` encoder: ViT features of four blocks -> a 4-level pyramid
(the MAE / BEiT / ViTDet neck) -> UperNet decoder (PPM + FPN) -> per-pixel logits at the input size; or a
per-patch linear probe (``head="linear"``).

The recipe is MAE's and BEiT's semantic segmentation setting (He et al. 2022, Bao et al. 2022, both with
mmsegmentation's UperNet): features of blocks 3, 5, 7, 11 of ViT-B (7, 11, 15, 23 of ViT-L), a neck that
turns the single-scale patch grid into 4x, 2x, 1x and 1/2x grids (two stride-2 transposed convolutions with a
norm and GELU between them; one transposed convolution; identity; 2x2 max-pool), then UperNet (Xiao et al.
2018): pyramid pooling at scales 1, 2, 3, 6 on the coarsest level, an FPN top-down path, fusion at the finest
level. The UperNet decoder is ``segmentation_models_pytorch``'s ``UPerNetDecoder`` (fed our pyramid as its
levels 1/4 ... 1/32; it layer-normalises each level first).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
from timm.models.vision_transformer import VisionTransformer

from util.run import distributed

HeadKind = Literal["upernet", "linear"]
FEATURE_FRACTIONS = (1 / 3, 1 / 2, 2 / 3, 1.0)


def feature_blocks(depth: int) -> tuple[int, ...]:
    """0-based indices of the four blocks whose outputs feed the pyramid.

    Rule: the blocks that end 1/3, 1/2, 2/3 and all of the depth, ``round(depth * f) - 1`` for f in
    (1/3, 1/2, 2/3, 1). It reproduces the published choices, 3, 5, 7, 11 for ViT-B (depth 12) and 7, 11, 15, 23
    for ViT-L (24), and gives 0, 1, 2, 3 for the tiny preset (depth 4), 2, 3, 4, 7 for small (8) and 10, 15, 20, 31
    for huge (32). (These are not evenly spaced quarters: quarters would give 2, 5, 8, 11 for ViT-B.)

    Raises:
        ValueError: fewer than 4 blocks.
    """
    if depth < 4:
        raise ValueError(f"a segmentation pyramid needs 4 distinct blocks; the encoder has {depth}")
    return tuple(max(round(depth * f) - 1, 0) for f in FEATURE_FRACTIONS)


class BatchNorm2dOfAnyBatch(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, in training, normalises a batch holding one value per channel (batch 1 on UperNet's
    1 x 1 pyramid-pooling map) with its running statistics, leaving them as they are: the statistics of one value
    are undefined (PyTorch raises "Expected more than 1 value per channel"; mmsegmentation#272,
    segmentation_models_pytorch#342), and eval mode normalises with the running statistics anyway. Any other batch
    is normalised as ``nn.BatchNorm2d`` does. Same parameters and buffers: checkpoints load either way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.numel() == x.shape[1]:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


def any_batch_norms(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.BatchNorm2d`` in it a ``BatchNorm2dOfAnyBatch`` (same state: ``--batch_size 1``
    trains, e.g. large crops with ``--accum_iter``)."""
    for child in module.modules():
        if type(child) is nn.BatchNorm2d:
            child.__class__ = BatchNorm2dOfAnyBatch
    return module


class SyncBatchNorm2dOfAnyBatch(distributed.SyncedBatchNorm, BatchNorm2dOfAnyBatch):
    """``BatchNorm2dOfAnyBatch`` whose training statistics cover every rank's batch (``util.run.distributed``'s
    ``SyncedBatchNorm``, on gloo as on NCCL); a batch of one value per channel on each rank is then W values, whose
    statistics are defined. One process, or eval mode: ``BatchNorm2dOfAnyBatch``."""


def sync_batch_norms(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm synced over the ranks (DDP training), in place, state unchanged."""
    synced = {**distributed.SYNCED, BatchNorm2dOfAnyBatch: SyncBatchNorm2dOfAnyBatch}
    return distributed.convert_sync_batchnorm(module, synced=synced)


class Pyramid(nn.Module):
    """The MAE / BEiT / ViTDet neck: one feature map per level at 4x, 2x, 1x and 1/2x the patch grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.same = nn.Identity()
        self.down2 = nn.MaxPool2d(2, 2)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Four [B, D, h, w] maps (shallow to deep) -> [B, D, 4h, 4w], [B, D, 2h, 2w], [B, D, h, w], [B, D, h/2,
        w/2]."""
        return [op(x) for op, x in zip((self.up4, self.up2, self.same, self.down2), features)]


class UperNetHead(nn.Module):
    """``segmentation_models_pytorch``'s UPerNet decoder on our pyramid, then dropout + 1x1 classifier."""

    def __init__(self, dim: int, num_classes: int, channels: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        # its levels [1, 1/2, 1/4, 1/8, 1/16, 1/32]; it reads only the last four, which are ours
        self.decoder = UPerNetDecoder(
            encoder_channels=[0, 0, dim, dim, dim, dim], encoder_depth=5, decoder_channels=channels
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        fused = self.decoder([None, None, *pyramid])  # [B, channels, 4h, 4w]
        return self.classifier(self.dropout(fused))


class Segmenter(nn.Module):
    """A ViT encoder with a segmentation head; ``forward`` returns logits [B, K, H, W] at the input size.

    Args:
        encoder: A ``models_vit.vision_transformer`` (position embeddings for the crop size).
        num_classes: Classes K.
        head: ``upernet`` (pyramid + UperNet) or ``linear`` (BatchNorm + linear classifier of each patch token of
            the last block, bilinearly upsampled to pixels: the per-patch linear probe).
        freeze_encoder: The encoder gets no gradient and stays in eval mode (PANGAEA's frozen-encoder protocol).
        decoder_channels: UperNet width (512 or 768 in the literature).
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        num_classes: int,
        head: HeadKind = "upernet",
        freeze_encoder: bool = False,
        decoder_channels: int = 512,
    ) -> None:
        super().__init__()
        if head not in ("upernet", "linear"):
            raise ValueError(f"head must be 'upernet' or 'linear', got {head!r}")
        self.encoder, self.head_kind, self.num_classes = encoder, head, num_classes
        self.freeze_encoder = freeze_encoder
        dim, depth = encoder.embed_dim, len(encoder.blocks)
        self.blocks = feature_blocks(depth) if head == "upernet" else (depth - 1,)
        if head == "upernet":
            self.neck = Pyramid(dim)
            self.head = UperNetHead(dim, num_classes, decoder_channels)
        else:
            self.neck = nn.Identity()
            self.head = nn.Sequential(nn.BatchNorm2d(dim, affine=False, eps=1e-6), nn.Conv2d(dim, num_classes, 1))
        any_batch_norms(self.neck)
        any_batch_norms(self.head)
        if freeze_encoder:
            self.encoder.requires_grad_(False)

    @property
    def unused_parameters(self) -> list[str]:
        """Encoder parameters the forward never uses (its final norm: features are taken before it)."""
        return [f"encoder.{name}" for name, _ in self.encoder.norm.named_parameters(prefix="norm")]

    def train(self, mode: bool = True) -> Segmenter:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # no stochastic depth / dropout in a frozen encoder
        return self

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of ``self.blocks`` as [B, D, H/p, W/p] maps (timm ``forward_intermediates``, no final norm)."""
        with torch.no_grad() if self.freeze_encoder else nullcontext():
            return self.encoder.forward_intermediates(
                images,
                indices=list(self.blocks),
                norm=False,
                stop_early=True,
                output_fmt="NCHW",
                intermediates_only=True,
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.features(images)
        logits = self.head(self.neck(features) if self.head_kind == "upernet" else features[-1])
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for timm's layer-wise LR decay: stem, each block, then everything else (norm, neck, head)
        at the full learning rate."""
        return dict(
            stem=r"^encoder\.(?:cls_token|pos_embed|patch_embed|reg_token)",
            blocks=[(r"^encoder\.blocks\.(\d+)", None), (r"^encoder\.norm", (99999,))],
        )

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}
