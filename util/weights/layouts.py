"""Checkpoint key layouts: detecting and renaming ours, upstream's (timm blocks; xFormers blocks) and timm's
``VisionTransformer`` names, reading the encoder out of any of them, and loading it into a timm ViT."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from util.errors import CheckpointError
from util.run.checkpoint import check_md5, model_state, non_finite_keys, read_checkpoint
from util.weights.band_adaptation import BandAdaptation, adapt_bands

# Layouts of a state dict, detected from its block keys.
OURS, UPSTREAM_TIMM, UPSTREAM_XFORMERS, TIMM_VIT = "ours", "upstream-timm", "upstream-xformers", "timm-vit"

_XFORMERS_BLOCK_NAMES = {
    "wrap_att.norm.": "norm1.",
    "wrap_att.sublayer.layer.proj.": "attn.proj.",
    "wrap_ff.norm.": "norm2.",
    "wrap_ff.sublayer.layer.mlp.0.": "mlp.fc1.",
    "wrap_ff.sublayer.layer.mlp.3.": "mlp.fc2.",
}
_XFORMERS_QKV = re.compile(r"wrap_att\.sublayer\.layer\.in_proj_container\.([qkv])_proj\.(weight|bias)$")


def detect_layout(state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> str:
    """Which naming a state dict uses: ours, upstream timm blocks, upstream xFormers blocks, or a timm ViT."""
    keys = state_dict.keys()
    if any(k.startswith("encoder.blocks.") for k in keys):
        return OURS
    if any(k.startswith("encoder.encoders.") for k in keys):
        return UPSTREAM_XFORMERS
    if any(re.match(r"encoder\.\d+\.", k) for k in keys):
        return UPSTREAM_TIMM
    if any(k.startswith("blocks.") for k in keys):
        return TIMM_VIT
    raise CheckpointError(f"{source}: no transformer blocks found: not a Cross-Scale MAE, MAE or ViT checkpoint")


def _xformers_blocks_to_timm(
    state_dict: dict[str, torch.Tensor], prefix: str, new_prefix: str, source: str
) -> dict[str, torch.Tensor]:
    """Rename ``{prefix}{i}.<xFormers names>`` to ``{new_prefix}{i}.<timm Block names>``; q/k/v are concatenated."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        index, rest = key[len(prefix) :].split(".", 1)
        head = f"{new_prefix}{index}."
        match = _XFORMERS_QKV.match(rest)
        if match:
            qkv.setdefault((head, match.group(2)), {})[match.group(1)] = value
            continue
        for old, new in _XFORMERS_BLOCK_NAMES.items():
            if rest.startswith(old):
                out[head + new + rest[len(old) :]] = value
                break
        else:
            out[key] = value  # unknown sub-key: left as is, so loading reports it
    for (head, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(
                f"{source}: {prefix}{head[len(new_prefix) :]}attn has incomplete q/k/v projections ({sorted(parts)})"
            )
        out[f"{head}attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def to_ours(state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """Rename any supported layout to this project's ``CrossScaleMAE`` names. Returns (state dict, layout).

    ``source`` names the file in error messages.
    """
    layout = detect_layout(state_dict, source)
    if layout == OURS:
        return dict(state_dict), layout
    if layout == TIMM_VIT:
        return {f"encoder.{k}": v for k, v in state_dict.items()}, layout
    if layout == UPSTREAM_XFORMERS:
        state_dict = _xformers_blocks_to_timm(state_dict, "encoder.encoders.", "encoder.", source)
        state_dict = _xformers_blocks_to_timm(state_dict, "decoder.encoders.", "decoder.", source)
    renames = {"cls_token": "encoder.cls_token", "encoder_pos_embed": "encoder.pos_embed"}
    out = {}
    for key, value in state_dict.items():
        if key in renames:
            key = renames[key]
        elif key.startswith(("patch_embed.", "encoder_norm.")):
            key = "encoder." + key.replace("encoder_norm.", "norm.")
        elif re.match(r"encoder\.\d+\.", key):
            key = "encoder.blocks." + key[len("encoder.") :]
        out[key] = value
    return out, layout


def count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state_dict if (m := pattern.match(k))})


@dataclass
class LoadReport:
    """What a load did: where from, which layout, what was loaded and what was not."""

    path: str
    layout: str
    model_name: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    md5_status: str | None = None
    epoch: int | None = None
    adapted: list[str] = field(default_factory=list)  # tensors changed to fit the model's band count (BandAdaptation)

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors from {self.path} ({self.layout} layout, model {self.model_name})"]
        if self.epoch is not None:
            lines.append(f"  trained for {self.epoch + 1} epochs")
        if self.md5_status:
            lines.append(f"  {self.md5_status}")
        lines += [f"  adapted {line}" for line in self.adapted]
        if self.missing:
            lines.append(f"  freshly initialised: {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  left out: {', '.join(self.unexpected)}")
        return "\n".join(lines)


def summarise(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_shapes(path: str | os.PathLike, model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    wrong = [
        f"{k} {list(v.shape)} (model has {list(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and expected[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointError(f"{path}: tensors of another shape: {summarise(wrong, 3)}")


@dataclass(frozen=True)
class EncoderShape:
    """What a ViT encoder's tensors say about its architecture."""

    embed_dim: int
    depth: int
    patch_size: int
    in_chans: int
    grid: tuple[int, int]  # patches per side (square grids)

    @property
    def input_size(self) -> int:
        """Image side in pixels the position embeddings were made for."""
        return self.grid[0] * self.patch_size


def encoder_shape(state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> EncoderShape:
    """Width, depth, patch size, input channels and patch grid of a ViT encoder under timm names
    (``cls_token``, ``pos_embed`` [1, 1+L, D], ``patch_embed.proj.weight`` [D, C, p, p], ``blocks.{i}.``).

    Raises:
        CheckpointError: a tensor that defines the shape is missing.
    """
    try:
        embed_dim = state_dict["cls_token"].shape[-1]
        patch_weight = state_dict["patch_embed.proj.weight"]
        num_patches = state_dict["pos_embed"].shape[1] - 1
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"{source}: missing or malformed encoder tensor {e.args[0]}") from None
    side = round(num_patches**0.5)
    return EncoderShape(
        embed_dim, count_blocks(state_dict, "blocks."), patch_weight.shape[-1], patch_weight.shape[1], (side, side)
    )


@dataclass
class EncoderWeights:
    """Encoder tensors of any supported checkpoint, under timm ``VisionTransformer`` names."""

    path: str
    layout: str
    state_dict: dict[str, torch.Tensor]
    norm_style: str
    left_out: list[str]
    md5_status: str | None = None
    final_norm: bool = True  # whether pretraining applied the encoder's final LayerNorm
    classifier_pool: str | None = (
        None  # a trained classifier's pooling ("avg": patch mean + fc_norm, "token"); None: no head
    )

    @property
    def shape(self) -> EncoderShape:
        return encoder_shape(self.state_dict, self.path)


def norm_style_of(checkpoint: dict, layout: str, path: str | os.PathLike) -> str:
    """Where a checkpoint's blocks put their LayerNorms: "post" (upstream's xFormers blocks) or "pre" (timm's), from
    its layout, else its ``model_config`` or ``args``.

    Raises:
        CheckpointError: a malformed ``model_config.kwargs`` or ``norm_style`` field.
    """
    kwargs = (checkpoint.get("model_config") or {}).get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{path}: field 'model_config.kwargs' must be a mapping, found {type(kwargs).__name__}")
    norm_style = (
        "post"
        if layout == UPSTREAM_XFORMERS
        else kwargs.get("norm_style", (checkpoint.get("args") or {}).get("norm_style", "pre"))
    )
    if norm_style not in ("pre", "post"):
        raise CheckpointError(f"{path}: field 'norm_style' must be 'pre' or 'post', found {norm_style!r}")
    return norm_style


def check_finite(state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuse weights with NaN / inf values: training from them ends in a NaN loss that blames the learning rate, and
    features from them give no accuracy.

    Raises:
        CheckpointError: naming the file and the tensors.
    """
    bad = non_finite_keys(state_dict)
    if bad:
        raise CheckpointError(
            f"{path}: non-finite values (NaN/inf) in {summarise(bad, 3)}; these weights cannot be used"
        )


def encoder_file(path: str | os.PathLike) -> str | os.PathLike:
    """``path``, or the weights file of a folder in timm's layout (``config.json`` + ``model.safetensors``)."""
    folder = Path(path)
    if folder.is_dir() and (folder / "config.json").is_file():
        return folder / "model.safetensors"
    return path


def read_encoder(path: str | os.PathLike) -> EncoderWeights:
    """The encoder of a pretraining checkpoint (ours or upstream's, either layout), of an exported timm
    encoder (``.pth``/``.safetensors``) or of a fine-tuned classifier; the classification head is dropped.

    A folder in timm's layout (``util.weights.export``) is read from its ``model.safetensors``.

    Raises:
        CheckpointError: unreadable file, wrong md5, or no encoder in it.
    """
    path = encoder_file(path)
    md5_status = check_md5(path)
    checkpoint = read_checkpoint(path)
    state_dict, layout = to_ours(model_state(checkpoint), str(path))
    encoder = {
        k[len("encoder.") :]: v
        for k, v in state_dict.items()
        if k.startswith("encoder.") and not k.startswith("encoder.head.")
    }
    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight") if k not in encoder]
    if missing:
        raise CheckpointError(f"{path}: no ViT encoder in it (missing {', '.join(missing)})")
    for key, ndim in (("cls_token", 3), ("pos_embed", 3), ("patch_embed.proj.weight", 4)):
        if not isinstance(encoder[key], torch.Tensor) or encoder[key].ndim != ndim:
            found = tuple(encoder[key].shape) if isinstance(encoder[key], torch.Tensor) else type(encoder[key]).__name__
            raise CheckpointError(f"{path}: field {key!r} must be a {ndim}-d tensor, found {found}")
    check_finite(encoder, path)
    norm_style = norm_style_of(checkpoint, layout, path)
    kwargs = (checkpoint.get("model_config") or {}).get("kwargs", {})
    # a timm state dict (an export, a classifier) has a final norm where it has its tensors: exports leave an untrained
    # one out (identity), and pretraining checkpoints keep theirs untrained unless --encoder_norm
    final_norm = (layout == TIMM_VIT and ("norm.weight" in encoder or "fc_norm.weight" in encoder)) or (
        layout == OURS and bool(kwargs.get("encoder_norm", False))
    )
    left_out = [k for k in state_dict if k not in {f"encoder.{name}" for name in encoder}]
    has_head = any(k.startswith("encoder.head.") and k.endswith("weight") for k in state_dict)
    classifier_pool = ("avg" if "fc_norm.weight" in encoder else "token") if has_head else None
    return EncoderWeights(str(path), layout, encoder, norm_style, left_out, md5_status, final_norm, classifier_pool)


def _describe_left_out(keys: list[str]) -> str:
    pretraining_only = [k for k in keys if not k.startswith("encoder.")]
    other = [k.removeprefix("encoder.") for k in keys if k.startswith("encoder.")]
    parts = [f"{len(pretraining_only)} decoder/predictor tensors (pretraining only)"] if pretraining_only else []
    return ", ".join(parts + other)


def load_encoder(
    model: torch.nn.Module, weights: EncoderWeights, adaptation: BandAdaptation | None = None
) -> LoadReport:
    """Load encoder weights into a timm ``VisionTransformer`` classifier (fresh head).

    Position embeddings are resampled (bicubic) to the model's grid and the patch projection to its
    patch size (timm's ``resample_patch_embed``); a patch projection for another band count is adapted by
    ``adaptation`` (``BandAdaptation``; the report's ``adapted`` says how). In global-pool mode the model has
    ``fc_norm`` instead of ``norm``; ``norm`` is then left out, as MAE does.

    Raises:
        CheckpointError: an encoder tensor of the model is not in the file, or does not fit; another band count
            that ``adaptation`` does not adapt.
        UsageError: ``adaptation`` names impossible band indices.
    """
    state_dict = dict(weights.state_dict)
    left_out = list(weights.left_out)
    model_keys = model.state_dict()
    grid = tuple(model.patch_embed.grid_size)
    if tuple(weights.shape.grid) != grid:
        state_dict["pos_embed"] = resample_abs_pos_embed(
            state_dict["pos_embed"], list(grid), list(weights.shape.grid), num_prefix_tokens=1
        )
    target = model_keys["patch_embed.proj.weight"]
    adapted = adapt_bands(state_dict, target.shape[1], adaptation or BandAdaptation(), weights.path)
    proj = state_dict["patch_embed.proj.weight"]
    if proj.shape[-2:] != target.shape[-2:]:
        state_dict["patch_embed.proj.weight"] = resample_patch_embed(proj, list(target.shape[-2:]))
    for key in [k for k in state_dict if k not in model_keys and k.startswith("norm.")]:
        left_out.append(f"encoder.{key}")
        del state_dict[key]
    check_shapes(weights.path, model, state_dict)
    result = model.load_state_dict(state_dict, strict=False)
    fresh = ("head.", "fc_norm.") if weights.final_norm else ("head.", "fc_norm.", "norm.")  # untrained: left out
    not_loaded = [k for k in result.missing_keys if not k.startswith(fresh)]
    if not_loaded or result.unexpected_keys:
        problems = [f"not in the file: {summarise(not_loaded)}"] if not_loaded else []
        problems += [f"not in the model: {summarise(result.unexpected_keys)}"] if result.unexpected_keys else []
        raise CheckpointError(
            f"{weights.path}: encoder does not fit the model ({'; '.join(problems)}); refusing to train from random "
            "weights"
        )
    return LoadReport(
        weights.path,
        weights.layout,
        type(model).__name__,
        len(state_dict),
        missing=result.missing_keys,
        unexpected=[_describe_left_out(left_out)] if left_out else [],
        md5_status=weights.md5_status,
        adapted=adapted,
    )
