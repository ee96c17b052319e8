"""Reading, writing and converting checkpoints: ours, both upstream layouts, and timm encoders.

Every file is read with ``torch.load(weights_only=True)``; the only class allowed besides tensors and
plain Python types is ``argparse.Namespace``, which upstream pickles into its checkpoints. Files are
written atomically (temporary file, fsync, ``os.replace``), so a crash never leaves a half-written file
under the final name.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from timm.layers import resample_abs_pos_embed, resample_patch_embed

import models_cross_scale_mae as models_mae
from models_vit import PostNormBlock, classifier_name_for, preset_for
from util.misc import ReportableError, rng_state

PUBLISHED_MD5 = {
    "0c33995da85c112d9602f89d5b186bbc": "published Cross-Scale MAE ViT-Base (400 epochs)",
    "e6e4f58c07bbbc4c4dd63fa26c644dd4": "published Cross-Scale MAE ViT-Large (400 epochs)",
}
PUBLISHED_FILENAMES = {
    "cross_scale_mae_base_pretrain.pth": "0c33995da85c112d9602f89d5b186bbc",
    "cross_scale_mae_large_pretrain.pth": "e6e4f58c07bbbc4c4dd63fa26c644dd4",
}

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


class CheckpointError(ReportableError):
    """A checkpoint that cannot be read, written or used; the message names the file and the reason."""


def file_md5(path: str | os.PathLike) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(path: Path, write) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``; on failure ``path`` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        Path(tmp).unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise CheckpointError(f"could not write {path}: {reason}; the previous file, if any, is intact") from e
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` with ``torch.save`` atomically."""
    _write_atomically(Path(path), lambda tmp: torch.save(state, tmp))


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint dict safely. ``.safetensors`` files come back as ``{"model": state_dict}``.

    Raises:
        CheckpointError: missing, truncated/corrupt, or containing objects other than tensors and plain types.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            return {"model": load_safetensors(str(path))}
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects other than tensors and plain types, "
            f"which could run code ({str(e).splitlines()[-1].strip()})"
        ) from e
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({str(e).splitlines()[0]})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    if isinstance(state.get("args"), argparse.Namespace):
        state["args"] = vars(state["args"])
    return state


def check_md5(path: str | os.PathLike) -> str | None:
    """Verify a published file's md5. Returns a one-line status, or None for files that are not published ones.

    Raises:
        CheckpointError: the file carries a published name but not the published md5.
    """
    path = Path(path)
    expected = PUBLISHED_FILENAMES.get(path.name)
    if expected is None:
        return None
    actual = file_md5(path)
    if actual != expected:
        raise CheckpointError(
            f"{path}: md5 {actual} does not match the published {expected}; the download is incomplete or corrupt"
        )
    return f"md5 {actual} verified: {PUBLISHED_MD5[actual]}"


