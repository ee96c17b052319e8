"""The shipped configs for other tools (configs/pangaea/, configs/terratorch/): the PANGAEA encoder's features at
224 px equal this project's encoder's (no PANGAEA install: its two modules the encoder imports are stood in for), and
every band list, statistic and split in the configs is the one the exports' metadata and the samples hold."""

import csv
import importlib.util
import json
import logging
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from export_fixtures import exported_tiny

import models_vit
from util.weights import metadata
from util.weights.layouts import load_encoder, read_encoder
from util.weights.pos_embed import get_2d_sincos_pos_embed

ROOT = Path(__file__).resolve().parents[3]  # the repository root
CONFIGS = ROOT / "configs"


@pytest.fixture
def pangaea_encoder(monkeypatch):
    """configs/pangaea/cross_scale_mae_encoder.py's class, with PANGAEA's ``Encoder`` base (which stores its arguments
    and downloads nothing when ``download_url`` is null) and its numpy ``get_2d_sincos_pos_embed`` (MAE's: [1 + L, D])
    stood in for."""
    base = types.ModuleType("pangaea.encoders.base")

    class Encoder(torch.nn.Module):
        def __init__(
            self,
            model_name,
            input_bands,
            input_size,
            embed_dim,
            output_layers,
            output_dim,
            multi_temporal,
            multi_temporal_output,
            pyramid_output,
            encoder_weights,
            download_url,
        ):
            super().__init__()
            self.model_name, self.input_bands, self.input_size = model_name, input_bands, input_size
            self.embed_dim, self.output_layers, self.encoder_weights = embed_dim, output_layers, encoder_weights
            self.output_dim = [output_dim] * len(output_layers)

    base.Encoder = Encoder
    pos = types.ModuleType("pangaea.encoders.pos_embed")
    pos.get_2d_sincos_pos_embed = lambda dim, grid, cls_token=False: (
        get_2d_sincos_pos_embed(dim, grid, cls_token)[0].double().numpy()
    )
    for name, module in (
        ("pangaea", types.ModuleType("pangaea")),
        ("pangaea.encoders", types.ModuleType("pangaea.encoders")),
        ("pangaea.encoders.base", base),
        ("pangaea.encoders.pos_embed", pos),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location(
        "cross_scale_mae_encoder", CONFIGS / "pangaea" / "cross_scale_mae_encoder.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CrossScaleMAE_Encoder


def block_maps(vit, images, layers):
    """Our encoder's block outputs at ``layers`` as B x D x h x w maps (no final norm: untrained in pretraining)."""
    x, maps = vit._pos_embed(vit.patch_embed(images)), []
    side = vit.patch_embed.grid_size
    for i, block in enumerate(vit.blocks):
        x = block(x)
        if i in layers:
            maps.append(x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, *side))
    return maps


@pytest.mark.parametrize("resize", ["sincos", "bicubic"])
def test_pangaea_encoder_at_224_px_gives_our_encoders_features(tmp_path, pangaea_encoder, resize):
    _, done = exported_tiny(tmp_path, 13)  # pretrained at 32 px, patch 8
    bands = metadata.tool_band_names(metadata.read(done.directory), "pangaea")
    encoder = pangaea_encoder(
        encoder_weights=str(done.directory / "model.safetensors"),
        input_size=224,
        input_bands={"optical": bands},
        embed_dim=128,
        output_layers=[0, 1, 3],
        output_dim=128,
        download_url=None,
        patch_size=8,
        depth=4,
        num_heads=8,
        pos_embed_resize=resize,
    )
    encoder.load_encoder_weights(logging.getLogger("test"))
    ours = models_vit.vision_transformer(128, 4, 8, img_size=224, patch_size=8, in_chans=13).eval()
    weights = read_encoder(done.directory)
    if resize == "sincos":  # ours at 224 px: the sin-cos table of its 28 x 28 grid, every other tensor loaded
        ours.load_state_dict({k: v for k, v in weights.state_dict.items() if k != "pos_embed"}, strict=False)
    else:  # what this project's fine-tuning does: bicubic resampling of the stored 4 x 4 table
        load_encoder(ours, weights)
    images = torch.randn(2, 13, 1, 224, 224)
    with torch.no_grad():
        features = encoder.eval()({"optical": images})
        expected = block_maps(ours, images[:, :, 0], [0, 1, 3])
    assert [tuple(f.shape) for f in features] == [(2, 128, 28, 28)] * 3
    for got, want in zip(features, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    sincos = get_2d_sincos_pos_embed(128, 28)
    assert torch.equal(encoder.vit.pos_embed.detach(), sincos) == (resize == "sincos")


def test_pangaea_encoder_refuses_a_config_that_is_not_the_export(tmp_path, pangaea_encoder):
    _, done = exported_tiny(tmp_path, 3)
    args = {
        "encoder_weights": str(done.directory / "model.safetensors"),
        "input_size": 64,
        "embed_dim": 128,
        "input_bands": {"optical": ["B4", "B3", "B2"]},
        "output_layers": [3],
        "output_dim": 128,
        "download_url": None,
        "patch_size": 8,
        "depth": 4,
        "num_heads": 8,
    }
    with pytest.raises(ValueError, match="'depth': \\(12, 4\\)"):
        pangaea_encoder(**{**args, "depth": 12})
    with pytest.raises(ValueError, match="'in_chans': \\(4, 3\\)"):
        pangaea_encoder(**{**args, "input_bands": {"optical": ["B4", "B3", "B2", "B8"]}})
    encoder = pangaea_encoder(**args)
    state_file = done.directory / "model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(str(state_file))
    del state["blocks.3.mlp.fc2.bias"]
    save_file(state, str(state_file))
    with pytest.raises(RuntimeError, match="blocks.3.mlp.fc2.bias"):  # not a warning and zeros, as VIT_Encoder
        encoder.load_encoder_weights(logging.getLogger("test"))


def test_pangaea_configs_name_the_exports_bands(tmp_path):
    _, ms = exported_tiny(tmp_path, 13)
    s2 = yaml.safe_load((CONFIGS / "pangaea" / "cross_scale_mae_s2.yaml").read_text())
    assert s2["input_bands"]["optical"] == metadata.tool_band_names(metadata.read(ms.directory), "pangaea")
    model_args = json.loads((ms.directory / "config.json").read_text())["model_args"]
    assert {k: s2[k] for k in ("embed_dim", "patch_size", "depth", "num_heads")} == {
        k: model_args[k] for k in ("embed_dim", "patch_size", "depth", "num_heads")
    }
    rgb = yaml.safe_load((CONFIGS / "pangaea" / "cross_scale_mae_vit_base_rgb.yaml").read_text())
    fmow = metadata.describe(
        {},
        in_chans=3,
        input_size=128,
        patch_size=16,
        layout="upstream-timm",
        final_norm_trained=False,
        sincos_pos_embed=True,
    )
    assert rgb["input_bands"]["optical"] == metadata.tool_band_names(fmow, "pangaea") == ["B4", "B3", "B2"]
    for config in (s2, rgb):
        assert config["_target_"] == "pangaea.encoders.cross_scale_mae_encoder.CrossScaleMAE_Encoder"
        assert config["output_layers"][-1] == config["depth"] - 1 and config["output_dim"] == config["embed_dim"]


@pytest.mark.parametrize(
    "in_chans, config, suffix",
    [(3, "cross_scale_mae_upernet_rgb.yaml", ""), (13, "cross_scale_mae_upernet_s2.yaml", "_ms")],
)
def test_terratorch_configs_map_the_exports_bands_and_normalisation(tmp_path, in_chans, config, suffix):
    _, done = exported_tiny(tmp_path, in_chans)
    block = metadata.read(done.directory)
    text = yaml.safe_load((CONFIGS / "terratorch" / config).read_text())
    data, model = text["data"]["init_args"], text["model"]["init_args"]["model_args"]
    assert data["output_bands"] == data["dataset_bands"] == metadata.tool_band_names(block, "terratorch")
    assert (data["means"], data["stds"]) == (block["input"]["mean"], block["input"]["std"])
    assert data["constant_scale"] == pytest.approx(1 / block["input"]["scale"])
    assert model["backbone"] == f"timm_local-dir:output/pretrain_tiny{suffix}/encoder"  # train.sh's OUTPUT_DIR
    assert model["backbone_out_indices"] == model["necks"][0]["indices"] == [0, 1, 2, 3]
    assert isinstance(text["model"]["init_args"]["ignore_index"], int)
    sample = ROOT / data["train_data_root"]
    for split in ("train", "val"):
        with open(sample.parent / f"seg_{split}.csv") as f:
            stems = [Path(row["image_path"]).stem for row in csv.DictReader(f)]
        assert (ROOT / data[f"{split}_split"]).read_text().split() == stems


def test_pangaea_encoder_applies_a_trained_final_norm_to_the_last_block_only(tmp_path, pangaea_encoder):
    mae, done = exported_tiny(tmp_path, 3, encoder_norm=True)
    encoder = pangaea_encoder(
        encoder_weights=str(done.directory / "model.safetensors"),
        input_size=32,
        input_bands={"optical": ["B4", "B3", "B2"]},
        embed_dim=128,
        output_layers=[2, 3],
        output_dim=128,
        download_url=None,
        patch_size=8,
        depth=4,
        num_heads=8,
    )
    encoder.load_encoder_weights(logging.getLogger("test"))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = encoder.eval()({"optical": images})
        vit = mae.encoder
        x = vit.blocks[:3](vit._pos_embed(vit.patch_embed(images)))
        last = vit.norm(vit.blocks[3](x))
    for got, tokens in zip(features, (x, last)):
        torch.testing.assert_close(got, tokens[:, 1:].transpose(1, 2).reshape(2, 128, 4, 4), rtol=0, atol=1e-6)
