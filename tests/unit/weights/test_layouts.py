"""util/weights/layouts.py: reading the encoder out of any checkpoint layout and loading it into a timm ViT
classifier."""

import pytest
import torch
from timm.layers import resample_abs_pos_embed
from upstream_layouts import SIZE, upstream_checkpoint, upstream_encoder

import models_vit
from model_loading import classifier_name, export_encoder
from models_cross_scale_mae import create_model
from util.errors import CheckpointError, UsageError
from util.run import checkpoint
from util.weights.band_adaptation import BandAdaptation
from util.weights.layouts import load_encoder, read_encoder


def classifier_for(weights, global_pool=False, **kwargs):
    return models_vit.create_classifier(
        classifier_name(weights),
        num_classes=5,
        img_size=kwargs.pop("img_size", SIZE),
        patch_size=kwargs.pop("patch_size", weights.shape.patch_size),
        global_pool=global_pool,
        norm_style=weights.norm_style,
        **kwargs,
    ).eval()


@pytest.mark.parametrize("layout", ["timm", "xformers"])
def test_upstream_checkpoints_load_into_the_classifier_with_upstreams_features(tmp_path, layout):
    saved = upstream_checkpoint(layout)
    torch.save(saved, tmp_path / "up.pth")
    weights = read_encoder(tmp_path / "up.pth")
    model = classifier_for(weights)
    report = load_encoder(model, weights)
    assert report.loaded == 4 * 12 + 6  # 4 blocks + cls, pos, patch w/b, norm w/b
    assert report.missing == ["head.weight", "head.bias"]
    assert report.unexpected == ["65 decoder/predictor tensors (pretraining only)"]
    imgs = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(imgs), upstream_encoder(saved["model"], imgs, layout), rtol=1e-4, atol=1e-4
        )


def test_our_checkpoint_and_timm_export_give_the_pretraining_encoders_features(tmp_path):
    torch.manual_seed(0)
    mae = create_model("cross_scale_mae_vit_tiny", input_size=SIZE, patch_size=8).eval()
    checkpoint.save_checkpoint({"model": mae.state_dict(), "model_config": mae.model_config}, tmp_path / "ours.pth")
    exported = export_encoder(mae, tmp_path / "encoder")
    imgs = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = mae.encoder.forward_features(imgs)
    # the export leaves the untrained final norm out (identity); the classifier's fresh one equals the untrained one
    for path, layout, loaded in ((tmp_path / "ours.pth", "ours", 54), (exported.directory, "timm-vit", 52)):
        weights = read_encoder(path)
        model = classifier_for(weights)
        report = load_encoder(model, weights)
        assert report.layout == layout and report.loaded == loaded and weights.final_norm is False
        with torch.no_grad():
            torch.testing.assert_close(model.forward_features(imgs), expected)


def test_global_pool_leaves_out_norm_and_uses_a_fresh_fc_norm(tmp_path):
    torch.save(upstream_checkpoint("timm"), tmp_path / "up.pth")
    weights = read_encoder(tmp_path / "up.pth")
    report = load_encoder(classifier_for(weights, global_pool=True), weights)
    assert report.loaded == 52
    assert report.missing == ["fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"]
    assert report.unexpected == ["65 decoder/predictor tensors (pretraining only), norm.weight, norm.bias"]


def test_position_embeddings_are_interpolated_to_another_input_size(tmp_path):
    saved = upstream_checkpoint("timm")
    torch.save(saved, tmp_path / "up.pth")
    weights = read_encoder(tmp_path / "up.pth")
    model = classifier_for(weights, img_size=48)
    load_encoder(model, weights)
    expected = resample_abs_pos_embed(saved["model"]["encoder_pos_embed"], [6, 6], [4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.data, expected)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 5)


def test_patch_embedding_is_resampled_to_another_patch_size(tmp_path):
    torch.save(upstream_checkpoint("timm"), tmp_path / "up.pth")
    weights = read_encoder(tmp_path / "up.pth")
    model = classifier_for(weights, patch_size=16)
    load_encoder(model, weights)
    assert model.patch_embed.proj.weight.shape == (128, 3, 16, 16) and model.pos_embed.shape == (1, 5, 128)


