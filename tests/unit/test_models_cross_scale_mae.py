import math
from functools import partial

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import models_cross_scale_mae as models_mae
from models_cross_scale_mae import create_model, cross_scale_contrastive_loss
from models_vit import PRESETS

TINY = dict(input_size=32, patch_size=8)


def tiny_model(name: str = "cross_scale_mae_vit_tiny", **kwargs) -> models_mae.CrossScaleMAE:
    torch.manual_seed(0)
    return create_model(name, **{**TINY, **kwargs})


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large", "huge"])
def test_every_preset_has_the_expected_shapes(size):
    with torch.device("meta"):
        model = create_model(f"cross_scale_mae_vit_{size}", input_size=32, patch_size=16)
    out = model(torch.empty(2, 3, 32, 32, device="meta"), crop_params=(0, 0, 16, 16))
    assert out["pred"].shape == (2, 4, 16 * 16 * 3)
    assert out["mask"].shape == (2, 4)
    assert set(out) == {"loss", "rec_orig", "rec_crop", "cross_pred", "cross_cons", "pred", "mask"}
    assert model.encoder.embed_dim == PRESETS[size].embed_dim
    assert len(model.encoder.blocks) == PRESETS[size].depth
    assert len(model.decoder) == PRESETS[size].decoder_depth


def test_base_has_upstreams_trainable_parameter_count():
    with torch.device("meta"):
        model = create_model("cross_scale_mae_vit_base", input_size=128, patch_size=16)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 113_755_520
    assert sum(p.numel() for p in model.predictor.parameters()) == 2_099_840


def test_upstream_names_map_to_loss_terms():
    expected = {
        "mae_vit_tiny": ("rec_orig",),
        "mae_vit_tiny_MsLd": ("rec_orig", "rec_crop"),
        "mae_vit_tiny_MsLdCd": ("rec_orig", "rec_crop", "cross_pred"),
        "mae_vit_tiny_MsLdCe": ("rec_orig", "rec_crop", "enc_pred"),
        "mae_vit_tiny_MsLdCeCd": ("rec_orig", "rec_crop", "cross_pred", "cross_cons"),
        "mae_vit_tiny_MsLdLe": ("rec_orig", "rec_crop", "latent"),
        "mae_vit_tiny_MsLdLeCd": ("rec_orig", "rec_crop", "cross_pred", "latent"),
        "cross_scale_mae_vit_tiny": ("rec_orig", "rec_crop", "cross_pred", "cross_cons"),
    }
    for name, terms in expected.items():
        model = models_mae.__dict__[name](**TINY)
        assert model.loss_names == terms, name
        out = model(torch.randn(3, 3, 32, 32))
        assert tuple(k for k in out if k not in ("loss", "pred", "mask")) == terms, name
        assert torch.isclose(out["loss"], sum(out[t] for t in terms)), name
    assert not hasattr(models_mae.mae_vit_tiny(**TINY), "predictor")


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="model 'mae_vit_base_cross' is unknown"):
        create_model("mae_vit_base_cross")


def test_loss_weights_scale_terms_and_reject_unknown_keys():
    model = tiny_model(loss_weights={"cross_cons": 0.5, "rec": 2.0})
    out = model(torch.randn(4, 3, 32, 32))
    expected = 2 * (out["rec_orig"] + out["rec_crop"]) + out["cross_pred"] + 0.5 * out["cross_cons"]
    assert torch.isclose(out["loss"], expected)
    with pytest.raises(ValueError, match="loss_weights: unknown term"):
        tiny_model(loss_weights={"contrast": 1.0})


def test_batched_views_equal_two_sequential_passes():
    model = tiny_model().eval()
    imgs = torch.randn(4, 3, 32, 32)
    noise = torch.rand(2, 4, 16)
    batched = model(imgs, noise=noise, crop_params=(3, 5, 20, 18))
    model.batched_views = False
    sequential = model(imgs, noise=noise, crop_params=(3, 5, 20, 18))
    for key in batched:
        torch.testing.assert_close(batched[key], sequential[key], rtol=1e-5, atol=1e-6)


