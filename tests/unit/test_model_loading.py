"""model_loading.py: the pretraining model a checkpoint describes (ours and both upstream layouts), and the timm
export."""

import json

import pytest
import timm
import torch
from upstream_layouts import SIZE, upstream_checkpoint, upstream_encoder

from model_loading import build_classifier, build_knn_encoder, export_encoder, init_mae, load_mae
from models_cross_scale_mae import create_model
from util.config import Bands
from util.errors import CheckpointError, UsageError
from util.run import checkpoint as ckpt
from util.weights.band_adaptation import BandAdaptation


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
    assert not torch.allclose(
        model.encoder.forward_features(imgs), upstream_encoder(saved["model"], imgs, "xformers"), atol=1e-2
    )


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
    with pytest.raises(
        CheckpointError, match=r"missing\.pth: does not fit .*missing encoder\.blocks\.2\.attn\.proj\.weight"
    ):
        load_mae(tmp_path / "missing.pth")
    saved = upstream_checkpoint("timm")
    saved["model"]["decoder_pred.weight"] = torch.zeros(10, 256)
    torch.save(saved, tmp_path / "shape.pth")
    with pytest.raises(
        CheckpointError, match=r"shape\.pth: tensors of another shape: decoder_pred\.weight \[10, 256\]"
    ):
        load_mae(tmp_path / "shape.pth")


def test_the_base_export_loads_strictly_into_timms_stock_vit_base(tmp_path):
    torch.manual_seed(0)
    model = create_model("cross_scale_mae_vit_base", input_size=128, patch_size=16).eval()
    exported = export_encoder(model, tmp_path / "encoder")
    config = json.loads((exported.directory / "config.json").read_text())
    assert config["architecture"] == "vit_base_patch16_224"  # the stock name fits: only input / pooling arguments
    vit = timm.create_model(
        "vit_base_patch16_224", pretrained=False, img_size=128, num_classes=0, final_norm=False
    ).eval()
    vit.load_state_dict(torch.load(exported.pth, weights_only=True), strict=True)
    imgs = torch.randn(2, 3, 128, 128)
    with torch.no_grad():  # the untrained final norm is exported as identity: the last block's output
        encoder = model.encoder
        torch.testing.assert_close(
            vit.forward_features(imgs), encoder.blocks(encoder._pos_embed(encoder.patch_embed(imgs)))
        )
    from_safetensors = ckpt.read_checkpoint(exported.directory / "model.safetensors")["model"]
    assert from_safetensors.keys() == vit.state_dict().keys()


def saved_mae(tmp_path, name="cross_scale_mae_vit_tiny", in_chans=3, file="ours.pth"):
    torch.manual_seed(0)
    model = create_model(name, input_size=SIZE, patch_size=8, in_chans=in_chans).eval()
    ckpt.save_checkpoint({"model": model.state_dict(), "model_config": model.model_config, "epoch": 9}, tmp_path / file)
    return model, tmp_path / file


def test_init_adapts_patch_embedding_and_decoder_pred_so_the_named_bands_are_predicted_as_by_the_rgb_model(tmp_path):
    rgb, path = saved_mae(tmp_path)
    model = create_model("cross_scale_mae_vit_tiny", input_size=SIZE, patch_size=8, in_chans=13).eval()
    report = init_mae(model, path, BandAdaptation(model_rgb=(3, 2, 1)), "cross_scale_mae_vit_tiny")

    assert report.adapted == [
        "patch_embed.proj: 3 RGB filters -> bands 3 2 1 of 13, other 10 bands zero",
        "decoder_pred: 3 RGB outputs -> bands 3 2 1 of 13, other 10 bands zero",
    ]
    assert report.missing == [] and report.unexpected == [] and report.epoch == 9
    imgs, noise = torch.randn(2, 13, SIZE, SIZE), torch.rand(2, 16)
    with torch.no_grad():
        latent, mask, ids = model.forward_encoder(imgs, 0.75, noise)
        rgb_latent, rgb_mask, rgb_ids = rgb.forward_encoder(imgs[:, [3, 2, 1]], 0.75, noise)
        torch.testing.assert_close(latent, rgb_latent)
        pred = model.forward_decoder(latent, ids)[1].reshape(2, 16, 64, 13)  # band-last inside each patch
        rgb_pred = rgb.forward_decoder(rgb_latent, rgb_ids)[1].reshape(2, 16, 64, 3)
    torch.testing.assert_close(pred[..., [3, 2, 1]], rgb_pred)
    assert not pred[..., [0, *range(4, 13)]].any()


