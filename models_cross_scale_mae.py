"""Cross-Scale MAE (Tang et al., NeurIPS 2023) and its ablations as one model class.

The paper model is ``cross_scale_mae_vit_{size}`` (= upstream ``mae_vit_{size}_MsLdCeCd``): two scales of
each image, a reconstruction loss per scale, the cross-scale prediction loss on decoder tokens and the
cross-scale consistency (contrastive) loss on encoder tokens, summed with weight 1. ``mae_vit_{size}`` is
the plain MAE baseline. Upstream's other ablation names map to loss weights of the same class.

The encoder is an unmodified timm ``VisionTransformer`` (``self.encoder``); masking wraps it, so its
state dict exports to timm as is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from functools import partial, wraps
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from models_vit import PRESETS, NormStyle, block_class, vision_transformer
from util.run import distributed
from util.weights.pos_embed import get_2d_sincos_pos_embed

LOSS_WEIGHT_KEYS = ("rec", "cross_pred", "cross_cons", "enc_pred", "latent")
# Which loss weight scales each reported term (the cross-scale terms are named after their weight).
TERM_WEIGHT = {
    "rec_orig": "rec",
    "rec_crop": "rec",
    "cross_pred": "cross_pred",
    "cross_cons": "cross_cons",
    "enc_pred": "enc_pred",
    "latent": "latent",
}

# Upstream class-name suffix -> (second scale on, loss weights). Ms = multi-scale, Ld = reconstruction,
# Cd = cross-scale prediction on decoder tokens, Ce = (with Cd) contrastive consistency on encoder tokens,
# Ce alone = MLP prediction between encoder tokens, Le = MSE between encoder token sequences.
UPSTREAM_VARIANTS: dict[str, tuple[bool, dict[str, float]]] = {
    "": (False, dict(rec=1.0)),
    "MsLd": (True, dict(rec=1.0)),
    "MsLdCd": (True, dict(rec=1.0, cross_pred=1.0)),
    "MsLdCe": (True, dict(rec=1.0, enc_pred=1.0)),
    "MsLdCeCd": (True, dict(rec=1.0, cross_pred=1.0, cross_cons=1.0)),
    "MsLdLe": (True, dict(rec=1.0, latent=1.0)),
    "MsLdLeCd": (True, dict(rec=1.0, cross_pred=1.0, latent=1.0)),
}


class ViewOutput(NamedTuple):
    """What encoding and decoding one view gives."""

    latent: torch.Tensor  # encoder tokens [B, 1+K, D] (cls + K visible patches)
    mask: torch.Tensor  # [B, L], 1 = masked
    tokens: torch.Tensor  # decoder tokens after decoder_norm [B, 1+L, Dd]
    pred: torch.Tensor  # predicted patches [B, L, p*p*C]


def fp32_region(device: torch.device):
    """Autocast off, so losses are computed in fp32 whatever the autocast dtype (no-op where autocast does not
    exist)."""
    return torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) else nullcontext()


def token_mlp(dim: int, num_tokens: int, hidden_dim: int = 2048) -> nn.Sequential:
    """Upstream's predictor ``Linear -> BatchNorm1d(num_tokens) -> ReLU -> Linear`` on [B, num_tokens, dim].

    BatchNorm1d sees the token axis as channels, so it normalises each token position over
    (batch x hidden); the module is therefore tied to the token count it was built for.
    """
    return nn.Sequential(
        nn.Linear(dim, hidden_dim), nn.BatchNorm1d(num_tokens), nn.ReLU(inplace=True), nn.Linear(hidden_dim, dim)
    )


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE per-sample random masking: keep the ``int(L * (1 - mask_ratio))`` lowest-noise tokens.

    Args:
        x: Tokens [N, L, D].
        mask_ratio: Fraction of tokens removed.
        noise: [N, L] scores; lower is kept.

    Returns:
        Kept tokens [N, K, D], binary mask [N, L] (1 = removed), ids_restore [N, L].
    """
    n, length, dim = x.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore


