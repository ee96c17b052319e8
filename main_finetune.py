"""Fine-tune a pretrained Cross-Scale MAE encoder end to end for classification.

    python main_finetune.py --finetune weights/cross_scale_mae_base_pretrain.pth --input_size 128 \
        --train_path train_128.csv --test_path val_128.csv
"""
from __future__ import annotations

import argparse

import torch.nn as nn
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2

import engine_finetune
from util import config, misc


def get_args_parser() -> argparse.ArgumentParser:
    parser = engine_finetune.get_args_parser(
        "Cross-Scale MAE fine-tuning", global_pool=True, head_init_std=2e-5,
        batch_size=512, epochs=100, blr=1e-3, min_lr=1e-6, warmup_epochs=5, weight_decay=0.05,
    )
    group = parser.add_argument_group("fine-tuning")
    group.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise LR decay (timm param_groups_layer_decay)")
    group.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth rate")
    group.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    group = parser.add_argument_group("augmentation (timm create_transform; upstream parsed these but never applied them)")
    group.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="RandAugment policy, or 'none'")
    group.add_argument("--color_jitter", type=float, default=None, help="colour jitter (used when --aa is none)")
    group.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    group.add_argument("--remode", default="pixel", help="random erasing mode")
    group.add_argument("--recount", type=int, default=1, help="random erasing count")
    group = parser.add_argument_group("mixup / cutmix (timm Mixup)")
    group.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0 = off)")
    group.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0 = off)")
    group.add_argument("--cutmix_minmax", type=float, nargs=2, default=None)
    group.add_argument("--mixup_prob", type=float, default=1.0)
    group.add_argument("--mixup_switch_prob", type=float, default=0.5)
    group.add_argument("--mixup_mode", default="batch", choices=("batch", "pair", "elem"))
    return parser


def setup(args: argparse.Namespace, model: nn.Module, num_classes: int) -> engine_finetune.Setup:
    """All parameters train; AdamW with layer-wise LR decay; mixup/cutmix with soft-target cross-entropy."""
    mixing = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if mixing and args.batch_size % 2:
        raise misc.UsageError(f"--batch_size {args.batch_size}: mixup/cutmix need an even batch (or --mixup 0 --cutmix 0)")
    mixup = Mixup(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing, num_classes=num_classes,
    ) if mixing else None
    if mixing:
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    optimizer = create_optimizer_v2(
        model, "adamw", lr=args.lr, weight_decay=args.weight_decay, layer_decay=args.layer_decay, fused=True,
    )
    transform = create_transform(
        args.input_size, is_training=True, scale=(0.25, 1.0), hflip=0.5, vflip=0.5, interpolation="bicubic",
        auto_augment=None if args.aa == "none" else args.aa, color_jitter=args.color_jitter,
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, mean=args.mean, std=args.std,
    )
    return engine_finetune.Setup(model, model, optimizer, criterion, transform, mixup)


def main(args: argparse.Namespace) -> None:
    engine_finetune.main(args, setup)


if __name__ == "__main__":
    misc.run_entry_point(main, config.parse_args(get_args_parser()))
