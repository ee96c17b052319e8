"""Building models from checkpoints: the pretraining model a checkpoint describes, the classifier or
frozen encoder that evaluation builds around a checkpoint's encoder, and the export of an encoder in timm's layout
(written by ``util.weights.export``).

This needs both the model files and ``util/`` (which never imports the model files), so it lives beside
the models.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

import models_cross_scale_mae as models_mae
import models_vit
from models_vit import PRESETS, PostNormBlock, classifier_name_for, preset_for
from util.config import Bands, repository_relative
from util.errors import CheckpointError, UsageError, first_line
from util.run import checkpoint as checkpoint_io
from util.run.distributed import main_print
from util.weights import export, layouts
from util.weights.band_adaptation import BandAdaptation, adapt_bands


def classifier_name(weights: layouts.EncoderWeights) -> str:
    """The classifier preset (``vit_{size}_patch16`` / ``vit_huge_patch14``) an encoder's tensors belong to.

    Raises:
        CheckpointError: width and depth match no preset.
    """
    shape = weights.shape
    try:
        return classifier_name_for(shape.embed_dim, shape.depth, shape.patch_size)
    except ValueError as e:
        raise CheckpointError(f"{weights.path}: {e}") from None


def infer_model_config(
    state_dict: dict[str, torch.Tensor], args: dict[str, Any] | None, layout: str
) -> tuple[str, dict[str, Any]]:
    """(registry name, constructor kwargs) for weights in our naming, from their shapes and upstream ``args``.

    Shapes are authoritative; ``args`` only chooses among variants with the same tensors.
    """
    args = args or {}
    shape = layouts.encoder_shape(
        {k.removeprefix("encoder."): v for k, v in state_dict.items() if k.startswith("encoder.")}
    )
    try:
        size = preset_for(shape.embed_dim, shape.depth)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    kwargs: dict[str, Any] = dict(input_size=shape.input_size, patch_size=shape.patch_size, in_chans=shape.in_chans)
    if "mask_token" in state_dict:
        decoder_dim = state_dict["mask_token"].shape[-1]
        preset = PRESETS[size]
        kwargs.update(
            decoder_embed_dim=decoder_dim,
            decoder_depth=layouts.count_blocks(state_dict, "decoder."),
            decoder_num_heads=preset.decoder_num_heads
            if decoder_dim == preset.decoder_embed_dim
            else decoder_dim // 32,
        )
    for key in ("norm_pix_loss", "mask_ratio"):
        if key in args:
            kwargs[key] = args[key]
    if layout == layouts.UPSTREAM_XFORMERS:
        kwargs["norm_style"] = "post"
    predictors = ("predictor.0.weight" in state_dict, "encoder_predictor.0.weight" in state_dict)
    named = args.get("model")
    if named in models_mae.MODEL_VARIANTS:
        weights = models_mae.loss_weights_of(named)
        if (bool(weights.get("cross_pred")), bool(weights.get("enc_pred"))) == predictors:
            return named, kwargs
    return (f"cross_scale_mae_vit_{size}" if predictors[0] else f"mae_vit_{size}"), kwargs


def load_mae(path: str | os.PathLike, **overrides: Any) -> tuple[models_mae.CrossScaleMAE, layouts.LoadReport]:
    """Build the pretraining model a checkpoint describes and load every tensor into it.

    Accepts this project's checkpoints and both upstream layouts (timm blocks; xFormers blocks, which
    get post-norm blocks). Published files are md5-verified.

    Args:
        path: Checkpoint file.
        **overrides: Constructor arguments that replace the checkpoint's (e.g. ``norm_eps=1e-5``).

    Raises:
        CheckpointError: unreadable file, wrong md5, or any tensor missing, left over or mis-shaped.
    """
    md5_status = checkpoint_io.check_md5(path)
    checkpoint = checkpoint_io.read_checkpoint(path)
    state_dict, layout = layouts.to_ours(checkpoint_io.model_state(checkpoint), str(path))
    config = checkpoint.get("model_config")
    if layout == layouts.OURS and isinstance(config, dict):
        if not isinstance(config.get("name"), str) or not isinstance(config.get("kwargs"), dict):
            raise CheckpointError(f"{path}: field 'model_config' must hold 'name' (text) and 'kwargs' (a mapping)")
        name, kwargs = config["name"], dict(config["kwargs"])
    else:
        try:
            name, kwargs = infer_model_config(state_dict, checkpoint.get("args"), layout)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
    kwargs.update(overrides)
    try:
        model = models_mae.create_model(name, **kwargs)
    except (ValueError, TypeError, KeyError) as e:  # a hand-edited or foreign model_config / args
        raise CheckpointError(
            f"{path}: its model_config / args describe no model this code builds ({type(e).__name__}: {first_line(e)})"
        ) from None
    layouts.check_shapes(path, model, state_dict)
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: does not fit {name}: "
            + "; ".join(
                f"{what} {layouts.summarise(keys)}"
                for what, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys))
                if keys
            )
        )
    epoch = checkpoint.get("epoch")
    report = layouts.LoadReport(
        str(path), layout, name, len(state_dict), md5_status=md5_status, epoch=epoch if isinstance(epoch, int) else None
    )
    return model, report


# Modules that only some loss variants (--model) have: --init leaves them freshly initialised when the checkpoint's
# variant has none, and leaves the checkpoint's out when the model has none; every other tensor must be in both.
VARIANT_MODULES = ("predictor.", "encoder_predictor.")


def init_mae(
    model: models_mae.CrossScaleMAE, path: str | os.PathLike, adaptation: BandAdaptation, model_name: str
) -> layouts.LoadReport:
    """Initialise a pretraining model with the weights of a pretraining checkpoint (``main_pretrain.py --init``):
    ours or upstream's (either layout, as ``load_mae`` reads them; published files md5-verified).

    A checkpoint of another band count gets ``patch_embed.proj`` and ``decoder_pred`` adapted by ``adaptation``
    (``BandAdaptation``); the report's ``adapted`` says how. Predictor modules of another loss variant are
    left fresh or left out (``VARIANT_MODULES``). Only weights are taken: no optimiser state, epoch or schedule.

    Args:
        model: The model ``--model`` built, with ``--in_chans`` bands.
        path: Pretraining checkpoint.
        adaptation: Which bands are R, G, B (``--rgb_bands`` / ``--checkpoint_rgb_bands``).
        model_name: ``--model``, for messages.

    Raises:
        CheckpointError: unreadable file, wrong md5, no decoder in it, other width / depth than ``model``, or a
            band count the rule does not adapt (one line naming the file and the flag).
        UsageError: another image or patch size or block style than ``--input_size`` / ``--patch_size`` /
            ``--norm_style``.
    """
    md5_status = checkpoint_io.check_md5(path)
    checkpoint = checkpoint_io.read_checkpoint(path)
    state_dict, layout = layouts.to_ours(checkpoint_io.model_state(checkpoint), str(path))
    if "decoder_pred.weight" not in state_dict or "encoder.patch_embed.proj.weight" not in state_dict:
        raise CheckpointError(f"{path}: not a pretraining checkpoint (no encoder-decoder in it); --init needs one")
    layouts.check_finite(state_dict, path)
    shape = layouts.encoder_shape(
        {k.removeprefix("encoder."): v for k, v in state_dict.items() if k.startswith("encoder.")}, str(path)
    )
    size = model.encoder.patch_embed.img_size[0]
    if (shape.input_size, shape.patch_size) != (size, model.patch_size):
        raise UsageError(
            f"--init {path} was pretrained on {shape.input_size} px images in {shape.patch_size} px patches, this "
            f"run has --input_size {size} --patch_size {model.patch_size}: give those of the checkpoint"
        )
    style = "post" if isinstance(model.encoder.blocks[0], PostNormBlock) else "pre"
    checkpoint_style = layouts.norm_style_of(checkpoint, layout, path)
    if checkpoint_style != style:
        raise UsageError(
            f"--init {path}: its blocks are {checkpoint_style}-norm, this run's {style}-norm: give --norm_style "
            f"{checkpoint_style}"
        )
    trained_norm_pix = ((checkpoint.get("model_config") or {}).get("kwargs") or {}).get(
        "norm_pix_loss", (checkpoint.get("args") or {}).get("norm_pix_loss")
    )
    if (
        isinstance(trained_norm_pix, bool) and trained_norm_pix != model.norm_pix_loss
    ):  # a choice, but rarely a wanted one
        main_print(
            f"note: --init {path} was pretrained with norm_pix_loss {trained_norm_pix}, this run has "
            f"{model.norm_pix_loss}: its decoder learnt to predict "
            f"{'standardised patches' if trained_norm_pix else 'raw pixels'}, "
            f"this run trains it towards {'raw pixels' if trained_norm_pix else 'standardised patches'}"
            + (" (give --norm_pix_loss to keep its target)" if trained_norm_pix else "")
        )
    adapted = adapt_bands(state_dict, model.in_chans, adaptation, str(path), prefix="encoder.")
    model_keys = model.state_dict().keys()
    missing = [k for k in model_keys if k not in state_dict]
    unexpected = [k for k in state_dict if k not in model_keys]
    problems = [
        f"{what} {layouts.summarise(wrong)}"
        for what, keys in (("missing", missing), ("unexpected", unexpected))
        if (wrong := [k for k in keys if not k.startswith(VARIANT_MODULES)])
    ]
    if problems:
        raise CheckpointError(f"{path}: does not fit --model {model_name} (another depth?): {'; '.join(problems)}")
    try:
        layouts.check_shapes(path, model, state_dict)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; --model is {model_name}") from None
    for key in unexpected:
        del state_dict[key]
    model.load_state_dict(state_dict, strict=False)
    epoch = checkpoint.get("epoch")
    return layouts.LoadReport(
        str(path),
        layout,
        model_name,
        len(state_dict),
        missing=missing,
        unexpected=[layouts.summarise(unexpected)] if unexpected else [],
        md5_status=md5_status,
        epoch=epoch if isinstance(epoch, int) else None,
        adapted=adapted,
    )


def export_encoder(
    model: models_mae.CrossScaleMAE, path: str | os.PathLike, args: dict[str, Any] | None = None, **details: Any
) -> export.Export:
    """Export a pretraining model's encoder (``util.weights.export.write_export``): the folder ``path`` in timm's
    layout (``config.json`` + ``model.safetensors``, with the remote-sensing metadata of ``args``, the run's flags)
    and ``path.pth``, the same tensors for ``torch.load``. An untrained final norm (no ``encoder_norm``) is exported
    as identity.

    ``timm.create_model("local-dir:PATH", pretrained=True)`` then builds the encoder with every tensor loaded.

    Raises:
        CheckpointError: post-norm (xFormers-layout) encoders, which no standard timm ViT computes; a failed write.
    """
    path = Path(path)
    return export.write_export(
        model.encoder,
        path,
        final_norm=model.encoder_norm,
        args=args,
        pth=path.with_name(path.name + ".pth"),
        ssl_method=ssl_method(model.multi_scale, model.loss_weights),
        **details,
    )


def ssl_method(multi_scale: bool, loss_weights: dict[str, float]) -> str:
    """ "mae" for one scale and the reconstruction loss alone (``mae_vit_*``), else "cross-scale-mae"."""
    return "cross-scale-mae" if multi_scale or any(w for term, w in loss_weights.items() if term != "rec") else "mae"


def _checkpoint_ssl_method(checkpoint: dict[str, Any], layout: str) -> str | None:
    """The pretraining method of a checkpoint: upstream's are Cross-Scale MAE runs of some loss variant (its model
    names, e.g. mae_vit_base_MsLdCeCd, are registered here too); None for a file that records no pretraining."""
    config = checkpoint.get("model_config") or {}
    name = config.get("name") or (checkpoint.get("args") or {}).get("model")
    if name not in models_mae.MODEL_VARIANTS:
        return "cross-scale-mae" if layout.startswith("upstream") else None
    kwargs = config.get("kwargs") or {}
    overrides = kwargs.get("loss_weights") if isinstance(kwargs.get("loss_weights"), dict) else {}
    multi_scale = kwargs.get("multi_scale", models_mae.UPSTREAM_VARIANTS[models_mae.MODEL_VARIANTS[name][1]][0])
    return ssl_method(bool(multi_scale), {**models_mae.loss_weights_of(name), **overrides})


def export_checkpoint(
    path: str | os.PathLike, output: str | os.PathLike, pth: str | os.PathLike | None = None, **details: Any
) -> export.Export:
    """Export the encoder of any checkpoint ``layouts.read_encoder`` reads (ours, upstream's published ViT-B /
    ViT-L, a timm export, a fine-tuned classifier: its head left out) to the folder ``output``, with the metadata of
    the checkpoint's flags (``args``) and ``details`` (``metadata.describe``'s keywords).

    Raises:
        CheckpointError: unreadable file, wrong md5, post-norm blocks, a width / depth of no preset, or tensors
            that do not fit the encoder they describe.
    """
    weights = layouts.read_encoder(path)
    if weights.norm_style == "post":
        raise CheckpointError(f"{path}: post-norm (xFormers-layout) blocks have no standard timm ViT equivalent")
    shape = weights.shape
    try:
        size = preset_for(shape.embed_dim, shape.depth)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    encoder = models_vit.vision_transformer(
        **PRESETS[size].encoder(),
        img_size=shape.input_size,
        patch_size=shape.patch_size,
        in_chans=shape.in_chans,
        global_pool=weights.classifier_pool or "token",
    )
    layouts.check_shapes(path, encoder, weights.state_dict)
    result = encoder.load_state_dict(weights.state_dict, strict=False)
    untrained = () if weights.final_norm else ("norm.", "fc_norm.")
    missing = [k for k in result.missing_keys if not k.startswith(untrained)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: not a {size} ViT encoder (missing {layouts.summarise(missing)}, "
            f"unexpected {layouts.summarise(result.unexpected_keys)})"
        )
    file = Path(layouts.encoder_file(path))
    checkpoint = {} if file.suffix == ".safetensors" else checkpoint_io.read_checkpoint(file)  # its args, epoch
    epoch = checkpoint.get("epoch")
    md5 = weights.md5_status.split()[1] if weights.md5_status else None  # "md5 <digest> verified: ..."
    return export.write_export(
        encoder,
        output,
        final_norm=weights.final_norm,
        args=checkpoint.get("args") or {},
        pth=pth,
        checkpoint=file.name,
        layout=weights.layout,
        epoch=epoch if isinstance(epoch, int) else None,
        md5=md5,
        ssl_method=_checkpoint_ssl_method(checkpoint, weights.layout),
        **details,
    )


def _architecture(
    model: str | None, finetune: str, weights: layouts.EncoderWeights | None
) -> tuple[layouts.EncoderWeights | None, str, str, int]:
    """(weights, classifier name, size preset, default patch size) from ``--model`` or ``--finetune``'s tensors.

    Raises:
        UsageError: neither given, or an unknown ``--model``.
    """
    if weights is None:
        weights = layouts.read_encoder(finetune) if finetune else None
    name = model or (classifier_name(weights) if weights else None)
    if name is None:
        raise UsageError("give --finetune PATH (pretrained weights) or --model NAME (random initialisation)")
    try:
        size, default_patch = models_vit.classifier_preset(name)
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    return weights, name, size, default_patch


def _patch_size(patch_size: int | None, weights: layouts.EncoderWeights | None, default: int, input_size: int) -> int:
    """``--patch_size``, else the weights', else the preset's; it must divide ``--input_size``.

    Raises:
        UsageError: it does not divide the input size.
    """
    patch_size = patch_size or (weights.shape.patch_size if weights else default)
    if input_size % patch_size:
        raise UsageError(f"--input_size {input_size} is not divisible by --patch_size {patch_size}")
    return patch_size


def build_classifier(
    num_classes: int,
    *,
    finetune: str,
    model: str | None,
    input_size: int,
    patch_size: int | None,
    bands: Bands,
    global_pool: bool,
    head_init_std: float,
    drop_path: float = 0.0,
    weights: layouts.EncoderWeights | None = None,
    load: bool = True,
) -> tuple[VisionTransformer, layouts.EncoderWeights | None]:
    """A ``models_vit`` classifier of ``num_classes`` with ``finetune``'s encoder (or ``weights``) loaded: every
    encoder tensor, or an error; RGB <-> multispectral weights adapted by ``--rgb_bands`` /
    ``--checkpoint_rgb_bands`` (``BandAdaptation``).

    Args:
        model: ``--model`` (default: the architecture of the weights).
        patch_size: ``--patch_size`` (default: the weights', else the preset's).
        bands: How files become inputs: ``in_chans`` and the band adaptation.
        global_pool: Mean of the patch tokens + fc_norm (True) or the cls token after norm.
        load: False: the architecture comes from ``weights`` but nothing is loaded (the caller loads a whole
            classifier, head included).

    Raises:
        UsageError: no weights and no ``--model``; a patch size that does not divide the input size.
        CheckpointError: weights that do not fit.
    """
    weights, name, _, default_patch = _architecture(model, finetune, weights)
    classifier = models_vit.create_classifier(
        name,
        num_classes,
        img_size=input_size,
        patch_size=_patch_size(patch_size, weights, default_patch, input_size),
        in_chans=bands.in_chans,
        global_pool=global_pool,
        drop_path_rate=drop_path,
        norm_style=weights.norm_style if weights else "pre",
        head_init_std=head_init_std,
    )
    if weights is None:
        main_print(f"no --finetune: {name} starts from random initialisation")
    elif load:
        main_print(layouts.load_encoder(classifier, weights, BandAdaptation.of(bands)))
    return classifier, weights


def build_knn_encoder(
    spec: str,
    weights: layouts.EncoderWeights | None,
    model_name: str,
    *,
    input_size: int,
    patch_size: int,
    bands: Bands,
    native: bool = False,
    random_final_norm: bool = False,
) -> tuple[torch.nn.Module, str, bool]:
    """(encoder, label, whether its final norm is applied) for a checkpoint or 'none' (random init).

    The label is the checkpoint's path (relative to the repository where it lies inside it: the legend of the
    figure and the rows of the table read as the docs write them, on every clone; else absolute, so that no two
    checkpoints share one) or the random-init encoder's shape.

    A checkpoint's final norm is applied where its pretraining applied it (``weights.final_norm``); a random-init
    encoder's where ``random_final_norm`` says, so that its row is computed as the checkpoints' it is compared with.

    A fine-tuned or linear-probed classifier keeps its pooling (``weights.classifier_pool``: patch mean + fc_norm,
    or the cls token after norm); its head is left out. ``knn.encoder_features`` with ``pool="classifier"`` then
    gives the features the classifier pools before its head. ``native``: the encoder takes smaller images
    (``--scale_mode native``: position embeddings interpolated).
    """
    preset = models_vit.classifier_preset(model_name)[0]
    patch_size = weights.shape.patch_size if weights else patch_size
    pooling = {"global_pool": weights.classifier_pool} if weights is not None and weights.classifier_pool else {}
    encoder = models_vit.vision_transformer(
        **models_vit.PRESETS[preset].encoder(),
        img_size=input_size,
        patch_size=patch_size,
        in_chans=bands.in_chans,
        num_classes=0,
        norm_style=weights.norm_style if weights else "pre",
        dynamic_img_size=native,
        **pooling,
    )
    if weights is None:
        return encoder, f"random init ({model_name}: {models_vit.shape_text(encoder)})", random_final_norm
    main_print(layouts.load_encoder(encoder, weights, BandAdaptation.of(bands)))
    # inside the repository the label is the path its docs and users write; outside, the absolute path: a relative
    # one could read as a repository path and name another checkpoint's row
    absolute = os.path.abspath(spec)
    return encoder, repository_relative(absolute) or absolute, weights.final_norm


def build_segmenter(
    num_classes: int,
    *,
    finetune: str,
    model: str | None,
    input_size: int,
    patch_size: int | None,
    bands: Bands,
    head: str,
    freeze_encoder: bool,
    decoder_channels: int,
    drop_path: float = 0.0,
    weights: layouts.EncoderWeights | None = None,
    load: bool = True,
):
    """A ``models_segmentation.Segmenter`` around ``finetune``'s encoder (or ``weights``): any checkpoint kind
    ``build_classifier`` accepts (ours, upstream's two layouts, timm exports, fine-tuned classifiers, segmenters),
    position embeddings resampled to ``input_size`` (the crop). ``load=False``: architecture only.

    Args:
        head: ``upernet`` or ``linear`` (``models_segmentation.Segmenter``).
        freeze_encoder: Train only neck and head (the encoder's drop path is then 0).
        decoder_channels: UperNet width.

    Returns:
        (segmenter, weights).

    Raises:
        UsageError, CheckpointError: as ``build_classifier``.
    """
    import models_segmentation  # here, so the classification scripts never import segmentation_models_pytorch

    weights, name, size, default_patch = _architecture(model, finetune, weights)
    encoder = models_vit.vision_transformer(
        **PRESETS[size].encoder(),
        img_size=input_size,
        patch_size=_patch_size(patch_size, weights, default_patch, input_size),
        in_chans=bands.in_chans,
        num_classes=0,
        drop_path_rate=0.0 if freeze_encoder else drop_path,
        norm_style=weights.norm_style if weights else "pre",
    )
    if weights is None:
        main_print(f"no --finetune: {name} starts from random initialisation")
    elif load:
        main_print(layouts.load_encoder(encoder, weights, BandAdaptation.of(bands)))
    segmenter = models_segmentation.Segmenter(encoder, num_classes, head, freeze_encoder, decoder_channels)
    return segmenter, weights