def test_an_encoder_that_does_not_load_is_refused(tmp_path):
    saved = upstream_checkpoint("timm")
    del saved["model"]["encoder.1.mlp.fc1.weight"]
    torch.save(saved, tmp_path / "broken.pth")
    weights = read_encoder(tmp_path / "broken.pth")
    with pytest.raises(
        CheckpointError, match=r"not in the file: blocks\.1\.mlp\.fc1\.weight.*refusing to train from random weights"
    ):
        load_encoder(classifier_for(weights), weights)
    torch.save(upstream_checkpoint("timm"), tmp_path / "tiny.pth")
    weights = read_encoder(tmp_path / "tiny.pth")
    small = models_vit.create_classifier("vit_small_patch16", 5, img_size=SIZE, patch_size=8)
    with pytest.raises(CheckpointError, match="tiny.pth: tensors of another shape"):
        load_encoder(small, weights)
    torch.save({"model": {"decoder_pred.weight": torch.zeros(1)}}, tmp_path / "decoder_only.pth")
    with pytest.raises(CheckpointError, match="no transformer blocks found"):
        read_encoder(tmp_path / "decoder_only.pth")


@pytest.mark.parametrize("patch_size", [8, 16])  # 16: the patch projection and position embeddings are also resampled
def test_rgb_filters_go_to_the_named_bands_and_the_encoder_computes_what_the_rgb_one_does(tmp_path, patch_size):
    torch.save(upstream_checkpoint("timm"), tmp_path / "rgb.pth")
    weights = read_encoder(tmp_path / "rgb.pth")
    rgb = classifier_for(weights, patch_size=patch_size)
    load_encoder(rgb, weights)
    model = classifier_for(weights, patch_size=patch_size, in_chans=13)
    report = load_encoder(model, weights, BandAdaptation(model_rgb=(3, 2, 1)))

    proj = model.patch_embed.proj.weight.detach()
    torch.testing.assert_close(proj[:, [3, 2, 1]], rgb.patch_embed.proj.weight.detach(), rtol=0, atol=0)
    assert not proj[:, [0, *range(4, 13)]].any()
    assert report.adapted == ["patch_embed.proj: 3 RGB filters -> bands 3 2 1 of 13, other 10 bands zero"]
    assert "\n  adapted patch_embed.proj: 3 RGB filters -> bands 3 2 1 of 13, other 10 bands zero" in str(report)
    imgs = torch.randn(2, 13, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(imgs), rgb.forward_features(imgs[:, [3, 2, 1]]))


def test_a_band_count_mismatch_without_its_flag_is_refused_in_one_line(tmp_path):
    torch.save(upstream_checkpoint("timm"), tmp_path / "rgb.pth")
    weights = read_encoder(tmp_path / "rgb.pth")
    with pytest.raises(CheckpointError) as info:
        load_encoder(classifier_for(weights, in_chans=13), weights)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'rgb.pth'}: the checkpoint takes 3 input bands, the model 13 (--in_chans)")
    assert "give --rgb_bands R G B" in message and "\n" not in message
    with pytest.raises(
        CheckpointError, match="the checkpoint takes 3 input bands, the model 2 .*only an RGB checkpoint"
    ):
        load_encoder(classifier_for(weights, in_chans=2), weights, BandAdaptation(model_rgb=(0, 1, 0)))
    with pytest.raises(
        UsageError, match=r"--rgb_bands needs 3 different indices in 0\.\.12 \(the model's bands\).*got 3 3 1"
    ):
        load_encoder(classifier_for(weights, in_chans=13), weights, BandAdaptation(model_rgb=(3, 3, 1)))


def test_multispectral_checkpoint_into_an_rgb_model_keeps_the_named_bands(tmp_path):
    torch.manual_seed(0)
    mae = create_model("mae_vit_tiny", input_size=SIZE, patch_size=8, in_chans=13)
    checkpoint.save_checkpoint({"model": mae.state_dict(), "model_config": mae.model_config}, tmp_path / "s2.pth")
    weights = read_encoder(tmp_path / "s2.pth")
    with pytest.raises(
        CheckpointError,
        match=r"s2\.pth: the checkpoint takes 13 input bands, the model 3 .*give --checkpoint_rgb_bands",
    ):
        load_encoder(classifier_for(weights), weights)
    with pytest.raises(CheckpointError, match="the model 4 .*only an RGB checkpoint"):
        load_encoder(
            classifier_for(weights, in_chans=4), weights, BandAdaptation(model_rgb=(0, 1, 2), checkpoint_rgb=(3, 2, 1))
        )

    model = classifier_for(weights)
    report = load_encoder(model, weights, BandAdaptation(checkpoint_rgb=(3, 2, 1)))
    assert report.adapted == ["patch_embed.proj: filters of bands 3 2 1 of 13 -> RGB, other 10 bands dropped"]
    imgs = torch.randn(2, 3, SIZE, SIZE)
    spread = torch.zeros(2, 13, SIZE, SIZE)
    spread[:, [3, 2, 1]] = imgs
    with torch.no_grad():  # the same as the 13-band encoder on an image whose other bands are 0
        torch.testing.assert_close(model.forward_features(imgs), mae.encoder.forward_features(spread))
