"""Writing an encoder in timm's own layout, which timm, torchgeo, TerraTorch and PANGAEA load in one line: a folder
with ``config.json`` and ``model.safetensors`` (what ``timm.create_model("local-dir:DIR", pretrained=True)`` reads,
timm 1.0.29 ``models/_hub.py``: ``load_model_config_from_path``, ``load_state_dict_from_path``).

``config.json``::

    architecture     a registered timm entry point (``timm_architecture``)
    num_classes      0 (a feature extractor; the head is the user's)
    num_features     embed_dim
    global_pool      "token" (cls token) or "avg" (a fine-tuned classifier's patch mean + fc_norm)
    model_args       every shape argument (``MODEL_ARGS``): timm applies them over the entry point's defaults
    pretrained_cfg   timm's fields: input_size (C, H, W), per-band mean / std, first_conv (null when C != 3, so that
                     timm's ``load_pretrained`` never tries its RGB adaptation, which deletes a multispectral patch
                     embedding and loads the rest with strict=False), num_classes 0, licence, paper, notes
    architecture_note  whether the entry point's own defaults fit the weights, or only with model_args
    remote_sensing   bands, units, normalisation, GSD, ... (``util.weights.metadata``, the schema)

Every export is checked before it is written: the model ``config.json`` describes, built by timm on the meta device,
must have exactly the tensors (names and shapes) of ``model.safetensors``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
from safetensors.torch import save_file as save_safetensors
from timm.models.vision_transformer import Block, VisionTransformer

from util.errors import CheckpointError
from util.files import write_atomically
from util.weights import metadata
from util.weights.pos_embed import get_2d_sincos_pos_embed

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"  # the first of timm's preferred file names in a local dir
# The model_args of every export, in this order.
MODEL_ARGS = (
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "class_token",
    "global_pool",
    "final_norm",
    "num_classes",
)
# Arguments that say how an encoder is used (input size and bands, pooling, head), not what it is: an entry point
# "fits" the weights when it has their tensors built with only these (timm sets the first two from pretrained_cfg).
USE_ARGS = ("img_size", "in_chans", "global_pool", "final_norm", "num_classes")
# timm's stock ViTs: vit_{size}_patch{p}_{img} with timm's ViT defaults otherwise (LayerNorm eps 1e-6, pre-norm
# blocks, cls token, qkv bias, MLP ratio 4) - the design of this project's encoders.
STOCK_VIT = re.compile(r"vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)")
STOCK_WIDTHS = {"tiny": 192, "small": 384, "base": 768, "large": 1024, "huge": 1280}  # ViT paper / DeiT widths
# The entry point for shapes no stock timm ViT has (upstream's tiny 128 x 4 and small 512 x 8 presets, ViT-H/16):
# timm's reference ViT, whose defaults are VisionTransformer's own; model_args replace every shape argument, and
# architecture_note says that the name alone does not fit.
GENERIC_ARCHITECTURE = "vit_base_patch16_224"


class Export(NamedTuple):
    directory: Path  # config.json + model.safetensors
    pth: Path | None  # the same tensors for torch.load / torch.hub (encoder.pth at the end of pretraining)


def is_sincos(encoder: VisionTransformer) -> bool:
    """Whether the encoder's position embeddings are the fixed 2-D sin-cos table of its patch grid (MAE's)."""
    table = get_2d_sincos_pos_embed(encoder.embed_dim, tuple(encoder.patch_embed.grid_size), cls_token=True)
    pos = encoder.pos_embed.detach().cpu().float()
    return pos.shape == table.shape and torch.allclose(pos, table, atol=1e-6)


def timm_model_args(encoder: VisionTransformer, final_norm: bool) -> dict[str, Any]:
    """Every shape argument of ``encoder`` as ``timm.create_model`` keyword arguments (``MODEL_ARGS``).

    Args:
        encoder: A timm ``VisionTransformer`` as ``models_vit.vision_transformer`` builds it.
        final_norm: Whether its final LayerNorm (``norm``, or ``fc_norm`` with average pooling) was trained;
            False exports it as identity.

    Raises:
        CheckpointError: a design timm's stock ViT cannot express (post-norm blocks, a LayerNorm eps other than
            1e-6, no cls token, register tokens, layer scale).
    """
    block = encoder.blocks[0]
    if type(block) is not Block:
        raise CheckpointError(
            "post-norm (xFormers-layout) encoders have no standard timm ViT equivalent; "
            "load them with models_vit and norm_style='post' instead"
        )
    eps = block.norm1.eps
    if eps != 1e-6:
        raise CheckpointError(f"LayerNorm eps {eps:g}: timm's ViT builds eps 1e-6 from a config; not exportable")
    if not encoder.has_class_token or encoder.num_reg_tokens or not isinstance(block.ls1, torch.nn.Identity):
        raise CheckpointError("only plain MAE ViTs (cls token, no register tokens, no layer scale) are exported")
    if encoder.global_pool not in ("token", "avg"):
        raise CheckpointError(f"global_pool {encoder.global_pool!r}: only 'token' and 'avg' are exported")
    return {
        "img_size": encoder.patch_embed.img_size[0],
        "patch_size": encoder.patch_embed.patch_size[0],
        "in_chans": encoder.patch_embed.proj.in_channels,
        "embed_dim": encoder.embed_dim,
        "depth": len(encoder.blocks),
        "num_heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / encoder.embed_dim,
        "qkv_bias": block.attn.qkv.bias is not None,
        "class_token": True,
        "global_pool": encoder.global_pool,
        "final_norm": final_norm,
        "num_classes": 0,
    }


def _meta_shapes(name: str, kwargs: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of ``timm.create_model(name, **kwargs)``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def timm_architecture(model_args: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> tuple[str, bool]:
    """(entry point, whether it fits alone): the stock timm ViT that has exactly ``shapes`` when built with only the
    ``USE_ARGS`` of ``model_args`` (preferring the one named for the image size), else ``GENERIC_ARCHITECTURE``,
    which fits only with all of ``model_args``. Candidates are the stock names of this width and patch size; each is
    built (on the meta device) to check it."""
    use = {k: model_args[k] for k in USE_ARGS}
    names = [
        n
        for n in timm.list_models("vit_*_patch*")
        if (m := STOCK_VIT.fullmatch(n))
        and int(m.group(2)) == model_args["patch_size"]
        and STOCK_WIDTHS[m.group(1)] == model_args["embed_dim"]
    ]
    names.sort(key=lambda n: int(STOCK_VIT.fullmatch(n).group(3)) != model_args["img_size"])
    for name in names:
        if _meta_shapes(name, use) == shapes:
            return name, True
    return GENERIC_ARCHITECTURE, False


def pretrained_cfg(model_args: dict[str, Any], block: dict[str, Any]) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` fields of an export, from its model_args and remote-sensing block."""
    chans, size = model_args["in_chans"], model_args["img_size"]
    data = block["input"]
    return {
        "custom_load": False,
        "input_size": [chans, size, size],
        "fixed_input_size": True,
        "interpolation": "bicubic",
        "crop_pct": 0.875,  # this code's evaluation transform (util/data/transforms.py), MAE's
        "crop_mode": "center",
        # timm's transforms divide 8-bit images by 255 before normalising, as the RGB path did in pretraining;
        # multispectral statistics are in the data's own units (remote_sensing.input)
        "mean": data["mean"],
        "std": data["std"],
        "num_classes": 0,
        "pool_size": None,
        "first_conv": "patch_embed.proj" if chans == 3 else None,
        "classifier": "head",
        "license": metadata.LICENCE.lower(),
        "description": block["model"]["description"],
        "origin_url": metadata.CODE_URL,
        "paper_name": metadata.PAPER["title"],
        "paper_ids": metadata.PAPER["url"],
        "notes": [
            f"input: {data['units']}; normalise {data['normalisation']} (scale {data['scale']:g})",
            f"final norm: {block['final_norm']['exported_as']}",
            "see remote_sensing for bands and GSD",
        ],
    }


