"""Upstream checkpoints in both layouts util/weights/layouts.py reads (timm blocks; xFormers blocks), and upstream's
encoder math.

Shared by the checkpoint tests of the model and of fine-tuning.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

# tiny preset at 32 px, patch 8: D = 128, 4 blocks, 8 heads; decoder 256, 4 blocks, 8 heads; L = 16
DIM, DEPTH, HEADS, DEC_DIM, DEC_DEPTH, PATCH, SIZE = 128, 4, 8, 256, 4, 8, 32
NUM_PATCHES = (SIZE // PATCH) ** 2


def _timm_block(prefix: str, d: int) -> dict[str, list[int]]:
    return {
        f"{prefix}norm1.weight": [d],
        f"{prefix}norm1.bias": [d],
        f"{prefix}attn.qkv.weight": [3 * d, d],
        f"{prefix}attn.qkv.bias": [3 * d],
        f"{prefix}attn.proj.weight": [d, d],
        f"{prefix}attn.proj.bias": [d],
        f"{prefix}norm2.weight": [d],
        f"{prefix}norm2.bias": [d],
        f"{prefix}mlp.fc1.weight": [4 * d, d],
        f"{prefix}mlp.fc1.bias": [4 * d],
        f"{prefix}mlp.fc2.weight": [d, 4 * d],
        f"{prefix}mlp.fc2.bias": [d],
    }


def _xformers_block(prefix: str, d: int) -> dict[str, list[int]]:
    shapes = {f"{prefix}wrap_att.norm.weight": [d], f"{prefix}wrap_att.norm.bias": [d]}
    for p in "qkv":
        shapes[f"{prefix}wrap_att.sublayer.layer.in_proj_container.{p}_proj.weight"] = [d, d]
        shapes[f"{prefix}wrap_att.sublayer.layer.in_proj_container.{p}_proj.bias"] = [d]
    shapes.update(
        {
            f"{prefix}wrap_att.sublayer.layer.proj.weight": [d, d],
            f"{prefix}wrap_att.sublayer.layer.proj.bias": [d],
            f"{prefix}wrap_ff.norm.weight": [d],
            f"{prefix}wrap_ff.norm.bias": [d],
            f"{prefix}wrap_ff.sublayer.layer.mlp.0.weight": [4 * d, d],
            f"{prefix}wrap_ff.sublayer.layer.mlp.0.bias": [4 * d],
            f"{prefix}wrap_ff.sublayer.layer.mlp.3.weight": [d, 4 * d],
            f"{prefix}wrap_ff.sublayer.layer.mlp.3.bias": [d],
        }
    )
    return shapes


def upstream_state_dict(layout: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under upstream's names (``timm`` or ``xformers`` layout) for the tiny paper model."""
    block = _timm_block if layout == "timm" else _xformers_block
    stack = "" if layout == "timm" else "encoders."
    shapes = {
        "cls_token": [1, 1, DIM],
        "encoder_pos_embed": [1, NUM_PATCHES + 1, DIM],
        "mask_token": [1, 1, DEC_DIM],
        "decoder_pos_embed": [1, NUM_PATCHES + 1, DEC_DIM],
        "patch_embed.proj.weight": [DIM, 3, PATCH, PATCH],
        "patch_embed.proj.bias": [DIM],
        "decoder_embed.weight": [DEC_DIM, DIM],
        "decoder_embed.bias": [DEC_DIM],
    }
    for i in range(DEPTH):
        shapes.update(block(f"encoder.{stack}{i}.", DIM))
    for j in range(DEC_DEPTH):
        shapes.update(block(f"decoder.{stack}{j}.", DEC_DIM))
    shapes.update(
        {
            "decoder_pred.weight": [PATCH * PATCH * 3, DEC_DIM],
            "decoder_pred.bias": [PATCH * PATCH * 3],
            "decoder_norm.weight": [DEC_DIM],
            "decoder_norm.bias": [DEC_DIM],
            "encoder_norm.weight": [DIM],
            "encoder_norm.bias": [DIM],
            "predictor.0.weight": [2048, DEC_DIM],
            "predictor.0.bias": [2048],
            "predictor.1.weight": [NUM_PATCHES],
            "predictor.1.bias": [NUM_PATCHES],
            "predictor.1.running_mean": [NUM_PATCHES],
            "predictor.1.running_var": [NUM_PATCHES],
            "predictor.1.num_batches_tracked": [],
            "predictor.3.weight": [DEC_DIM, 2048],
            "predictor.3.bias": [DEC_DIM],
        }
    )
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif "norm" in key and key.endswith("weight") or key.endswith("running_var"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            state[key] = 0.05 * torch.randn(shape, generator=generator)
    return state


def upstream_checkpoint(layout: str, seed: int = 0) -> dict:
    """The pickled dict upstream saves, with its ``argparse.Namespace``."""
    args = argparse.Namespace(
        model="mae_vit_tiny_MsLdCeCd",
        input_size=SIZE,
        patch_size=PATCH,
        mask_ratio=0.75,
        norm_pix_loss=False,
        use_xformers=layout == "xformers",
        attn_name="scaled_dot_product",
    )
    return {"model": upstream_state_dict(layout, seed), "optimizer": {}, "epoch": 399, "scaler": {}, "args": args}


def upstream_encoder(
    state: dict[str, torch.Tensor], imgs: torch.Tensor, layout: str, eps: float = 1e-6
) -> torch.Tensor:
    """Upstream's encoder on unmasked images, block by block with plain tensor ops; ends with encoder_norm."""
    x = F.conv2d(imgs, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2) + state["encoder_pos_embed"][:, 1:]
    cls = state["cls_token"] + state["encoder_pos_embed"][:, :1]
    x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
    n, length, d = x.shape

    def attention(h, q_w, q_b, k_w, k_b, v_w, v_b, proj_w, proj_b):
        split = lambda t: t.reshape(n, length, HEADS, d // HEADS).transpose(1, 2)
        q, k, v = split(F.linear(h, q_w, q_b)), split(F.linear(h, k_w, k_b)), split(F.linear(h, v_w, v_b))
        weights = (q @ k.transpose(-2, -1) / (d // HEADS) ** 0.5).softmax(-1)
        return F.linear((weights @ v).transpose(1, 2).reshape(n, length, d), proj_w, proj_b)

    def layer_norm(h, prefix):
        return F.layer_norm(h, (d,), state[prefix + "weight"], state[prefix + "bias"], eps)

    for i in range(DEPTH):
        if layout == "timm":
            p = f"encoder.{i}."
            qkv_w, qkv_b = state[p + "attn.qkv.weight"].chunk(3), state[p + "attn.qkv.bias"].chunk(3)
            h = layer_norm(x, p + "norm1.")
            x = x + attention(
                h,
                qkv_w[0],
                qkv_b[0],
                qkv_w[1],
                qkv_b[1],
                qkv_w[2],
                qkv_b[2],
                state[p + "attn.proj.weight"],
                state[p + "attn.proj.bias"],
            )
            h = layer_norm(x, p + "norm2.")
            x = x + F.linear(
                F.gelu(F.linear(h, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"])),
                state[p + "mlp.fc2.weight"],
                state[p + "mlp.fc2.bias"],
            )
        else:
            p = f"encoder.encoders.{i}."
            a = p + "wrap_att.sublayer.layer."
            c = a + "in_proj_container."
            x = layer_norm(
                x
                + attention(
                    x,
                    *(state[c + f"{w}_proj.{t}"] for w in "qkv" for t in ("weight", "bias")),
                    state[a + "proj.weight"],
                    state[a + "proj.bias"],
                ),
                p + "wrap_att.norm.",
            )
            f = p + "wrap_ff.sublayer.layer.mlp."
            x = layer_norm(
                x
                + F.linear(
                    F.gelu(F.linear(x, state[f + "0.weight"], state[f + "0.bias"])),
                    state[f + "3.weight"],
                    state[f + "3.bias"],
                ),
                p + "wrap_ff.norm.",
            )
    return layer_norm(x, "encoder_norm.")
