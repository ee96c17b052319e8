"""Linear probing: a BatchNorm + linear head on the frozen pretrained encoder, trained with LARS.

    python main_linprobe.py --finetune weights/cross_scale_mae_base_pretrain.pth --input_size 128 \
        --train_path train_128.csv --test_path val_128.csv

The flags become a run here; the run is ``engine_finetune.train_classifier`` with ``engine_finetune.linprobe_recipe``
(``--eval``: ``engine_finetune.evaluate_classifier``).
"""

from __future__ import annotations

from util import config
from util.errors import UsageError

# upstream's main_linprobe.py defaults (fMoW-RGB, 224 px); linprobe.sh sets the embedded sample's
UPSTREAM_DEFAULTS = {"batch_size": 512, "epochs": 50}  # (--blr 0.1 too)


def get_args_parser() -> config.Parser:
    parser = config.classification_parser(
        "Cross-Scale MAE linear probing. The defaults are upstream's (fMoW-RGB: 224 px, batch 512, 50 epochs, "
        "--blr 0.1); `bash linprobe.sh` runs the embedded sample with its own (64 px, batch 32, 90 epochs, --blr 10).",
        global_pool=False,
        head_init_std=0.01,
        **UPSTREAM_DEFAULTS,
        blr=0.1,
        min_lr=0.0,
        warmup_epochs=10,
        weight_decay=0.0,
    )
    group = parser.add_argument_group("linear probing")
    group.add_argument(
        "--no_aug",
        action="store_true",
        help="train on centre crops (no augmentation): the frozen features are computed once",
    )
    group.add_argument(
        "--loss", default="classification_cross", choices=("classification_cross",), help="upstream flag: cross-entropy"
    )
    return parser


def check(flags: config.Flags) -> config.Bands:
    """The flags' checks, torch-free (the command line runs them before torch loads); returns the bands.

    Raises:
        UsageError: one line naming the flag (a path: absolute).
    """
    config.check_training_flags(flags)
    config.check_classification_paths(flags)
    bands = config.resolve_bands(flags)
    if not flags.eval and flags.batch_size < 2:  # BatchNorm1d in training mode needs two values per channel
        raise UsageError(
            f"--batch_size must be at least 2 per device for linear probing (its head's BatchNorm), got "
            f"{flags.batch_size}"
        )
    return bands


def main(flags: config.Flags) -> None:
    """Check the flags (``check``), then probe or, with ``--eval``, evaluate."""
    bands = check(flags)
    config.note_upstream_defaults(flags, UPSTREAM_DEFAULTS, "bash linprobe.sh")
    import engine_finetune  # torch and timm load here, after the flags are known to work

    if flags.eval:
        engine_finetune.evaluate_classifier(flags, bands, engine_finetune.linprobe_head)
    else:
        engine_finetune.train_classifier(flags, bands, engine_finetune.linprobe_recipe)


if __name__ == "__main__":
    flags = config.parse_args(get_args_parser())  # --help and flag errors answer here, before torch loads
    config.check_or_exit(check, flags)  # so do bad values and missing paths
    from util.run.process import run_entry_point

    run_entry_point(main, flags)
