"""model_loading.py: the pretraining model a checkpoint describes (ours and both upstream layouts), and the timm export."""
import json
import timm
import pytest
import torch
from upstream_layouts import SIZE, upstream_checkpoint, upstream_encoder

from model_loading import export_encoder, load_mae
from models_cross_scale_mae import create_model
from util import checkpoint as ckpt
from util.errors import CheckpointError


@pytest.mark.parametrize("layout", ["timm", "xformers"])
def test_upstream_layouts_load_completely_and_compute_upstreams_encoder(tmp_path, layout):
    path = tmp_path / f"upstream_{layout}.pth"
    saved = upstream_checkpoint(layout)
    torch.save(saved, path)

    model, report = load_mae(path)

    assert report.layout == f"upstream-{layout}"
    assert report.model_name == "mae_vit_tiny_MsLdCeCd"
    assert report.loaded == len(saved["model"]) - (16 * 8 - 12 * 8 if layout == "xformers" else 0)
    assert report.missing == [] and report.unexpected == []
    assert report.epoch == 399
    imgs = torch.randn(2, 3, SIZE, SIZE)
    expected = upstream_encoder(saved["model"], imgs, layout)
    torch.testing.assert_close(model.encoder.forward_features(imgs), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.predictor[1].running_var, saved["model"]["predictor.1.running_var"])


def test_wrapped_model_prefixes_are_removed(tmp_path):
    saved = upstream_checkpoint("timm")
    saved["model"] = {f"module.{k}": v for k, v in saved["model"].items()}
    torch.save(saved, tmp_path / "ddp.pth")
    _, report = load_mae(tmp_path / "ddp.pth")
    assert report.layout == "upstream-timm" and report.unexpected == []


def test_upstream_xformers_weights_are_wrong_in_pre_norm_blocks(tmp_path):
    """The reason post-norm blocks exist: the same weights in timm's pre-norm blocks compute something else."""
    path = tmp_path / "x.pth"
    saved = upstream_checkpoint("xformers")
    torch.save(saved, path)
    model, _ = load_mae(path, norm_style="pre")
    imgs = torch.randn(2, 3, SIZE, SIZE)
    assert not torch.allclose(model.encoder.forward_features(imgs), upstream_encoder(saved["model"], imgs, "xformers"), atol=1e-2)


def test_our_checkpoint_round_trips_with_its_configuration(tmp_path):
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_MsLdLe", input_size=32, patch_size=8, norm_pix_loss=True)
    path = tmp_path / "ours.pth"
    ckpt.save_checkpoint({"model": model.state_dict(), "model_config": model.model_config, "epoch": 3}, path)
    loaded, report = load_mae(path)
    assert report.layout == "ours" and report.model_name == "mae_vit_tiny_MsLdLe"
    assert loaded.norm_pix_loss and loaded.loss_names == model.loss_names
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_missing_and_misshaped_tensors_are_refused(tmp_path):
    saved = upstream_checkpoint("timm")
    del saved["model"]["encoder.2.attn.proj.weight"]
    torch.save(saved, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing\.pth: does not fit .*missing encoder\.blocks\.2\.attn\.proj\.weight"):
        load_mae(tmp_path / "missing.pth")
    saved = upstream_checkpoint("timm")
    saved["model"]["decoder_pred.weight"] = torch.zeros(10, 256)
    torch.save(saved, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"shape\.pth: tensors of another shape: decoder_pred\.weight \[10, 256\]"):
        load_mae(tmp_path / "shape.pth")


def test_exported_encoder_loads_strictly_into_timm_and_gives_the_same_features(tmp_path):
    torch.manual_seed(0)
    model = create_model("cross_scale_mae_vit_base", input_size=128, patch_size=16).eval()
    pth, safetensors = export_encoder(model, tmp_path / "encoder")
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=128, num_classes=0).eval()
    vit.load_state_dict(torch.load(pth, weights_only=True), strict=True)
    imgs = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(imgs), model.encoder.forward_features(imgs))
    from_safetensors = ckpt.read_checkpoint(safetensors)["model"]
    assert from_safetensors.keys() == vit.state_dict().keys()


def test_export_writes_the_timm_arguments_that_rebuild_the_encoder_strictly(tmp_path):
    torch.manual_seed(0)
    model = create_model("cross_scale_mae_vit_tiny", input_size=32, patch_size=8).eval()  # 128 wide, 4 deep, 8 heads
    pth, _ = export_encoder(model, tmp_path / "encoder")
    config = json.loads((tmp_path / "encoder.json").read_text())
    assert config["timm_kwargs"] | {"embed_dim": 128, "depth": 4, "num_heads": 8, "img_size": 32, "patch_size": 8} == config["timm_kwargs"]
    assert "eps=1e-06" in config["norm_layer"] and "encoder.pth" in config["python"]
    vit = timm.create_model(config["architecture"], pretrained=False, **config["timm_kwargs"]).eval()
    vit.load_state_dict(torch.load(pth, weights_only=True), strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(imgs), model.encoder.forward_features(imgs))


def test_post_norm_encoders_are_not_exported_as_timm(tmp_path):
    model = create_model("mae_vit_tiny", input_size=32, patch_size=8, norm_style="post")
    with pytest.raises(CheckpointError, match="post-norm"):
        export_encoder(model, tmp_path / "encoder")