def model_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint dict (``model``/``state_dict`` entry, or the dict itself), without the
    ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefixes of wrapped models."""
    state = next((checkpoint[k] for k in ("model", "state_dict") if isinstance(checkpoint.get(k), dict)), checkpoint)
    for prefix in ("module.", "_orig_mod."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


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
        index, rest = key[len(prefix):].split(".", 1)
        head = f"{new_prefix}{index}."
        match = _XFORMERS_QKV.match(rest)
        if match:
            qkv.setdefault((head, match.group(2)), {})[match.group(1)] = value
            continue
        for old, new in _XFORMERS_BLOCK_NAMES.items():
            if rest.startswith(old):
                out[head + new + rest[len(old):]] = value
                break
        else:
            out[key] = value  # unknown sub-key: left as is, so loading reports it
    for (head, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{source}: {prefix}{head[len(new_prefix):]}attn has incomplete q/k/v projections ({sorted(parts)})")
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
            key = "encoder.blocks." + key[len("encoder."):]
        out[key] = value
    return out, layout


def _count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state_dict if (m := pattern.match(k))})


def infer_model_config(state_dict: dict[str, torch.Tensor], args: dict[str, Any] | None, layout: str) -> tuple[str, dict[str, Any]]:
    """(registry name, constructor kwargs) for weights in our naming, from their shapes and upstream ``args``.

    Shapes are authoritative; ``args`` only chooses among variants with the same tensors.
    """
    args = args or {}
    try:
        embed_dim = state_dict["encoder.cls_token"].shape[-1]
        patch_weight = state_dict["encoder.patch_embed.proj.weight"]  # [D, C, p, p]
        num_patches = state_dict["encoder.pos_embed"].shape[1] - 1
    except KeyError as e:
        raise CheckpointError(f"missing encoder tensor {e.args[0]}") from e
    depth = _count_blocks(state_dict, "encoder.blocks.")
    patch_size = patch_weight.shape[-1]
    try:
        size = preset_for(embed_dim, depth)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    grid = round(num_patches**0.5)
    kwargs: dict[str, Any] = dict(input_size=grid * patch_size, patch_size=patch_size, in_chans=patch_weight.shape[1])
    if "mask_token" in state_dict:
        decoder_dim = state_dict["mask_token"].shape[-1]
        preset = models_mae.DECODER_PRESETS[size]
        kwargs.update(
            decoder_embed_dim=decoder_dim,
            decoder_depth=_count_blocks(state_dict, "decoder."),
            decoder_num_heads=preset["decoder_num_heads"] if decoder_dim == preset["decoder_embed_dim"] else decoder_dim // 32,
        )
    for key in ("norm_pix_loss", "mask_ratio"):
        if key in args:
            kwargs[key] = args[key]
    if layout == UPSTREAM_XFORMERS:
        kwargs["norm_style"] = "post"
    predictors = ("predictor.0.weight" in state_dict, "encoder_predictor.0.weight" in state_dict)
    named = args.get("model")
    if named in models_mae.MODEL_VARIANTS:
        weights = models_mae.MODEL_VARIANTS[named][2]
        if (bool(weights.get("cross_pred")), bool(weights.get("enc_pred"))) == predictors:
            return named, kwargs
    return (f"cross_scale_mae_vit_{size}" if predictors[0] else f"mae_vit_{size}"), kwargs


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

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors from {self.path} ({self.layout} layout, model {self.model_name})"]
        if self.epoch is not None:
            lines.append(f"  trained for {self.epoch + 1} epochs")
        if self.md5_status:
            lines.append(f"  {self.md5_status}")
        if self.missing:
            lines.append(f"  freshly initialised: {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  left out: {', '.join(self.unexpected)}")
        return "\n".join(lines)


def _summarise(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_mae(path: str | os.PathLike, **overrides: Any) -> tuple[models_mae.CrossScaleMAE, LoadReport]:
    """Build the pretraining model a checkpoint describes and load every tensor into it.

    Accepts this project's checkpoints and both upstream layouts (timm blocks; xFormers blocks, which
    get post-norm blocks). Published files are md5-verified.

    Args:
        path: Checkpoint file.
        **overrides: Constructor arguments that replace the checkpoint's (e.g. ``norm_eps=1e-5``).

    Raises:
        CheckpointError: unreadable file, wrong md5, or any tensor missing, left over or mis-shaped.
    """
    md5_status = check_md5(path)
    checkpoint = read_checkpoint(path)
    state_dict, layout = to_ours(model_state(checkpoint), str(path))
    config = checkpoint.get("model_config")
    if layout == OURS and isinstance(config, dict):
        name, kwargs = config["name"], dict(config["kwargs"])
    else:
        try:
            name, kwargs = infer_model_config(state_dict, checkpoint.get("args"), layout)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
    kwargs.update(overrides)
    model = models_mae.create_model(name, **kwargs)
    _check_shapes(path, model, state_dict)
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: does not fit {name}: "
            + "; ".join(
                f"{what} {_summarise(keys)}"
                for what, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys))
                if keys
            )
        )
    epoch = checkpoint.get("epoch")
    report = LoadReport(str(path), layout, name, len(state_dict), md5_status=md5_status, epoch=epoch if isinstance(epoch, int) else None)
    return model, report


def _check_shapes(path: str | os.PathLike, model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    wrong = [f"{k} {list(v.shape)} (model has {list(expected[k].shape)})"
             for k, v in state_dict.items() if k in expected and expected[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{path}: tensors of another shape: {_summarise(wrong, 3)}")


def export_encoder(model: models_mae.CrossScaleMAE, path: str | os.PathLike) -> tuple[Path, Path]:
    """Write the encoder as a timm ``VisionTransformer`` state dict, as ``.pth`` and ``.safetensors``.

    ``timm.create_model('vit_base_patch16_224', img_size=128, num_classes=0)`` loads the base model's
    export with ``strict=True``. Post-norm (xFormers-layout) encoders are refused: a standard timm ViT
    would compute something else with them.
    """
    if isinstance(model.encoder.blocks[0], PostNormBlock):
        raise CheckpointError("post-norm (xFormers-layout) encoders have no standard timm ViT equivalent; "
                              "load them with models_vit and norm_style='post' instead")
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()}
    pth = Path(path).with_suffix(".pth")
    safetensors = pth.with_suffix(".safetensors")
    save_checkpoint(state_dict, pth)
    _write_atomically(safetensors, lambda tmp: save_safetensors(state_dict, tmp, metadata={"format": "pt"}))
    return pth, safetensors


def training_state(model: torch.nn.Module, optimizer, scaler, epoch: int, args, **extra: Any) -> dict[str, Any]:
    """What a resumable checkpoint holds: weights, optimiser and scaler state, epoch, flags as a plain dict,
    the model's constructor arguments and every RNG state. Tensors and plain types only."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))},
        "rng": rng_state(),
        **extra,
    }
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if hasattr(model, "model_config"):
        state["model_config"] = model.model_config
    return state


