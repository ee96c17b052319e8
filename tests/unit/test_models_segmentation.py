"""models_segmentation.py and model_loading.build_segmenter: block choice, pyramid shapes of every preset,
intermediate features equal to the encoder's own blocks, frozen encoder, linear head, checkpoint kinds."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("segmentation_models_pytorch")  # models_segmentation imports its UperNet decoder

import models_vit
from model_loading import build_segmenter, export_encoder
from models_segmentation import Segmenter, feature_blocks
from util.config import Bands
from util.run import checkpoint


def segmenter(
    size: str, input_size: int, num_classes: int = 5, head: str = "upernet", patch: int = 16, **kwargs
) -> Segmenter:
    encoder = models_vit.vision_transformer(**models_vit.PRESETS[size].encoder(), img_size=input_size, patch_size=patch)
    return Segmenter(encoder, num_classes, head, decoder_channels=kwargs.pop("decoder_channels", 64), **kwargs)


def test_feature_blocks_follow_the_published_choices_and_the_stated_rule():
    assert feature_blocks(12) == (3, 5, 7, 11)  # ViT-B (MAE / BEiT)
    assert feature_blocks(24) == (7, 11, 15, 23)  # ViT-L
    assert feature_blocks(4) == (0, 1, 2, 3)  # tiny preset
    assert feature_blocks(8) == (2, 3, 4, 7)
    assert feature_blocks(32) == (10, 15, 20, 31)
    with pytest.raises(ValueError, match="4 distinct blocks"):
        feature_blocks(3)


@pytest.mark.parametrize("size", list(models_vit.PRESETS))
@pytest.mark.parametrize("input_size", [224, 512])
def test_pyramid_is_4x_2x_1x_half_the_patch_grid_for_every_preset(size, input_size):
    with torch.device("meta"):  # no memory, no compute: shapes only
        model = segmenter(size, input_size, decoder_channels=512)
        images = torch.empty(2, 3, input_size, input_size)
        features = model.features(images)
        pyramid = model.neck(features)
        logits = model(images)
    dim, grid = models_vit.PRESETS[size].embed_dim, input_size // 16
    assert [tuple(f.shape) for f in features] == [(2, dim, grid, grid)] * 4
    assert [tuple(p.shape) for p in pyramid] == [
        (2, dim, 4 * grid, 4 * grid),
        (2, dim, 2 * grid, 2 * grid),
        (2, dim, grid, grid),
        (2, dim, grid // 2, grid // 2),
    ]
    assert tuple(logits.shape) == (2, 5, input_size, input_size)
    assert model.blocks == feature_blocks(models_vit.PRESETS[size].depth)


@pytest.mark.parametrize("input_size", [64, 96])
def test_tiny_segmenter_runs_for_real_at_two_sizes(input_size):
    torch.manual_seed(0)
    model = segmenter("tiny", input_size).eval()
    logits = model(torch.randn(2, 3, input_size, input_size))
    assert logits.shape == (2, 5, input_size, input_size) and torch.isfinite(logits).all()


def test_intermediate_features_are_the_encoders_own_block_outputs():
    torch.manual_seed(0)
    model = segmenter("tiny", 64).eval()
    encoder = model.encoder
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        x = encoder.norm_pre(encoder.patch_drop(encoder._pos_embed(encoder.patch_embed(images))))
        expected = []
        for block in encoder.blocks:
            x = block(x)
            expected.append(x[:, 1:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2))  # drop the cls token, tokens -> grid
        got = model.features(images)
    for index, feature in zip(model.blocks, got):
        torch.testing.assert_close(feature, expected[index], rtol=0, atol=1e-6)


def test_frozen_encoder_gets_no_gradient_and_stays_in_eval_mode():
    torch.manual_seed(0)
    model = segmenter("tiny", 32, patch=8, freeze_encoder=True).train()
    assert not model.encoder.training and model.head.training
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.head.classifier.parameters())


def test_linear_head_classifies_each_patch_of_the_last_block():
    torch.manual_seed(0)
    model = segmenter("tiny", 32, num_classes=3, head="linear", patch=8).eval()
    assert model.blocks == (3,)
    images = torch.randn(2, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (2, 3, 32, 32)
    patch_logits = model.head(model.features(images)[-1])  # [2, 3, 4, 4]
    torch.testing.assert_close(logits, torch.nn.functional.interpolate(patch_logits, size=(32, 32), mode="bilinear"))
    assert torch.equal(
        logits[..., :4, :4], patch_logits[..., :1, :1].expand(-1, -1, 4, 4)
    )  # the corner patch's own logits
    assert sum(p.numel() for p in model.head.parameters() if p.requires_grad) == 128 * 3 + 3


def test_layer_decay_groups_scale_blocks_and_leave_neck_and_head_at_full_rate():
    from timm.optim import create_optimizer_v2

    model = segmenter("tiny", 32, patch=8)
    optimizer = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["encoder.pos_embed"])] == 0.5**5  # stem, 4 blocks, then the rest
    assert scale[id(named["encoder.blocks.0.attn.qkv.weight"])] == 0.5**4
    assert scale[id(named["encoder.blocks.3.attn.qkv.weight"])] == 0.5
    assert scale[id(named["head.classifier.weight"])] == 1.0 and scale[id(named["neck.up2.weight"])] == 1.0


def seg_args(path, input_size=64, **kw) -> dict:
    """``build_segmenter``'s keyword arguments for the weights at ``path``."""
    values = dict(
        finetune=str(path) if path else "",
        model=None,
        patch_size=None,
        input_size=input_size,
        bands=Bands(),
        head="upernet",
        freeze_encoder=False,
        decoder_channels=32,
    )
    return {**values, **kw}


