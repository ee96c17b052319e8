"""Linear probing: a BatchNorm + linear head on the frozen pretrained encoder, trained with LARS.

    python main_linprobe.py --finetune weights/cross_scale_mae_base_pretrain.pth --input_size 128 \
        --train_path train_128.csv --test_path val_128.csv
"""
from __future__ import annotations

import argparse

from util import config


def get_args_parser() -> argparse.ArgumentParser:
    parser = config.classification_parser(
        "Cross-Scale MAE linear probing", global_pool=False, head_init_std=0.01,
        batch_size=512, epochs=50, blr=0.1, min_lr=0.0, warmup_epochs=10, weight_decay=0.0,
    )
    group = parser.add_argument_group("linear probing")
    group.add_argument("--no_aug", action="store_true",
                       help="train on centre crops (no augmentation): the frozen features are computed once")
    group.add_argument("--loss", default="classification_cross", choices=("classification_cross",),
                       help="upstream flag: cross-entropy")
    return parser


if __name__ == "__main__":  # --help and flag errors answer here, before torch and timm load (~5 s)
    config.parse_args(get_args_parser())


import torch.nn as nn  # noqa: E402

from main_finetune import Setup, run_classification  # noqa: E402
from util import config  # noqa: E402
from util.data import transforms
from util.errors import UsageError  # noqa: E402
from util.run.process import run_entry_point
from util.run.lars import LARS  # noqa: E402


def setup(args: argparse.Namespace, model: nn.Module, num_classes: int) -> Setup:
    """Only the head trains: BatchNorm1d(affine=False) + Linear, with LARS."""
    model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head).to(model.head.weight.device)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("head.")
    optimizer = LARS(model.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    transform = transforms.image_transform(args, is_train=not args.no_aug)
    return Setup(model, model.head if args.no_aug else model, optimizer, nn.CrossEntropyLoss(), transform,
                 cache_features=args.no_aug)


def main(args: argparse.Namespace) -> None:
    if not args.eval and args.batch_size < 2:  # BatchNorm1d in training mode needs two values per channel
        raise UsageError(f"--batch_size must be at least 2 per device for linear probing (its head's BatchNorm), got {args.batch_size}")
    run_classification(args, setup)


if __name__ == "__main__":
    run_entry_point(main, config.parse_args(get_args_parser()))