def cross_scale_contrastive_loss(
    f1: torch.Tensor,
    f2: torch.Tensor,
    temperature: float = 0.5,
    form: Literal["upstream", "ntxent"] = "upstream",
    gather_negatives: bool = False,
) -> torch.Tensor:
    """Contrastive loss between two views; row i of ``f1`` and of ``f2`` are the positive pair.

    ``upstream``: l_i = -log(s_ip / (sum_{k not in {i, p}} s_ik + 1e-8)), s = exp(cos / T), i.e. the positive
    is left out of the denominator, as upstream's ``NTXentLoss`` computes. ``ntxent``: SimCLR's NT-Xent
    (positive in the denominator). Both average over this rank's 2B anchors.

    ``gather_negatives=True`` (on W processes): each rank's 2B anchors are contrasted against all 2WB
    features (gathered with gradient, ``gather_with_grad``). The similarity matrix is [2B, 2WB] with
    columns in **per-rank blocks**: columns r*2B : (r+1)*2B hold rank r's ``[f1_r; f2_r]``. Local anchor j
    (row j of ``[f1; f2]``) is therefore column ``rank*2B + j`` (itself, excluded) and its partner is
    column ``rank*2B + (j + B) % 2B``. The loss is a mean over anchors of a sum over all other columns,
    which does not depend on the column order, so the mean of the W ranks' losses equals the loss of one
    process on the union batch (whose layout is [f1 of all; f2 of all]), and so does every gradient once
    DDP averaged it over ranks. All ranks must pass the same B.

    Without gathering (or on one process) this is upstream's per-device loss (2B - 2 negatives per anchor),
    whose rank average is the mean of each rank's local loss.

    Args:
        f1: [B, D] features of view 1.
        f2: [B, D] features of view 2.
        temperature: Softmax temperature.
        form: ``upstream`` or ``ntxent``.
        gather_negatives: Contrast against the features of every rank.
    """
    if form not in ("upstream", "ntxent"):
        raise ValueError(f"contrastive form must be 'upstream' or 'ntxent', got {form!r}")
    n = f1.shape[0]
    z = F.normalize(torch.cat([f1, f2]).float(), dim=1)  # [2B, D]
    anchors = torch.arange(2 * n, device=z.device)
    partner = (anchors + n) % (2 * n)
    if not gather_negatives or distributed.world_size() == 1:
        sim = z @ z.T / temperature  # [2B, 2B]
        is_self = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    else:
        offset = distributed.rank() * 2 * n
        sim = z @ distributed.gather_with_grad(z).T / temperature  # [2B, 2WB], columns in per-rank blocks
        is_self = torch.zeros_like(sim, dtype=torch.bool)
        is_self[anchors, anchors + offset] = True
        partner = partner + offset
    if form == "ntxent":
        return F.cross_entropy(sim.masked_fill(is_self, float("-inf")), partner)
    is_negative = ~is_self
    is_negative[anchors, partner] = False
    denominator = (sim.exp() * is_negative).sum(dim=1)
    return (torch.log(denominator + 1e-8) - sim[anchors, partner]).mean()


