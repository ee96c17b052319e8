"""Semantic segmentation with a pretrained Cross-Scale MAE encoder: UperNet (MAE / BEiT recipe) or a per-patch
linear probe, fine-tuned or on a frozen encoder; mIoU, mF1 and overall accuracy with sliding-window inference,
and mIoU against the resolution of the evaluation images.

    python main_segment.py --finetune output/pretrain_tiny/checkpoint-last.pth          # the embedded sample
    python main_segment.py --finetune weights/cross_scale_mae_base_pretrain.pth --palette isprs --input_size 512 \
        --train_path potsdam/train --test_path potsdam/val --exclude_classes 5          # ISPRS, clutter left out of
        the means

The flags become a run here; the run is ``engine_segment.train_segmenter`` (``--eval``:
``engine_segment.evaluate_segmenter``).
"""

from __future__ import annotations

from util import config


def get_args_parser() -> config.Parser:
    parser = config.new_parser("Cross-Scale MAE semantic segmentation")
    config.add_optimisation_args(
        parser, batch_size=8, epochs=20, blr=1.6e-3, min_lr=1e-6, warmup_epochs=2, weight_decay=0.05
    )
    config.add_segmentation_data_args(parser)
    group = parser.add_argument_group("augmentation")
    group.add_argument("--crop_scale", type=float, nargs=2, default=[0.25, 1.0], help="RandomResizedCrop area range")
    config.add_runtime_args(parser, output_dir="./output_segment")
    group = parser.add_argument_group("segmentation")
    group.add_argument(
        "--finetune",
        default="",
        metavar="PATH",
        help="pretrained weights: any checkpoint main_finetune.py accepts (ours, upstream's, timm export, classifier)",
    )
    group.add_argument(
        "--model",
        default=None,
        help="vit_{tiny,small,base,large,huge}_patch16 (default: the architecture of --finetune)",
    )
    group.add_argument(
        "--patch_size", type=int, default=None, help="patch side (default: that of the pretrained weights)"
    )
    group.add_argument(
        "--head",
        default="upernet",
        choices=("upernet", "linear"),
        help="upernet: 4-level pyramid + UperNet; linear: per-patch linear probe upsampled to pixels",
    )
    group.add_argument(
        "--freeze_encoder", action="store_true", help="train only neck and head (PANGAEA's frozen-encoder protocol)"
    )
    group.add_argument("--decoder_channels", type=int, default=512, help="UperNet width")
    group.add_argument("--layer_decay", type=float, default=0.65, help="layer-wise LR decay (timm)")
    group.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth rate of the encoder")
    group.add_argument(
        "--class_weights", type=float, nargs="+", default=None, help="cross-entropy weight of each class"
    )
    config.add_segmentation_evaluation_args(parser)
    group = parser.add_argument_group("run mode")
    group.add_argument(
        "--eval", action="store_true", help="only evaluate the segmenter of --resume (or --finetune) and exit"
    )
    group.add_argument("--save_every", type=int, default=0, help="also keep checkpoint-{epoch}.pth every N epochs")
    return parser


def check(flags: config.Flags) -> config.Bands:
    """The flags' checks, torch-free (the command line runs them before torch loads); returns the bands.

    Raises:
        UsageError: one line naming the flag (a path: absolute).
    """
    config.check_training_flags(flags)
    config.check_segmentation_evaluation_flags(flags)
    config.check_paths(flags, "train_path", "test_path", "finetune", "resume", "band_stats", "palette")
    config.evaluation_path(flags.train_path, flags.test_path, split=False)  # no evaluation pairs: refused
    if not flags.eval:
        config.check_segmentation_training_flags(flags)
    bands = config.resolve_bands(flags)
    from util.eval import location_blocks

    location_blocks.block_ids([], flags.block_pattern, flags.block_size)  # checks the pattern and the size
    return bands


def main(flags: config.Flags) -> None:
    """Check the flags (``check``), then train or, with ``--eval``, evaluate."""
    bands = check(flags)
    import engine_segment  # torch, timm and segmentation_models_pytorch load here, after the flags are known to work

    if flags.eval:
        engine_segment.evaluate_segmenter(flags, bands)
    else:
        engine_segment.train_segmenter(flags, bands)


if __name__ == "__main__":
    flags = config.parse_args(get_args_parser())  # --help and flag errors answer here, before torch loads
    config.check_or_exit(check, flags)  # so do bad values and missing paths
    from util.run.process import run_entry_point

    run_entry_point(main, flags)
