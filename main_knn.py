"""Multi-scale kNN evaluation of frozen encoders: top-1 at 12.5 / 25 / 50 / 100 % of the ground resolution.

    python main_knn.py --checkpoints none output/pretrain_tiny/checkpoint-last.pth
    weights/cross_scale_mae_base_pretrain.pth

Writes ``knn_results.csv``, ``knn_results.md`` (table + protocol), ``protocol.json`` and
``knn_accuracy_vs_scale.png`` to ``--output_dir``. The flags become a run here; the run is ``engine_knn.evaluate``.
"""

from __future__ import annotations

import os

from util import config
from util.errors import UsageError


def get_args_parser() -> config.Parser:
    parser = config.new_parser("Multi-scale kNN evaluation")
    group = parser.add_argument_group("encoders")
    group.add_argument(
        "--checkpoints",
        nargs="+",
        required=True,
        metavar="PATH",
        help="checkpoints (any kind --finetune accepts), or 'none' for a random-init encoder of --model",
    )
    group.add_argument("--model", default=None, help="architecture of 'none' (default: that of the other checkpoints)")
    group = config.add_data_args(
        parser,
        input_size=None,
        train_path=str(config.DEFAULT_TRAIN_CSV),
        patch_size=None,
        train_help="memory (labelled reference) set: CSV, ImageFolder tree or packed .json",
        input_help="image side in pixels (default: that of the first checkpoint, else 224)",
    )
    config.add_evaluation_set_args(group, "evaluation images")
    group.add_argument("--batch_size", type=int, default=64, help="images per device per inference batch")
    config.add_runtime_args(
        parser,
        output_dir="output/knn",
        training=False,
        output_help="folder of knn_results.csv/.md, protocol.json and knn_accuracy_vs_scale.png; a training run's "
        "folder "
        "(one holding checkpoint-*.pth) gets them in its knn/ subfolder, never over its files",
    )
    group = parser.add_argument_group("protocol")
    group.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=[0.125, 0.25, 0.5, 1.0],
        help="fractions of the input side the evaluation images are down-sampled to",
    )
    group.add_argument(
        "--scale_mode",
        default="resize",
        choices=config.KNN_SCALE_MODES,
        help="resize: down-sample then resize back; native: feed the small image, interpolating position embeddings",
    )
    group.add_argument("--pool", default="cls", choices=config.KNN_POOLS, help="cls token or mean of the patch tokens")
    group.add_argument("--k", type=int, default=20, help="neighbours (k) of the weighted classifier")
    group.add_argument("--temperature", type=float, default=0.07, help="temperature of the weighted classifier")
    group.add_argument("--majority_k", type=int, default=5, help="neighbours (k) of the majority classifier")
    return parser


def check(flags: config.Flags) -> config.Bands:
    """The flags' checks, torch-free (the command line runs them before torch loads); returns the bands.

    Raises:
        UsageError: one line naming the flag (a path: absolute).
    """
    config.check_ranges(flags)
    config.check_paths(flags, "checkpoints", "train_path", "test_path", "band_stats")
    seen = {}
    for spec in flags.checkpoints:  # one checkpoint twice: one row per checkpoint and label (engine_knn)
        key = spec if spec == "none" else os.path.realpath(spec)
        if key in seen:
            raise UsageError(f"--checkpoints gives {seen[key]} and {spec}: the same checkpoint twice")
        seen[key] = spec
    config.evaluation_path(flags.train_path, flags.test_path)  # no evaluation set: refused
    bands = config.resolve_bands(flags)
    if any(not 0 < s <= 1 for s in flags.scales):
        raise UsageError(f"--scales must lie in (0, 1], got {flags.scales}")
    return bands


def main(flags: config.Flags) -> None:
    """Check the flags (``check``), then evaluate."""
    bands = check(flags)
    import engine_knn  # torch and timm load here, after the flags are known to work

    engine_knn.evaluate(flags, bands)


if __name__ == "__main__":
    flags = config.parse_args(get_args_parser())  # --help and flag errors answer here, before torch loads
    config.check_or_exit(check, flags)  # so do bad values and missing paths
    from util.run.process import run_entry_point

    run_entry_point(main, flags)