def resized_crops(imgs: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image's box resized back to the image's size, the whole batch in one ``grid_sample``.

    Args:
        imgs: [B, C, H, W], any float dtype (sampled in float32, returned in ``imgs.dtype``).
        boxes: [B, 4] integer (top, left, height, width) in pixels, each inside its image.

    The same pixels as ``torchvision``'s ``resized_crop(img, *box, [H, W], bilinear, antialias=True)`` image by
    image (up to float32 rounding of the sampling coordinates) for boxes no larger than the image, which is every
    box ``RandomResizedCrop`` draws: up-sampling, where antialiasing changes nothing. Source coordinates are
    half-pixel centred, ``top + (i + 0.5) * height / H - 0.5`` (``align_corners=False``), and clamped to the box's
    first and last pixel as ``F.interpolate`` clamps at the edges of a cropped tensor, so no pixel outside the box
    contributes: the sampling grid is each box's affine map, clamped.
    """
    b, _, h, w = imgs.shape
    boxes = boxes.to(device=imgs.device, dtype=torch.float32)
    top, left, height, width = (column[:, None] for column in boxes.unbind(1))  # each [B, 1]

    def source(offset, extent, size):  # [B, size]: coordinates in the full image, normalised for grid_sample
        positions = torch.arange(size, device=imgs.device, dtype=torch.float32)[None]
        inside = ((positions + 0.5) * extent / size - 0.5).clamp(min=torch.zeros_like(extent), max=extent - 1)
        return (2 * (offset + inside) + 1) / size - 1

    ys, xs = source(top, height, h), source(left, width, w)
    grid = torch.stack([xs[:, None, :].expand(b, h, w), ys[:, :, None].expand(b, h, w)], dim=-1)  # [B, H, W, (x, y)]
    out = F.grid_sample(imgs.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(imgs.dtype)


class CrossScaleMAE(nn.Module):
    """Masked autoencoder with a second, zoomed-in scale and cross-scale losses.

    The forward pass returns a dict with the weighted total ``loss``, each enabled term (``rec_orig``,
    ``rec_crop``, ``cross_pred``, ``cross_cons``, ``enc_pred``, ``latent``; unweighted), and ``pred`` [B, L,
    p*p*C] / ``mask`` [B, L] of the original view.
    """

    def __init__(
        self,
        input_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        multi_scale: bool = True,
        loss_weights: Mapping[str, float] | None = None,
        scale_range: Sequence[float] = (0.25, 0.75),
        crop_mode: Literal["batch", "sample"] = "batch",
        contrastive: Literal["upstream", "ntxent"] = "upstream",
        temperature: float = 0.5,
        gather_negatives: bool = False,
        encoder_norm: bool = False,
        norm_style: NormStyle = "pre",
        norm_eps: float = 1e-6,
        predictor_hidden_dim: int = 2048,
        batched_views: bool = True,
    ) -> None:
        """
        Args:
            input_size: Image side in pixels.
            patch_size: Patch side in pixels.
            in_chans: Image channels.
            embed_dim: Encoder width.
            depth: Encoder blocks.
            num_heads: Encoder heads.
            decoder_embed_dim: Decoder width.
            decoder_depth: Decoder blocks.
            decoder_num_heads: Decoder heads.
            mask_ratio: Default fraction of patches masked per view.
            norm_pix_loss: Reconstruct per-patch standardised pixels.
            multi_scale: Add the zoomed-in second view (False: plain MAE).
            loss_weights: Weights of ``rec``, ``cross_pred``, ``cross_cons``, ``enc_pred``, ``latent``;
                a missing or zero weight disables the term (and its predictor).
            scale_range: Area fraction range of the second view's RandomResizedCrop.
            crop_mode: ``batch``: one crop box shared by the batch (upstream); ``sample``: one per image.
            contrastive: ``upstream`` (positive left out of the denominator) or ``ntxent`` (SimCLR).
            temperature: Contrastive temperature.
            gather_negatives: Contrast each anchor with the features of every process's batch (the objective of
                one process on the global batch) instead of the local batch only (upstream).
            encoder_norm: Apply the encoder's final LayerNorm in pretraining (upstream discards it).
            norm_style: ``pre`` (timm blocks) or ``post`` (upstream's xFormers blocks).
            norm_eps: LayerNorm epsilon.
            predictor_hidden_dim: Hidden width of the cross-scale predictors.
            batched_views: Run both views through encoder and decoder in one pass (same numbers as two).
        """
        super().__init__()
        weights = {"rec": 1.0} if loss_weights is None else dict(loss_weights)
        unknown = set(weights) - set(LOSS_WEIGHT_KEYS)
        if unknown:
            raise ValueError(
                f"loss_weights: unknown term(s) {', '.join(sorted(unknown))}; known: {', '.join(LOSS_WEIGHT_KEYS)}"
            )
        if not multi_scale and any(weights.get(k, 0.0) for k in LOSS_WEIGHT_KEYS if k != "rec"):
            raise ValueError("loss_weights: cross-scale loss terms need a multi-scale model (not plain MAE)")
        bad_weights = [f"{k}={v}" for k, v in weights.items() if not (0.0 <= float(v) < float("inf"))]
        if bad_weights:
            raise ValueError(f"loss_weights: weights must be finite and at least 0, got {', '.join(bad_weights)}")
        low, high = (float(v) for v in scale_range)
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(
                f"scale_range must satisfy 0 < min <= max <= 1 (area fractions of the crop), got {low} {high}"
            )
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if crop_mode not in ("batch", "sample"):
            raise ValueError(f"crop_mode must be 'batch' or 'sample', got {crop_mode!r}")
        self.loss_weights = {k: float(weights.get(k, 0.0)) for k in LOSS_WEIGHT_KEYS}
        self.multi_scale = multi_scale
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.contrastive = contrastive
        self.temperature = temperature
        self.gather_negatives = gather_negatives
        self.encoder_norm = encoder_norm
        self.batched_views = batched_views
        self.crop_mode = crop_mode
        self.crop_sampler = v2.RandomResizedCrop(input_size, scale=tuple(scale_range), antialias=True)

        self.encoder = vision_transformer(
            embed_dim,
            depth,
            num_heads,
            img_size=input_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            norm_style=norm_style,
            norm_eps=norm_eps,
        )
        self.encoder.pos_embed.requires_grad_(False)
        self.patch_size = patch_size
        self.in_chans = in_chans
        num_patches = self.encoder.patch_embed.num_patches
        self.num_patches = num_patches

        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        block = block_class(norm_style)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            get_2d_sincos_pos_embed(decoder_embed_dim, self.encoder.patch_embed.grid_size), requires_grad=False
        )
        self.decoder = nn.Sequential(
            *[
                block(decoder_embed_dim, decoder_num_heads, 4.0, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        if self.loss_weights["cross_pred"]:
            self.predictor = token_mlp(decoder_embed_dim, num_patches, predictor_hidden_dim)
        if self.loss_weights["enc_pred"]:
            num_visible = int(num_patches * (1 - mask_ratio))
            self.encoder_predictor = token_mlp(embed_dim, num_visible, predictor_hidden_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE initialisation: xavier-uniform linears and patch projection, N(0, 0.02) tokens."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        proj = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.data.view(proj.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token", "encoder.pos_embed", "mask_token", "decoder_pos_embed"}

    @property
    def loss_names(self) -> tuple[str, ...]:
        """Names of the terms the forward pass reports, in order."""
        views = ("rec_orig", "rec_crop") if self.multi_scale else ("rec_orig",)
        return views + tuple(t for t in LOSS_WEIGHT_KEYS[1:] if self.loss_weights[t])

    @property
    def unused_parameters(self) -> list[str]:
        """Parameters the forward pass never uses: the encoder's final norm unless ``encoder_norm`` (upstream's
        pretraining path discards it). They keep ``requires_grad`` so optimiser states stay as upstream's and
        earlier checkpoints'; DDP is told to ignore them instead of searching the graph every step."""
        return [] if self.encoder_norm else [f"encoder.norm.{name}" for name, _ in self.encoder.norm.named_parameters()]

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [N, C, H, W] -> [N, L, p*p*C], channel-last inside each patch, patches row-major."""
        p, c = self.patch_size, self.in_chans
        n, _, height, width = imgs.shape
        h, w = height // p, width // p
        x = imgs.reshape(n, c, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, h * w, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, L, p*p*C] -> [N, C, H, W] for a square grid."""
        p, c = self.patch_size, self.in_chans
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def sample_crop_params(self, imgs: torch.Tensor) -> torch.Tensor:
        """Crop boxes (top, left, height, width) for the second view: [1, 4] (batch mode) or [B, 4]."""
        count = 1 if self.crop_mode == "batch" else imgs.shape[0]
        boxes = []
        for _ in range(count):
            params = self.crop_sampler.make_params([imgs])
            boxes.append([params["top"], params["left"], params["height"], params["width"]])
        return torch.tensor(boxes)

    @torch.compiler.disable  # data-dependent boxes: run eagerly instead of recompiling the model for each box
    def crop_view(self, imgs: torch.Tensor, crop_params: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Second scale: crop each image and resize it back to the input size (bilinear, antialias; one box per
        image: ``resized_crops``, the same pixels for the batch in one pass).

        Args:
            imgs: [B, C, H, W].
            crop_params: (top, left, height, width) shared by the batch, a [B, 4] table, or None to sample.
        """
        if crop_params is None:
            crop_params = self.sample_crop_params(imgs)
        boxes = torch.as_tensor(crop_params).reshape(-1, 4).tolist()
        size = list(imgs.shape[-2:])
        resize = partial(TF.resized_crop, size=size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        if len(boxes) == 1:
            return resize(imgs, *boxes[0])
        if len(boxes) != imgs.shape[0]:
            raise ValueError(f"crop_params has {len(boxes)} boxes for a batch of {imgs.shape[0]}")
        return resized_crops(imgs, torch.tensor(boxes))

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs [N, C, H, W], noise [N, L] -> latent [N, 1+K, D], mask [N, L], ids_restore [N, L]."""
        vit = self.encoder
        x = vit.patch_embed(imgs) + vit.pos_embed[:, 1:]  # [N, L, D]
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)  # [N, K, D]
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = vit.blocks(torch.cat([cls, x], dim=1))
        if self.encoder_norm:
            x = vit.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [N, 1+K, D] -> decoder tokens [N, 1+L, Dd] (after decoder_norm), pred [N, L, p*p*C]."""
        x = self.decoder_embed(latent)  # [N, 1+K, Dd]
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [N, L, Dd]
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # [N, 1+L, Dd]
        tokens = self.decoder_norm(self.decoder(x))
        return tokens, self.decoder_pred(tokens[:, 1:])

    def reconstruction_loss(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L_re: mean squared error over the masked patches (fp32); imgs [N, C, H, W], pred [N, L, p*p*C], mask [N, L].

        With ``norm_pix_loss`` the target is each patch standardised by its own mean and variance (MAE).
        ``valid`` [N, 1, H, W] in [0, 1] (1 = data, 0 = no-data; fractions where resampling mixed them) weights each
        pixel: the loss is then the weighted mean over the masked patches' pixels, so no-data pixels (filled with the
        band mean) are never reconstruction targets, and ``norm_pix_loss`` uses weighted patch statistics. All-ones
        ``valid`` gives the unweighted loss.
        """
        with fp32_region(imgs.device):
            if valid is None:
                return self._masked_mse(imgs, pred, mask)
            return self._weighted_masked_mse(imgs, pred, mask, valid)

    def _masked_mse(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs).float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # [N, L]
        return (per_patch * mask).sum() / mask.sum()

    def _weighted_masked_mse(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        target = self.patchify(imgs).float()
        weight = self.patchify(valid.float().expand_as(imgs))  # [N, L, p*p*C]
        total = weight.sum(dim=-1, keepdim=True)  # [N, L, 1]
        if self.norm_pix_loss:  # weighted mean and (unbiased) variance: equal to MAE's where every pixel is valid
            mean = (weight * target).sum(dim=-1, keepdim=True) / total.clamp(min=1e-6)
            var = (weight * (target - mean) ** 2).sum(dim=-1, keepdim=True) / (total - 1).clamp(min=1e-6)
            target = (target - mean) / (var + 1e-6) ** 0.5
        squared = (weight * (pred.float() - target) ** 2).sum(dim=-1)  # [N, L]
        # a batch whose masked patches hold no data at all contributes 0 (and no gradient), not NaN
        return (squared * mask).sum() / (total.squeeze(-1) * mask).sum().clamp(min=1e-6)

    def encode_decode(self, views: list[torch.Tensor], mask_ratio: float, noise: torch.Tensor) -> list[ViewOutput]:
        """Mask, encode and decode each view [B, C, H, W] with its noise [B, L] (``noise`` is [V, B, L]):
        one batched pass (``batched_views``), or one pass per view as upstream runs it; the same numbers."""
        if not self.batched_views:
            outputs = []
            for view, view_noise in zip(views, noise):
                latent, mask, ids_restore = self.forward_encoder(view, mask_ratio, view_noise)
                outputs.append(ViewOutput(latent, mask, *self.forward_decoder(latent, ids_restore)))
            return outputs
        latent, mask, ids_restore = self.forward_encoder(torch.cat(views), mask_ratio, noise.flatten(0, 1))
        tokens, pred = self.forward_decoder(latent, ids_restore)
        return [ViewOutput(*parts) for parts in zip(*(t.chunk(len(views)) for t in (latent, mask, tokens, pred)))]

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
        crop_params: torch.Tensor | Sequence[int] | None = None,
        valid: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            imgs: Normalised images [B, C, H, W].
            valid: [B, 1, H, W] pixel weights of the reconstruction loss (1 = data, 0 = no-data), cropped with the
                second view; None: every pixel counts (``reconstruction_loss``).
            mask_ratio: Fraction of patches masked in each view (default: the model's).
            noise: [V, B, L] masking scores, view 0 = original, view 1 = crop (V = 1 for plain MAE);
                the lowest scores are kept. Random when None.
            crop_params: Second view's crop box (see ``crop_view``); random when None.

        Raises:
            ValueError: ``noise`` of the wrong shape.
        """
        mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        valids = [valid]
        if self.multi_scale and valid is not None:  # one crop of pixels and weights together
            zoomed = self.crop_view(torch.cat([imgs, valid.to(imgs.dtype)], dim=1), crop_params)
            views, valids = [imgs, zoomed[:, :-1]], [valid, zoomed[:, -1:]]
        else:
            views = (
                [imgs, self.crop_view(imgs, crop_params)] if self.multi_scale else [imgs]
            )  # x and its zoomed-in view
        outputs = self.encode_decode(views, mask_ratio, self._masking_noise(len(views), imgs, noise))
        orig = outputs[0]

        terms = {
            "rec_orig": self.reconstruction_loss(imgs, orig.pred, orig.mask, valids[0])
        }  # L_re of the original view
        if self.multi_scale:
            crop = outputs[1]
            terms["rec_crop"] = self.reconstruction_loss(
                views[1], crop.pred, crop.mask, valids[-1]
            )  # L_re of the zoomed-in view
            if self.loss_weights["cross_pred"]:  # L_cp: predict the original's decoder tokens from the crop's
                terms["cross_pred"] = self.mse(self.predictor(crop.tokens[:, 1:]), orig.tokens[:, 1:])
            if self.loss_weights["cross_cons"]:  # L_cc: the two views' mean encoder tokens are a positive pair
                terms["cross_cons"] = self.consistency_loss(orig.latent, crop.latent)
            terms.update(self.ablation_terms(orig, crop))
        loss = sum(self.loss_weights[TERM_WEIGHT[name]] * value for name, value in terms.items())
        return {"loss": loss, **terms, "pred": orig.pred, "mask": orig.mask}

    def _masking_noise(self, num_views: int, imgs: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        shape = (num_views, imgs.shape[0], self.num_patches)
        if noise is None:
            return torch.rand(shape, device=imgs.device)
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {list(shape)}, got {list(noise.shape)}")
        return noise

    @staticmethod
    def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean squared error in fp32 whatever the autocast dtype."""
        with fp32_region(prediction.device):
            return F.mse_loss(prediction.float(), target.float())

    def consistency_loss(self, latent: torch.Tensor, latent_crop: torch.Tensor) -> torch.Tensor:
        """L_cc: contrastive loss between the mean patch tokens [B, D] of the two views' latents [B, 1+K, D]."""
        with fp32_region(latent.device):
            return cross_scale_contrastive_loss(
                latent[:, 1:].float().mean(dim=1),
                latent_crop[:, 1:].float().mean(dim=1),
                self.temperature,
                self.contrastive,
                self.gather_negatives,
            )

    def ablation_terms(self, orig: ViewOutput, crop: ViewOutput) -> dict[str, torch.Tensor]:
        """Upstream's ablation-only terms: ``enc_pred`` (MsLdCe: an MLP predicts the original's visible encoder
        tokens from the crop's) and ``latent`` (MsLdLe: MSE between the two views' encoder token sequences)."""
        terms = {}
        if self.loss_weights["enc_pred"]:
            terms["enc_pred"] = self.mse(self.encoder_predictor(crop.latent[:, 1:]), orig.latent[:, 1:])
        if self.loss_weights["latent"]:
            terms["latent"] = self.mse(crop.latent, orig.latent)
        return terms


# Registry name -> (size preset, upstream variant suffix); filled by ``register_model``.
MODEL_VARIANTS: dict[str, tuple[str, str]] = {}


def register_model(size: str, variant: str) -> Callable[[Callable], Callable[..., CrossScaleMAE]]:
    """Make the decorated (body-less) function build ``CrossScaleMAE`` of ``size`` with the loss terms of upstream's
    ``variant`` (a key of ``UPSTREAM_VARIANTS``), keyword arguments overriding any constructor argument, and
    register it under its name, as timm's ``@register_model`` does."""
    multi_scale, variant_weights = UPSTREAM_VARIANTS[variant]

    def decorate(declaration: Callable) -> Callable[..., CrossScaleMAE]:
        @wraps(declaration)
        def factory(**kwargs) -> CrossScaleMAE:
            config = {**PRESETS[size].encoder(), **PRESETS[size].decoder(), "multi_scale": multi_scale, **kwargs}
            config["loss_weights"] = {**variant_weights, **(kwargs.get("loss_weights") or {})}
            return CrossScaleMAE(**config)

        MODEL_VARIANTS[declaration.__name__] = (size, variant)
        return factory

    return decorate


def loss_weights_of(name: str) -> dict[str, float]:
    """The loss weights a registered model name stands for (before ``loss_weights`` overrides)."""
    return dict(UPSTREAM_VARIANTS[MODEL_VARIANTS[name][1]][1])


@register_model("tiny", "MsLdCeCd")
def cross_scale_mae_vit_tiny(**kwargs) -> CrossScaleMAE:
    """Cross-Scale MAE, the paper model (= upstream's ``mae_vit_tiny_MsLdCeCd``), tiny encoder."""


@register_model("tiny", "")
def mae_vit_tiny(**kwargs) -> CrossScaleMAE:
    """Plain MAE (one scale, reconstruction only), tiny encoder."""


@register_model("tiny", "MsLd")
def mae_vit_tiny_MsLd(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction of each, tiny encoder."""


@register_model("tiny", "MsLdCd")
def mae_vit_tiny_MsLdCd(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + cross-scale prediction on decoder tokens, tiny encoder."""


@register_model("tiny", "MsLdCe")
def mae_vit_tiny_MsLdCe(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + MLP prediction between encoder tokens, tiny encoder."""


@register_model("tiny", "MsLdCeCd")
def mae_vit_tiny_MsLdCeCd(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + cross-scale prediction + contrastive consistency (the paper model), tiny encoder."""


@register_model("tiny", "MsLdLe")
def mae_vit_tiny_MsLdLe(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + MSE between encoder token sequences, tiny encoder."""


@register_model("tiny", "MsLdLeCd")
def mae_vit_tiny_MsLdLeCd(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + cross-scale prediction + MSE between encoder tokens, tiny encoder."""


@register_model("small", "MsLdCeCd")
def cross_scale_mae_vit_small(**kwargs) -> CrossScaleMAE:
    """Cross-Scale MAE, the paper model (= upstream's ``mae_vit_small_MsLdCeCd``), small encoder."""


@register_model("small", "")
def mae_vit_small(**kwargs) -> CrossScaleMAE:
    """Plain MAE (one scale, reconstruction only), small encoder."""


@register_model("small", "MsLd")
def mae_vit_small_MsLd(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction of each, small encoder."""


@register_model("small", "MsLdCd")
def mae_vit_small_MsLdCd(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + cross-scale prediction on decoder tokens, small encoder."""


@register_model("small", "MsLdCe")
def mae_vit_small_MsLdCe(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + MLP prediction between encoder tokens, small encoder."""


@register_model("small", "MsLdCeCd")
def mae_vit_small_MsLdCeCd(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + cross-scale prediction + contrastive consistency (the paper model), small
    encoder."""


@register_model("small", "MsLdLe")
def mae_vit_small_MsLdLe(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + MSE between encoder token sequences, small encoder."""


@register_model("small", "MsLdLeCd")
def mae_vit_small_MsLdLeCd(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + cross-scale prediction + MSE between encoder tokens, small encoder."""


@register_model("base", "MsLdCeCd")
def cross_scale_mae_vit_base(**kwargs) -> CrossScaleMAE:
    """Cross-Scale MAE, the paper model (= upstream's ``mae_vit_base_MsLdCeCd``), base encoder."""


@register_model("base", "")
def mae_vit_base(**kwargs) -> CrossScaleMAE:
    """Plain MAE (one scale, reconstruction only), base encoder."""


@register_model("base", "MsLd")
def mae_vit_base_MsLd(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction of each, base encoder."""


@register_model("base", "MsLdCd")
def mae_vit_base_MsLdCd(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + cross-scale prediction on decoder tokens, base encoder."""


@register_model("base", "MsLdCe")
def mae_vit_base_MsLdCe(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + MLP prediction between encoder tokens, base encoder."""


@register_model("base", "MsLdCeCd")
def mae_vit_base_MsLdCeCd(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + cross-scale prediction + contrastive consistency (the paper model), base encoder."""


@register_model("base", "MsLdLe")
def mae_vit_base_MsLdLe(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + MSE between encoder token sequences, base encoder."""


@register_model("base", "MsLdLeCd")
def mae_vit_base_MsLdLeCd(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + cross-scale prediction + MSE between encoder tokens, base encoder."""


@register_model("large", "MsLdCeCd")
def cross_scale_mae_vit_large(**kwargs) -> CrossScaleMAE:
    """Cross-Scale MAE, the paper model (= upstream's ``mae_vit_large_MsLdCeCd``), large encoder."""


@register_model("large", "")
def mae_vit_large(**kwargs) -> CrossScaleMAE:
    """Plain MAE (one scale, reconstruction only), large encoder."""


@register_model("large", "MsLd")
def mae_vit_large_MsLd(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction of each, large encoder."""


@register_model("large", "MsLdCd")
def mae_vit_large_MsLdCd(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + cross-scale prediction on decoder tokens, large encoder."""


@register_model("large", "MsLdCe")
def mae_vit_large_MsLdCe(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + MLP prediction between encoder tokens, large encoder."""


@register_model("large", "MsLdCeCd")
def mae_vit_large_MsLdCeCd(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + cross-scale prediction + contrastive consistency (the paper model), large
    encoder."""


@register_model("large", "MsLdLe")
def mae_vit_large_MsLdLe(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + MSE between encoder token sequences, large encoder."""


@register_model("large", "MsLdLeCd")
def mae_vit_large_MsLdLeCd(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + cross-scale prediction + MSE between encoder tokens, large encoder."""


@register_model("huge", "MsLdCeCd")
def cross_scale_mae_vit_huge(**kwargs) -> CrossScaleMAE:
    """Cross-Scale MAE, the paper model (= upstream's ``mae_vit_huge_MsLdCeCd``), huge encoder."""


@register_model("huge", "")
def mae_vit_huge(**kwargs) -> CrossScaleMAE:
    """Plain MAE (one scale, reconstruction only), huge encoder."""


@register_model("huge", "MsLd")
def mae_vit_huge_MsLd(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction of each, huge encoder."""


@register_model("huge", "MsLdCd")
def mae_vit_huge_MsLdCd(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + cross-scale prediction on decoder tokens, huge encoder."""


@register_model("huge", "MsLdCe")
def mae_vit_huge_MsLdCe(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + MLP prediction between encoder tokens, huge encoder."""


@register_model("huge", "MsLdCeCd")
def mae_vit_huge_MsLdCeCd(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + cross-scale prediction + contrastive consistency (the paper model), huge encoder."""


@register_model("huge", "MsLdLe")
def mae_vit_huge_MsLdLe(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + MSE between encoder token sequences, huge encoder."""


@register_model("huge", "MsLdLeCd")
def mae_vit_huge_MsLdLeCd(**kwargs) -> CrossScaleMAE:
    """Two scales, reconstruction + cross-scale prediction + MSE between encoder tokens, huge encoder."""


MODEL_NAMES = list(MODEL_VARIANTS)


def create_model(name: str, **kwargs) -> CrossScaleMAE:
    """Build a model by registry name (e.g. ``cross_scale_mae_vit_base``, upstream's ``mae_vit_base_MsLdCeCd``).

    Raises:
        ValueError: unknown name, or constructor arguments that cannot work (the message starts with the argument).
    """
    if name not in MODEL_VARIANTS:
        raise ValueError(f"model {name!r} is unknown; choose one of: {', '.join(MODEL_NAMES)}")
    model = globals()[name](**kwargs)
    model.model_config = {"name": name, "kwargs": dict(kwargs)}  # what rebuilds it from a checkpoint
    return model
