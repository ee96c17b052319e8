"""util/weights/export.py, metadata.py, published.py, tools/export_weights.py: exports in timm's layout that timm loads
in one line with every tensor, for RGB and 13 bands; the remote-sensing metadata; every size preset's architecture."""

import json

import pytest
import timm
import torch
from export_fixtures import S2_STATS, exported_tiny, run_args
from timm.data import resolve_data_config
from upstream_layouts import upstream_checkpoint

import models_vit
from model_loading import export_checkpoint, export_encoder
from models_cross_scale_mae import create_model
from util.errors import CheckpointError, UsageError
from util.files import file_sha256
from util.run import checkpoint as checkpoint_io
from util.weights import export, metadata, published
from util.weights.layouts import load_encoder, read_encoder


def differing(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors of ``model`` that are missing, extra or not equal to ``expected``."""
    state = model.state_dict()
    return sorted(set(state) ^ set(expected)) + [
        k for k in state.keys() & expected.keys() if not torch.equal(state[k], expected[k])
    ]


def exported_tensors(mae) -> dict[str, torch.Tensor]:
    """The encoder's tensors the export holds: all but an untrained final norm (exported as identity)."""
    skip = () if mae.encoder_norm else ("norm.",)
    return {k: v for k, v in mae.encoder.state_dict().items() if not k.startswith(skip)}


def pretraining_features(mae, images):
    """The encoder's output on whole images as pretraining computes it (final norm only with encoder_norm)."""
    vit = mae.encoder
    x = vit._pos_embed(vit.patch_embed(images))
    x = vit.blocks(x)
    return vit.norm(x) if mae.encoder_norm else x


@pytest.mark.parametrize("in_chans", [3, 13])
def test_timm_local_dir_loads_every_tensor_and_gives_the_pretraining_features(tmp_path, in_chans):
    mae, done = exported_tiny(tmp_path, in_chans)
    vit = timm.create_model(f"local-dir:{done.directory}", pretrained=True).eval()
    assert differing(vit, exported_tensors(mae)) == []  # the 13-band patch embedding included
    images = torch.randn(2, in_chans, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(images), pretraining_features(mae, images), rtol=0, atol=0)
    data = resolve_data_config({}, model=vit)
    assert tuple(data["input_size"]) == (in_chans, 32, 32) and list(data["mean"]) == run_args(in_chans)["mean"]
    assert torch.load(done.pth, weights_only=True).keys() == exported_tensors(mae).keys()


@pytest.mark.parametrize("in_chans", [3, 13])
def test_pretrained_cfg_overlay_recipe_loads_every_tensor_and_timms_silent_path_is_detected(tmp_path, in_chans):
    mae, done = exported_tiny(tmp_path, in_chans)
    config = json.loads((done.directory / "config.json").read_text())
    file = str(done.directory / "model.safetensors")
    recipe = timm.create_model(
        config["architecture"],
        pretrained=True,
        **config["model_args"],
        pretrained_cfg_overlay=dict(config["pretrained_cfg"], file=file),
    )
    assert differing(recipe, exported_tensors(mae)) == []
    # without the config's first_conv (null for C != 3), timm adapts the 13-band patch embedding as RGB, fails,
    # deletes it and loads the rest with strict=False: the comparison above is what catches it
    naive = timm.create_model(
        config["architecture"], pretrained=True, **config["model_args"], pretrained_cfg_overlay={"file": file}
    )
    assert differing(naive, exported_tensors(mae)) == ([] if in_chans == 3 else ["patch_embed.proj.weight"])


def test_a_trained_final_norm_is_exported_as_layernorm(tmp_path):
    mae, done = exported_tiny(tmp_path, 3, encoder_norm=True)
    config = json.loads((done.directory / "config.json").read_text())
    assert config["model_args"]["final_norm"] is True and config["remote_sensing"]["final_norm"]["trained"] is True
    vit = timm.create_model(f"local-dir:{done.directory}", pretrained=True).eval()
    assert differing(vit, exported_tensors(mae)) == [] and "norm.weight" in vit.state_dict()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(images), pretraining_features(mae, images), rtol=0, atol=0)