def test_every_checkpoint_kind_loads_with_position_embeddings_for_the_crop(tiny_mae, pretrained, tmp_path):
    mae, path = tiny_mae, pretrained
    exported = export_encoder(mae, tmp_path / "export")
    expected = mae.encoder.blocks[2].mlp.fc1.weight
    for source in (path, exported.pth, exported.directory, exported.directory / "model.safetensors"):
        model, weights = build_segmenter(4, **seg_args(source))
        assert weights is not None and model.encoder.patch_embed.patch_size == (8, 8)
        assert torch.equal(model.encoder.blocks[2].mlp.fc1.weight, expected), source
        assert model.encoder.pos_embed.shape == (1, 1 + 8 * 8, 128)  # 64 px crop / patch 8, resampled from 4 x 4
    # a segmenter checkpoint (encoder + neck + head) serves as pretrained weights too
    trained, _ = build_segmenter(4, **seg_args(path))
    seg_path = tmp_path / "seg.pth"
    checkpoint.save_checkpoint({"model": trained.state_dict(), "epoch": 0}, seg_path)
    again, weights = build_segmenter(2, **seg_args(seg_path, input_size=32))
    assert torch.equal(again.encoder.blocks[0].attn.qkv.weight, mae.encoder.blocks[0].attn.qkv.weight)
    assert any(k.startswith("head.") for k in weights.left_out)


@pytest.mark.parametrize("head", ["upernet", "linear"])
def test_a_batch_of_one_trains_and_single_value_batch_norms_use_their_running_statistics(head):
    """mmsegmentation#272, segmentation_models_pytorch#342: UperNet's pyramid pooling normalises a 1 x 1 map, one value
    per channel at batch 1, where BatchNorm raised. That BatchNorm now normalises with its running statistics and
    leaves them as they are; larger maps are batch-normalised as before; the state dict is unchanged."""
    torch.manual_seed(0)
    model = segmenter("tiny", 32, head=head, patch=8 if head == "upernet" else 32).train()
    keys = set(segmenter("tiny", 32, head=head, patch=8 if head == "upernet" else 32).state_dict())
    pooled = model.head.decoder.psp.blocks[0][1][1] if head == "upernet" else model.head[0]  # BN of a 1 x 1 map
    before = pooled.running_mean.clone()
    logits = model(torch.randn(1, 3, 32, 32))
    logits.sum().backward()
    assert torch.isfinite(logits).all() and torch.equal(pooled.running_mean, before)
    assert set(model.state_dict()) == keys
    model(torch.randn(2, 3, 32, 32))  # two values per channel: batch statistics, running statistics updated
    assert not torch.equal(pooled.running_mean, before)