def test_fixed_noise_and_crop_make_the_forward_deterministic():
    model = tiny_model()
    imgs = torch.randn(4, 3, 32, 32)
    noise = torch.rand(2, 4, 16)
    first = model(imgs, noise=noise, crop_params=(0, 4, 16, 24))
    torch.manual_seed(123)  # must not matter
    second = model(imgs, noise=noise, crop_params=(0, 4, 16, 24))
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)


def test_masking_keeps_the_lowest_noise_patches():
    model = tiny_model()
    noise = torch.rand(2, 2, 16)
    out = model(torch.randn(2, 3, 32, 32), mask_ratio=0.75, noise=noise)
    kept = out["mask"] == 0
    assert kept.sum(1).tolist() == [4, 4]
    assert torch.equal(kept, noise[0] <= noise[0].sort(1).values[:, 3:4])


def test_batch_crop_box_is_shared_and_sample_boxes_differ():
    model = tiny_model()
    imgs = torch.randn(1, 3, 32, 32).expand(6, -1, -1, -1)
    shared = model.crop_view(imgs)
    assert all(torch.equal(shared[0], view) for view in shared)
    model.crop_mode = "sample"
    per_sample = model.crop_view(imgs)
    assert not all(torch.equal(per_sample[0], view) for view in per_sample)


def test_crop_view_is_the_box_resized_back_to_the_input_size():
    model = tiny_model()
    imgs = torch.arange(32.0).repeat(1, 3, 32, 1)  # value = column index
    crop = model.crop_view(imgs, crop_params=(0, 8, 32, 16))
    assert crop.shape == imgs.shape
    assert 7.5 <= crop.min() and crop.max() <= 23.5  # only columns 8..23 contribute


@pytest.mark.parametrize("height, width", [(32, 32), (24, 40)])
def test_per_image_crops_in_one_pass_are_the_per_image_resized_crops(height, width):
    """--crop_mode sample: one grid_sample for the batch gives the pixels of torchvision's resized_crop per image
    (what it ran before). Tolerance: the two compute the sampling coordinates by different float32 formulas, a few
    ULPs of the image side apart (< 1e-5 px), which moves a value by at most that times the largest step between
    neighbouring pixels (1 for these images in [0, 1]); a wrong pixel or offset would differ by ~0.1."""
    model = tiny_model()
    model.crop_mode = "sample"
    torch.manual_seed(0)
    imgs = torch.rand(16, 3, height, width)
    boxes = model.sample_crop_params(imgs)
    assert boxes.shape == (16, 4) and len({tuple(box) for box in boxes.tolist()}) > 1
    resize = partial(TF.resized_crop, size=[height, width], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    expected = torch.stack([resize(img, *box) for img, box in zip(imgs, boxes.tolist())])
    torch.testing.assert_close(model.crop_view(imgs, boxes), expected, atol=1e-5, rtol=0)


def direct_upstream_contrastive(f1, f2, temperature):
    """The per-anchor formula in the docstring of models_cross_scale_mae.cross_scale_contrastive_loss, with Python
    loops."""
    z = torch.nn.functional.normalize(torch.cat([f1, f2]), dim=1).tolist()
    n = len(z) // 2
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        sim = [math.exp(sum(a * b for a, b in zip(z[i], z[k])) / temperature) for k in range(2 * n)]
        negatives = sum(s for k, s in enumerate(sim) if k not in (i, partner))
        total += -math.log(sim[partner] / (negatives + 1e-8))
    return total / (2 * n)


def test_contrastive_loss_equals_the_direct_formula():
    f1 = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [3.0, 1.0, 1.0]])
    f2 = torch.tensor([[0.9, 0.2, 2.1], [0.0, -1.0, 0.3], [-1.0, 2.0, 0.5]])
    got = cross_scale_contrastive_loss(f1, f2, temperature=0.5)
    assert got.item() == pytest.approx(direct_upstream_contrastive(f1, f2, 0.5), rel=1e-6)


