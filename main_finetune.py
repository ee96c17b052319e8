"""Fine-tune a pretrained Cross-Scale MAE encoder end to end for classification.

    python main_finetune.py --finetune weights/cross_scale_mae_base_pretrain.pth --input_size 128 \
        --train_path train_128.csv --test_path val_128.csv

The flags become a run here; the run is ``engine_finetune.train_classifier`` with ``engine_finetune.finetune_recipe``
(``--eval``: ``engine_finetune.evaluate_classifier``).
"""

from __future__ import annotations

from util import config

# upstream's main_finetune.py defaults (fMoW-RGB, 224 px); finetune.sh sets the embedded sample's
UPSTREAM_DEFAULTS = {"batch_size": 512, "epochs": 100}  # (--blr 1e-3 too: finetune.sh keeps it)


def get_args_parser() -> config.Parser:
    parser = config.classification_parser(
        "Cross-Scale MAE fine-tuning. The defaults are upstream's (fMoW-RGB: 224 px, batch 512, 100 epochs, "
        "--blr 1e-3); `bash finetune.sh` runs the embedded sample with its own (64 px, batch 32, 30 epochs).",
        global_pool=True,
        head_init_std=2e-5,
        **UPSTREAM_DEFAULTS,
        blr=1e-3,
        min_lr=1e-6,
        warmup_epochs=5,
        weight_decay=0.05,
    )
    group = parser.add_argument_group("fine-tuning")
    group.add_argument(
        "--layer_decay", type=float, default=0.75, help="layer-wise LR decay (timm param_groups_layer_decay)"
    )
    group.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth rate")
    group.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    group = parser.add_argument_group(
        "augmentation (timm create_transform; upstream parsed these but never applied them)"
    )
    group.add_argument(
        "--aa",
        default=None,
        help="RandAugment policy, or 'none' (default: rand-m9-mstd0.5-inc1 for 8-bit RGB, "
        "none for other band counts / bit depths: RGB-only)",
    )
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


def check(flags: config.Flags) -> config.Bands:
    """The flags' checks, torch-free (the command line runs them before torch loads); returns the bands.

    Raises:
        UsageError: one line naming the flag (a path: absolute).
    """
    config.check_training_flags(flags)
    config.check_classification_paths(flags)
    return config.resolve_bands(flags)


def main(flags: config.Flags) -> None:
    """Check the flags (``check``), then fine-tune or, with ``--eval``, evaluate."""
    bands = check(flags)
    config.note_upstream_defaults(flags, UPSTREAM_DEFAULTS, "bash finetune.sh")
    import engine_finetune  # torch and timm load here, after the flags are known to work

    if flags.eval:
        engine_finetune.evaluate_classifier(flags, bands)
    else:
        engine_finetune.train_classifier(flags, bands, engine_finetune.finetune_recipe, drop_path=flags.drop_path)


if __name__ == "__main__":
    flags = config.parse_args(get_args_parser())  # --help and flag errors answer here, before torch loads
    config.check_or_exit(check, flags)  # so do bad values and missing paths
    from util.run.process import run_entry_point

    run_entry_point(main, flags)