def find_resume_checkpoint(resume: str, output_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from and its contents.

    ``auto`` tries ``output_dir``'s checkpoints, newest first, and takes the first that reads completely
    (None when there is none); any other value is a path that must load.
    """
    if resume != "auto":
        return Path(resume), read_checkpoint(resume)
    candidates = sorted(Path(output_dir).glob("checkpoint-*.pth"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        try:
            return path, read_checkpoint(path)
        except CheckpointError as e:
            print(f"resume: skipping {e}")
    return None


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

    @property
    def embed_dim(self) -> int:
        return self.state_dict["cls_token"].shape[-1]

    @property
    def depth(self) -> int:
        return _count_blocks(self.state_dict, "blocks.")

    @property
    def patch_size(self) -> int:
        return self.state_dict["patch_embed.proj.weight"].shape[-1]

    @property
    def grid(self) -> tuple[int, int]:
        side = round((self.state_dict["pos_embed"].shape[1] - 1) ** 0.5)
        return side, side

    @property
    def classifier_name(self) -> str:
        try:
            return classifier_name_for(self.embed_dim, self.depth, self.patch_size)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: {e}") from None


def read_encoder(path: str | os.PathLike) -> EncoderWeights:
    """The encoder of a pretraining checkpoint (ours or upstream's, either layout), of an exported timm
    encoder (``.pth``/``.safetensors``) or of a fine-tuned classifier; the classification head is dropped.

    Raises:
        CheckpointError: unreadable file, wrong md5, or no encoder in it.
    """
    md5_status = check_md5(path)
    checkpoint = read_checkpoint(path)
    state_dict, layout = to_ours(model_state(checkpoint), str(path))
    encoder = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.") and not k.startswith("encoder.head.")}
    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight") if k not in encoder]
    if missing:
        raise CheckpointError(f"{path}: no ViT encoder in it (missing {', '.join(missing)})")
    config = checkpoint.get("model_config") or {}
    args = checkpoint.get("args") or {}
    kwargs = config.get("kwargs", {})
    norm_style = "post" if layout == UPSTREAM_XFORMERS else kwargs.get("norm_style", args.get("norm_style", "pre"))
    final_norm = layout == TIMM_VIT or (layout == OURS and bool(kwargs.get("encoder_norm", False)))
    left_out = [k for k in state_dict if k not in {f"encoder.{name}" for name in encoder}]
    return EncoderWeights(str(path), layout, encoder, norm_style, left_out, md5_status, final_norm)


def _describe_left_out(keys: list[str]) -> str:
    pretraining_only = [k for k in keys if not k.startswith("encoder.")]
    other = [k.removeprefix("encoder.") for k in keys if k.startswith("encoder.")]
    parts = [f"{len(pretraining_only)} decoder/predictor tensors (pretraining only)"] if pretraining_only else []
    return ", ".join(parts + other)


def load_encoder(model: torch.nn.Module, weights: EncoderWeights) -> LoadReport:
    """Load encoder weights into a timm ``VisionTransformer`` classifier (fresh head).

    Position embeddings are resampled (bicubic) to the model's grid and the patch projection to its
    patch size (timm's ``resample_patch_embed``). In global-pool mode the model has ``fc_norm`` instead of
    ``norm``; ``norm`` is then left out, as MAE does.

    Raises:
        CheckpointError: an encoder tensor of the model is not in the file, or does not fit.
    """
    state_dict = dict(weights.state_dict)
    left_out = list(weights.left_out)
    model_keys = model.state_dict()
    grid = tuple(model.patch_embed.grid_size)
    if tuple(weights.grid) != grid:
        state_dict["pos_embed"] = resample_abs_pos_embed(state_dict["pos_embed"], list(grid), list(weights.grid), num_prefix_tokens=1)
    proj = state_dict["patch_embed.proj.weight"]
    target = model_keys["patch_embed.proj.weight"]
    if proj.shape[1] != target.shape[1]:
        raise CheckpointError(f"{weights.path}: encoder takes {proj.shape[1]} input channels, the model {target.shape[1]} (--in_chans)")
    if proj.shape[-2:] != target.shape[-2:]:
        state_dict["patch_embed.proj.weight"] = resample_patch_embed(proj, list(target.shape[-2:]))
    for key in [k for k in state_dict if k not in model_keys and k.startswith("norm.")]:
        left_out.append(f"encoder.{key}")
        del state_dict[key]
    _check_shapes(weights.path, model, state_dict)
    result = model.load_state_dict(state_dict, strict=False)
    not_loaded = [k for k in result.missing_keys if not k.startswith(("head.", "fc_norm."))]
    if not_loaded or result.unexpected_keys:
        problems = [f"not in the file: {_summarise(not_loaded)}"] if not_loaded else []
        problems += [f"not in the model: {_summarise(result.unexpected_keys)}"] if result.unexpected_keys else []
        raise CheckpointError(f"{weights.path}: encoder does not fit the model ({'; '.join(problems)}); refusing to train from random weights")
    return LoadReport(
        weights.path, weights.layout, type(model).__name__, len(state_dict),
        missing=result.missing_keys, unexpected=[_describe_left_out(left_out)] if left_out else [],
        md5_status=weights.md5_status,
    )