@pytest.mark.parametrize("name", models_vit.CLASSIFIER_PRESETS)
def test_no_export_names_an_architecture_its_weights_do_not_fit(name):
    size, patch = models_vit.classifier_preset(name)
    with torch.device("meta"):  # every preset, huge included, without memory
        encoder = models_vit.vision_transformer(
            **models_vit.PRESETS[size].encoder(), img_size=8 * patch, patch_size=patch
        )
    args = export.timm_model_args(encoder, final_norm=False)
    shapes = {k: tuple(v.shape) for k, v in encoder.state_dict().items() if not k.startswith("norm.")}
    architecture, alone = export.timm_architecture(args, shapes)
    export.check_fits({"architecture": architecture, "model_args": args}, shapes, name)  # as local-dir builds it
    expected = {"base": "vit_base_patch16_224", "large": "vit_large_patch16_224"}.get(size)
    if size == "huge" and patch == 14:
        expected = "vit_huge_patch14_224"
    assert (architecture, alone) == ((expected, True) if expected else (export.GENERIC_ARCHITECTURE, False))
    if alone:  # the stock name builds these tensors from the input / pooling arguments alone
        assert export._meta_shapes(architecture, {k: args[k] for k in export.USE_ARGS}) == shapes
    else:
        with pytest.raises(CheckpointError, match="does not fit"):
            export.check_fits(
                {"architecture": architecture, "model_args": {k: args[k] for k in export.USE_ARGS}}, shapes, name
            )


def test_the_tiny_export_says_its_entry_point_fits_only_with_model_args(tmp_path):
    _, done = exported_tiny(tmp_path, 3)
    config = json.loads((done.directory / "config.json").read_text())
    assert config["architecture"] == export.GENERIC_ARCHITECTURE
    assert "no stock timm ViT has this shape (embed_dim 128, depth 4, num_heads 8" in config["architecture_note"]
    assert list(config["model_args"]) == list(export.MODEL_ARGS)


def test_metadata_of_the_embedded_samples(tmp_path):
    _, rgb = exported_tiny(tmp_path / "rgb", 3)
    block = metadata.read(rgb.directory)
    assert [b["name"] for b in block["bands"]] == ["B04", "B03", "B02"] and block["sensor"] == "sentinel-2"
    assert metadata.tool_band_names(block, "terratorch") == ["RED", "GREEN", "BLUE"]
    assert block["gsd_m"] == 10.0 and block["input"]["scale"] == 255.0 and block["input"]["dtype"] == "uint8"
    assert block["position_embedding"]["kind"] == "fixed-2d-sincos" and block["final_norm"]["exported_as"] == "identity"
    assert block["licence"] == "CC-BY-NC-4.0" and block["model"]["ssl_method"] == "cross-scale-mae"
    assert block["model"]["epochs"] == 2 and block["source"]["checkpoint"] == "checkpoint-last.pth"
    config = json.loads((rgb.directory / "config.json").read_text())
    assert config["pretrained_cfg"]["first_conv"] == "patch_embed.proj"

    _, ms = exported_tiny(tmp_path / "ms", 13)
    block = metadata.read(ms.directory)
    assert [b["name"] for b in block["bands"]] == [b.name for b in metadata.SENTINEL2]
    assert block["bands"][8]["aliases"] == {"torchgeo": "B8a", "terratorch": "NIR_NARROW", "pangaea": "B8A"}
    assert block["gsd_m"] == 20.0 and block["input"]["scale"] == 1.0 and "x 10000" in block["input"]["units"]
    assert block["band_names_from"] == "declared in band_stats.json"
    config = json.loads((ms.directory / "config.json").read_text())
    assert config["pretrained_cfg"]["first_conv"] is None and config["pretrained_cfg"]["input_size"] == [13, 32, 32]
    assert config["pretrained_cfg"]["std"] == json.loads(S2_STATS.read_text())["std"]