def check_fits(config: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """The model ``config`` describes (architecture + model_args, as ``timm.create_model("local-dir:...")`` builds
    it) must have exactly the tensors ``shapes``.

    Raises:
        CheckpointError: naming ``where``, the tensors missing, left over or of another shape.
    """
    built = _meta_shapes(config["architecture"], config["model_args"])
    missing = sorted(set(built) - set(shapes))
    extra = sorted(set(shapes) - set(built))
    other = sorted(k for k in set(built) & set(shapes) if built[k] != shapes[k])
    if missing or extra or other:
        raise CheckpointError(
            f"{where}: {config['architecture']} with its model_args does not fit the weights "
            f"(missing {missing[:3]}, left over {extra[:3]}, other shape {other[:3]})"
        )


def _save_pth(state: dict[str, torch.Tensor], path: str) -> None:
    """``torch.save`` through a file object: the archive's records are then named ``archive/...`` instead of after
    the (random) temporary file, so the same tensors give the same bytes, and the same sha256 for the hashed name."""
    with open(path, "wb") as f:
        torch.save(state, f)


def write_export(
    encoder: VisionTransformer,
    directory: str | os.PathLike,
    *,
    final_norm: bool,
    args: dict[str, Any] | None = None,
    pth: str | os.PathLike | None = None,
    **details: Any,
) -> Export:
    """Write ``encoder`` in timm's layout (``directory/config.json`` + ``directory/model.safetensors``) and, with
    ``pth``, the same tensors as a ``torch.save`` state dict. The one place exports are written.

    An untrained final norm (``final_norm`` False) is left out: ``model_args.final_norm`` is false and the file has no
    ``norm.*`` / ``fc_norm.*`` tensors. A classification head is left out (``num_classes`` 0).

    Args:
        encoder: A timm ``VisionTransformer`` (``models_vit.vision_transformer``), pre-norm blocks.
        directory: The export folder (created; files in it replaced atomically, config.json last).
        final_norm: Whether pretraining applied (trained) the final LayerNorm.
        args: The run's flags (a checkpoint's ``args``), for ``metadata.describe``.
        pth: Also write this ``.pth`` file.
        **details: Keyword arguments of ``metadata.describe`` (checkpoint, layout, epoch, md5, band_names, sensor,
            gsd_m, dataset, band_stats).

    Raises:
        CheckpointError: an encoder timm's ViT cannot express, a config that does not fit the tensors, or a
            failed write (the previous files intact).
        UsageError: bad metadata (``metadata.describe``).
    """
    directory = Path(directory)
    model_args = timm_model_args(encoder, final_norm)
    dropped = ("head.",) + (() if final_norm else ("norm.", "fc_norm."))
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items() if not k.startswith(dropped)}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    architecture, fits_alone = timm_architecture(model_args, shapes)
    block = metadata.describe(
        args or {},
        in_chans=model_args["in_chans"],
        input_size=model_args["img_size"],
        patch_size=model_args["patch_size"],
        final_norm_trained=final_norm,
        sincos_pos_embed=is_sincos(encoder),
        **details,
    )
    config = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": model_args["embed_dim"],
        "global_pool": model_args["global_pool"],
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg(model_args, block),
        "architecture_note": (
            f"{architecture} fits these weights with only the input / pooling arguments of model_args"
            if fits_alone
            else f"no stock timm ViT has this shape (embed_dim {model_args['embed_dim']}, depth "
            f"{model_args['depth']}, num_heads {model_args['num_heads']}, patch "
            f"{model_args['patch_size']}): {architecture} is timm's reference ViT entry point, "
            "and model_args replace every shape argument (create_model('local-dir:...') applies "
            "them; the name alone does not fit)"
        ),
        metadata.KEY: block,
    }
    check_fits(config, shapes, str(directory))
    write_atomically(directory / WEIGHTS_FILE, lambda tmp: save_safetensors(state, tmp, metadata={"format": "pt"}))
    if pth is not None:
        write_atomically(Path(pth), lambda tmp: _save_pth(state, tmp))
    write_atomically(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return Export(directory, Path(pth) if pth is not None else None)
