"""util/layouts.py: reading the encoder out of any checkpoint layout and loading it into a timm ViT classifier."""
import pytest
import torch
from timm.layers import resample_abs_pos_embed
from upstream_layouts import SIZE, upstream_checkpoint, upstream_encoder

import models_vit
from model_loading import classifier_name, export_encoder
from models_cross_scale_mae import create_model
from util import checkpoint
from util.errors import CheckpointError
from util.layouts import load_encoder, read_encoder


def classifier_for(weights, global_pool=False, **kwargs):
    return models_vit.create_classifier(
        classifier_name(weights), num_classes=5, img_size=kwargs.pop("img_size", SIZE),
        patch_size=kwargs.pop("patch_size", weights.shape.patch_size), global_pool=global_pool,
        norm_style=weights.norm_style, **kwargs,
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
        torch.testing.assert_close(model.forward_features(imgs), upstream_encoder(saved["model"], imgs, layout), rtol=1e-4, atol=1e-4)


def test_our_checkpoint_and_timm_export_give_the_pretraining_encoders_features(tmp_path):
    torch.manual_seed(0)
    mae = create_model("cross_scale_mae_vit_tiny", input_size=SIZE, patch_size=8).eval()
    checkpoint.save_checkpoint({"model": mae.state_dict(), "model_config": mae.model_config}, tmp_path / "ours.pth")
    _, safetensors = export_encoder(mae, tmp_path / "encoder")
    imgs = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = mae.encoder.forward_features(imgs)
    for path, layout in ((tmp_path / "ours.pth", "ours"), (safetensors, "timm-vit")):
        weights = read_encoder(path)
        model = classifier_for(weights)
        report = load_encoder(model, weights)
        assert report.layout == layout and report.loaded == 54
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
    with pytest.raises(CheckpointError, match=r"not in the file: blocks\.1\.mlp\.fc1\.weight.*refusing to train from random weights"):
        load_encoder(classifier_for(weights), weights)
    torch.save(upstream_checkpoint("timm"), tmp_path / "tiny.pth")
    weights = read_encoder(tmp_path / "tiny.pth")
    small = models_vit.create_classifier("vit_small_patch16", 5, img_size=SIZE, patch_size=8)
    with pytest.raises(CheckpointError, match="tiny.pth: tensors of another shape"):
        load_encoder(small, weights)
    torch.save({"model": {"decoder_pred.weight": torch.zeros(1)}}, tmp_path / "decoder_only.pth")
    with pytest.raises(CheckpointError, match="no transformer blocks found"):
        read_encoder(tmp_path / "decoder_only.pth")