def test_init_takes_a_multispectral_checkpoint_into_an_rgb_model_and_fills_another_variants_predictor(tmp_path):
    source, path = saved_mae(tmp_path, "mae_vit_tiny", in_chans=13)
    model = create_model("cross_scale_mae_vit_tiny", input_size=SIZE, patch_size=8)
    with pytest.raises(CheckpointError, match="give --checkpoint_rgb_bands"):
        init_mae(model, path, BandAdaptation(), "cross_scale_mae_vit_tiny")
    report = init_mae(model, path, BandAdaptation(checkpoint_rgb=(3, 2, 1)), "cross_scale_mae_vit_tiny")
    assert report.adapted[1] == "decoder_pred: outputs of bands 3 2 1 of 13 -> RGB, other 10 bands dropped"
    assert {k.split(".")[0] for k in report.missing} == {"predictor"}  # mae_vit_tiny has no cross-scale predictor
    rows = source.decoder_pred.weight.detach().reshape(64, 13, -1)[:, [3, 2, 1]].reshape(64 * 3, -1)
    torch.testing.assert_close(model.decoder_pred.weight.detach(), rows, rtol=0, atol=0)


@pytest.mark.parametrize("trained, now, noted", [(True, False, True), (False, True, True), (True, True, False)])
def test_init_notes_a_change_of_norm_pix_loss(tmp_path, capsys, trained, now, noted):
    torch.manual_seed(0)
    source = create_model("mae_vit_tiny", input_size=SIZE, patch_size=8, norm_pix_loss=trained)
    ckpt.save_checkpoint({"model": source.state_dict(), "model_config": source.model_config}, tmp_path / "src.pth")
    model = create_model("mae_vit_tiny", input_size=SIZE, patch_size=8, norm_pix_loss=now)
    init_mae(model, tmp_path / "src.pth", BandAdaptation(), "mae_vit_tiny")
    out = capsys.readouterr().out
    assert (f"pretrained with norm_pix_loss {trained}, this run has {now}" in out) == noted


def test_init_refuses_another_architecture_and_size_in_one_line(tmp_path):
    _, path = saved_mae(tmp_path)
    small = create_model("cross_scale_mae_vit_small", input_size=SIZE, patch_size=8)
    with pytest.raises(
        CheckpointError,
        match=r"ours\.pth: does not fit --model cross_scale_mae_vit_small \(another depth\?\): "
        r"missing encoder\.blocks\.4\.norm1\.weight",
    ):
        init_mae(small, path, BandAdaptation(), "cross_scale_mae_vit_small")
    saved = ckpt.read_checkpoint(path)
    saved["model"]["decoder_embed.weight"] = torch.zeros(256, 64)
    ckpt.save_checkpoint(saved, tmp_path / "narrow.pth")
    tiny = create_model("cross_scale_mae_vit_tiny", input_size=SIZE, patch_size=8)
    with pytest.raises(
        CheckpointError,
        match=r"narrow\.pth: tensors of another shape: decoder_embed\.weight \[256, 64\] "
        r"\(model has \[256, 128\]\); --model is cross_scale_mae_vit_tiny$",
    ):
        init_mae(tiny, tmp_path / "narrow.pth", BandAdaptation(), "cross_scale_mae_vit_tiny")
    bigger = create_model("cross_scale_mae_vit_tiny", input_size=48, patch_size=8)
    with pytest.raises(
        UsageError, match=r"pretrained on 32 px images in 8 px patches, this run has --input_size 48 --patch_size 8"
    ):
        init_mae(bigger, path, BandAdaptation(), "cross_scale_mae_vit_tiny")
    torch.save(upstream_checkpoint("xformers"), tmp_path / "x.pth")
    with pytest.raises(UsageError, match="its blocks are post-norm, this run's pre-norm: give --norm_style post"):
        init_mae(
            create_model("mae_vit_tiny", input_size=SIZE, patch_size=8),
            tmp_path / "x.pth",
            BandAdaptation(),
            "mae_vit_tiny",
        )