def test_ntxent_option_keeps_the_positive_in_the_denominator():
    torch.manual_seed(0)
    f1, f2 = torch.randn(5, 8), torch.randn(5, 8)
    upstream = cross_scale_contrastive_loss(f1, f2, 0.5, "upstream")
    ntxent = cross_scale_contrastive_loss(f1, f2, 0.5, "ntxent")
    z = torch.nn.functional.normalize(torch.cat([f1, f2]), dim=1)
    sim = (z @ z.T / 0.5).exp()
    pos = torch.cat([sim.diagonal(5), sim.diagonal(-5)])
    expected = -(pos / (sim.sum(1) - sim.diagonal())).log().mean()
    assert ntxent.item() == pytest.approx(expected.item(), rel=1e-5)
    assert ntxent > upstream


def test_a_few_optimiser_steps_lower_the_loss():
    model = tiny_model()
    imgs = torch.randn(4, 3, 32, 32)
    noise = torch.rand(2, 4, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = model(imgs, noise=noise, crop_params=(4, 4, 24, 24))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_encoder_norm_gets_gradients_only_when_enabled():
    for enabled in (False, True):
        model = tiny_model(encoder_norm=enabled)
        model(torch.randn(4, 3, 32, 32))["loss"].backward()
        assert (model.encoder.norm.weight.grad is not None) == enabled
        without_gradient = {name for name, p in model.named_parameters() if p.requires_grad and p.grad is None}
        assert without_gradient == set(model.unused_parameters)  # what DDP is told to ignore, exactly


def test_norm_pix_loss_standardises_the_target():
    model = tiny_model(norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 32) * 5 + 3
    target = model.patchify(imgs)
    normalised = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    mask = torch.ones(2, 16)
    assert model.reconstruction_loss(imgs, normalised, mask).item() == pytest.approx(0.0, abs=1e-10)
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny_model(mask_ratio=1.0)
    with pytest.raises(ValueError, match="not divisible"):
        create_model("mae_vit_tiny", input_size=30, patch_size=8)
    with pytest.raises(ValueError, match="noise must have shape"):
        tiny_model()(torch.randn(2, 3, 32, 32), noise=torch.rand(2, 16))


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_all_valid_weights_give_the_unweighted_loss(norm_pix_loss):
    torch.manual_seed(0)
    model = tiny_model(in_chans=4, norm_pix_loss=norm_pix_loss).eval()
    imgs = torch.randn(2, 4, 32, 32)
    noise = torch.rand(2, 2, model.num_patches)
    plain = model(imgs, noise=noise, crop_params=[4, 4, 20, 20])
    weighted = model(imgs, noise=noise, crop_params=[4, 4, 20, 20], valid=torch.ones(2, 1, 32, 32))
    for name in ("rec_orig", "rec_crop", "loss"):
        torch.testing.assert_close(weighted[name], plain[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_nodata_pixels_are_no_reconstruction_target(norm_pix_loss):
    """Whatever the no-data pixels hold, the reconstruction loss is unchanged, and the prediction of those pixels gets
    no gradient; a patch that is half no-data is standardised (norm_pix_loss) by its valid pixels only."""
    model = tiny_model(in_chans=4, norm_pix_loss=norm_pix_loss)
    valid = torch.ones(2, 1, 32, 32)
    valid[:, :, :12, :12] = 0  # one whole patch and parts of three others
    imgs = torch.randn(2, 4, 32, 32)
    other = imgs.clone()
    other[:, :, :12, :12] = 100.0
    mask = torch.ones(2, model.num_patches)
    pred = torch.randn(2, model.num_patches, 8 * 8 * 4, requires_grad=True)
    losses = [model.reconstruction_loss(x, pred, mask, valid) for x in (imgs, other)]
    torch.testing.assert_close(losses[0], losses[1])
    unweighted = model.reconstruction_loss(other, pred, mask)  # the 100s would count (and skew the patch statistics)
    assert abs(unweighted - losses[1]) > 0.01 * losses[1]
    losses[0].backward()
    grad = model.unpatchify(pred.grad)  # [2, 4, 32, 32]
    assert grad[:, :, :12, :12].abs().max() == 0 and grad[:, :, 12:, 12:].abs().min() > 0