def test_band_names_in_any_tools_spelling_resolve_to_one_band():
    for names in (["B8A"], ["b8a"], ["B8a"], ["NIR_NARROW"]):
        assert metadata.resolve_bands(names) == ("sentinel-2", [metadata.SENTINEL2[8].entry()])
    assert metadata.resolve_bands(["RED", "GREEN", "BLUE"])[0] == "rgb"  # a generic RGB camera, not Sentinel-2
    assert metadata.resolve_bands(["B4", "B3", "B2"])[0] == "sentinel-2"
    _, bands = metadata.resolve_bands(["B4", "B3", "B2", "B5"], sensor="landsat")
    assert bands[3]["aliases"]["terratorch"] == "NIR_NARROW" and bands[3]["aliases"]["pangaea"] is None
    assert metadata.resolve_bands(["VV", "VH"])[0] == "other"
    with pytest.raises(UsageError, match="a band is named twice"):
        metadata.resolve_bands(["B8A", "b8a"])
    with pytest.raises(UsageError, match="two names are one sentinel-2 band"):
        metadata.resolve_bands(["B8A", "NIR_NARROW"])
    with pytest.raises(UsageError, match="--band_names: VV not landsat band"):
        metadata.resolve_bands(["B4", "VV"], sensor="landsat")
    with pytest.raises(UsageError, match="pangaea has no name for band"):
        metadata.tool_band_names({"bands": bands}, "pangaea")


def test_describe_takes_names_from_flags_stats_or_knowledge_and_says_when_it_has_none():
    common = {"in_chans": 4, "input_size": 32, "patch_size": 8, "final_norm_trained": False, "sincos_pos_embed": True}
    flags = {"in_chans": 4, "bands": [3, 2, 1, 7], "band_stats": str(S2_STATS), "mean": [1] * 4, "std": [2] * 4}
    block = metadata.describe(flags, **common)
    assert [b["name"] for b in block["bands"]] == ["B04", "B03", "B02", "B08"] and block["gsd_m"] is None
    assert "unknown" in block["gsd_note"] and block["input"]["dtype"] == "uint16"
    unnamed = metadata.describe({"in_chans": 4, "mean": [1] * 4, "std": [2] * 4}, **common)
    assert unnamed["bands"] is None and "give --band_names" in unnamed["band_names_from"]
    named = metadata.describe(
        {"in_chans": 4, "mean": [1] * 4, "std": [2] * 4},
        **common,
        gsd_m=0.5,
        band_names=["SR_B4", "SR_B3", "SR_B2", "SR_B5"],
    )
    assert named["sensor"] == "landsat" and named["gsd_m"] == 0.5
    with pytest.raises(UsageError, match="3 name\\(s\\) for a 4-band encoder"):
        metadata.describe({"mean": [1] * 4, "std": [2] * 4}, **common, band_names=["B04", "B03", "B02"])
    with pytest.raises(UsageError, match="records no normalisation for its 4 bands: give --band_stats"):
        metadata.describe({"in_chans": 4}, **common)
    with pytest.raises(UsageError, match="--gsd -1"):
        metadata.describe(flags, **common, gsd_m=-1.0)