def test_evaluation_loaders_pass_the_band_flags_to_the_encoder_load(tmp_path, capsys):
    source, path = saved_mae(tmp_path, "mae_vit_tiny", in_chans=13)
    bands = Bands(checkpoint_rgb_bands=(3, 2, 1))
    classifier, weights = build_classifier(
        5,
        finetune=str(path),
        model=None,
        input_size=SIZE,
        patch_size=None,
        bands=bands,
        global_pool=False,
        head_init_std=2e-5,
    )
    encoder, _, _ = build_knn_encoder(
        str(path), weights, "vit_tiny_patch16", input_size=SIZE, patch_size=8, bands=bands
    )
    expected = source.encoder.patch_embed.proj.weight.detach()[:, [3, 2, 1]]
    for model in (classifier, encoder):
        torch.testing.assert_close(model.patch_embed.proj.weight.detach(), expected, rtol=0, atol=0)
    assert (
        capsys.readouterr().out.count(
            "adapted patch_embed.proj: filters of bands 3 2 1 of 13 -> RGB, other 10 bands dropped"
        )
        == 2
    )


def test_non_finite_weights_are_refused_by_init_and_by_every_encoder_load(tmp_path):
    from util.weights.layouts import read_encoder

    _, path = saved_mae(tmp_path)
    state = ckpt.read_checkpoint(path)
    state["model"]["encoder.blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    ckpt.save_checkpoint(state, path)
    with pytest.raises(
        CheckpointError, match=r"ours.pth: non-finite values \(NaN/inf\) in encoder.blocks.0.attn.qkv.weight"
    ):
        init_mae(
            create_model("cross_scale_mae_vit_tiny", input_size=SIZE, patch_size=8),
            path,
            BandAdaptation(),
            "mae_vit_tiny",
        )
    with pytest.raises(CheckpointError, match=r"ours.pth: non-finite values \(NaN/inf\) in blocks.0.attn.qkv.weight"):
        read_encoder(path)


def test_a_knn_label_is_the_checkpoints_path_relative_to_the_repository_where_it_lies_inside_it(tmp_path, monkeypatch):
    """knn.sh passes absolute paths: the figure's legend showed the author's /work/... paths, which no clone has."""
    import util.config
    from util.weights.layouts import read_encoder

    _, path = saved_mae(tmp_path)
    weights = read_encoder(path)

    def label() -> str:
        return build_knn_encoder(str(path), weights, "vit_tiny_patch16", input_size=SIZE, patch_size=8, bands=Bands())[
            1
        ]

    assert label() == str(path)  # outside the repository: the path as given
    monkeypatch.setattr(util.config, "REPO", tmp_path.parent)
    assert label() == f"{tmp_path.name}/{path.name}"


def test_no_two_checkpoints_share_a_knn_label_whatever_the_path_given(tmp_path, monkeypatch):
    """A relative path from outside the repository read as the repository's own checkpoint of that name, and
    ``REPO/output/../../x`` as one inside it; a clone reached through a link read as outside."""
    import util.config
    from util.weights.layouts import read_encoder

    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    _, inside = saved_mae(repo / "output")
    _, outside = saved_mae(elsewhere / "output")
    (tmp_path / "link").symlink_to(repo)
    monkeypatch.setattr(util.config, "REPO", repo)

    def label(spec) -> str:
        weights = read_encoder(spec)
        return build_knn_encoder(str(spec), weights, "vit_tiny_patch16", input_size=SIZE, patch_size=8, bands=Bands())[
            1
        ]

    relative = f"output/{inside.name}"
    assert label(inside) == label(tmp_path / "link" / relative) == relative
    monkeypatch.chdir(elsewhere)
    assert label(relative) == str(outside)  # the other checkpoint of that name: absolute
    assert label(f"{repo}/output/../../elsewhere/{relative}") == str(outside)
    monkeypatch.chdir(repo)
    assert label(relative) == relative
