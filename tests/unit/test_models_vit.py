import pytest
import torch
from timm.optim import create_optimizer_v2

import models_vit


def test_layer_decay_groups_scale_the_lr_by_depth():
    model = models_vit.create_classifier("vit_tiny_patch16", 3, img_size=32)
    optimizer = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scale_of = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            scale_of[param] = (group["lr_scale"], group["weight_decay"])
    named = dict(model.named_parameters())
    assert scale_of[named["patch_embed.proj.weight"]] == (0.5**5, 0.05)
    assert scale_of[named["cls_token"]] == (0.5**5, 0.0)
    assert scale_of[named["blocks.0.attn.qkv.weight"]] == (0.5**4, 0.05)
    assert scale_of[named["blocks.3.mlp.fc2.weight"]] == (0.5**1, 0.05)
    assert scale_of[named["blocks.3.norm1.weight"]] == (0.5**1, 0.0)
    assert scale_of[named["head.weight"]] == (1.0, 0.05)


def test_classifier_names_include_upstreams():
    assert {"vit_base_patch16", "vit_large_patch16", "vit_huge_patch14", "vit_tiny_patch16"} <= set(
        models_vit.CLASSIFIER_PRESETS
    )
    with pytest.raises(ValueError, match="model mae_vit_base: unknown"):
        models_vit.create_classifier("mae_vit_base", 10)
    model = models_vit.create_classifier("vit_base_patch16", 10, img_size=128, global_pool=True)
    assert model.global_pool == "avg" and isinstance(model.norm, torch.nn.Identity)
    assert model.head.weight.std() < 1e-4