def test_export_tool_on_upstreams_layout_and_ours(tmp_path, capsys):
    import tools.export_weights as tool

    torch.save(upstream_checkpoint("timm"), tmp_path / "up.pth")
    tool.main(
        tool.get_args_parser().parse_args(
            [str(tmp_path / "up.pth"), "--output", str(tmp_path / "up"), "--hashed_pth", "cross_scale_mae_vit_tiny"]
        )
    )
    printed = capsys.readouterr().out
    block = metadata.read(tmp_path / "up")
    assert block["dataset"]["name"] == "fMoW-RGB" and [b["name"] for b in block["bands"]] == ["RED", "GREEN", "BLUE"]
    assert block["model"]["ssl_method"] == "cross-scale-mae" and block["source"]["layout"] == "upstream-timm"
    assert block["gsd_m"] is None and "bands: RED GREEN BLUE" in printed
    hashed = next((tmp_path / "up").glob("cross_scale_mae_vit_tiny-*.pth"))
    assert hashed.name == f"cross_scale_mae_vit_tiny-{file_sha256(hashed)[:8]}.pth"
    weights = read_encoder(tmp_path / "up")  # our own loaders read an export folder
    assert weights.final_norm is False and "norm.weight" not in weights.state_dict
    vit = timm.create_model(f"local-dir:{tmp_path / 'up'}", pretrained=True)
    assert differing(vit, weights.state_dict) == []

    mae, ckpt = exported_tiny(tmp_path, 13)[0], tmp_path / "ours.pth"
    checkpoint_io.save_checkpoint(
        {"model": mae.state_dict(), "model_config": mae.model_config, "epoch": 4, "args": run_args(13)}, ckpt
    )
    again = export_checkpoint(ckpt, tmp_path / "again")
    assert (again.directory / "model.safetensors").read_bytes() == (
        tmp_path / "encoder" / "model.safetensors"
    ).read_bytes()
    assert metadata.read(again.directory)["model"]["epochs"] == 5
    classifier = models_vit.create_classifier("vit_tiny_patch16", 2, img_size=32, patch_size=8, in_chans=13).eval()
    report = load_encoder(classifier, read_encoder(again.directory))  # --finetune DIR: norm left fresh, as pretrained
    assert report.loaded == len(exported_tensors(mae))


def test_export_refuses_what_timm_cannot_build(tmp_path):
    with pytest.raises(CheckpointError, match="post-norm"):
        export_encoder(create_model("mae_vit_tiny", input_size=32, patch_size=8, norm_style="post"), tmp_path / "e")
    with pytest.raises(CheckpointError, match="LayerNorm eps 1e-05"):
        export_encoder(create_model("mae_vit_tiny", input_size=32, patch_size=8, norm_eps=1e-5), tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_published_definition_loads_a_local_file_with_its_hash_checked(tmp_path):
    entry = published.PUBLISHED["FMOW_RGB_BASE"]
    assert entry["source_md5"] == "0c33995da85c112d9602f89d5b186bbc" and entry["meta"]["img_size"] == 128
    shapes = {"patch_embed.proj.weight": (768, 3, 16, 16), "pos_embed": (1, 65, 768), "blocks.11.mlp.fc2.bias": (768,)}
    state = {k: torch.zeros(s) for k, s in shapes.items()}
    plain = tmp_path / "plain.pth"
    torch.save(state, plain)
    digest = file_sha256(plain)
    good = tmp_path / f"{entry['stem']}-{digest[:8]}.pth"
    plain.rename(good)
    assert published.load_state_dict("FMOW_RGB_BASE", good).keys() == state.keys()
    bad = tmp_path / f"{entry['stem']}-{'0' * 8}.pth"
    good.rename(bad)
    with pytest.raises(CheckpointError, match="does not start with 00000000"):
        published.load_state_dict("FMOW_RGB_BASE", bad)
    with pytest.raises(CheckpointError, match="expected cross_scale_mae_vit_base_patch16_128_fmow_rgb-<sha256"):
        published.load_state_dict("FMOW_RGB_BASE", tmp_path / "other.pth")
    images = torch.full((1, 3, 2, 2), 255.0)
    torch.testing.assert_close(
        published.transforms()(images)[0, :, 0, 0], (1 - torch.tensor(published.MEAN)) / torch.tensor(published.STD)
    )


def test_the_same_encoder_exports_to_the_same_bytes(tmp_path):
    first, second = exported_tiny(tmp_path / "a", 13)[1], exported_tiny(tmp_path / "b", 13)[1]
    for name in ("model.safetensors", "config.json"):
        assert (first.directory / name).read_bytes() == (second.directory / name).read_bytes()
    assert file_sha256(first.pth) == file_sha256(second.pth)  # the hashed .pth name depends on the tensors only
