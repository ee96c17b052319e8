"""Command-line parsing with ``--config file.yaml`` as the default layer, as timm's train.py does."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import yaml

from util.defaults import DATASET_TYPES, DEFAULT_TRAIN_CSV, DEFAULT_VAL_CSV, FMOW_RGB_MEAN, FMOW_RGB_STD
from util.errors import UsageError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with every flag's default (unless its help text already says what the default is)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or "%(default)" in text or action.required or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def new_parser(description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` whose ``--help`` shows the defaults (``HelpFormatter``)."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; values of ``--config FILE`` become defaults, so flags on the command line win.

    Bad configuration exits with a one-line message naming the file and the key.
    """
    parser.add_argument("--config", default=None, help="YAML file of flag values (command-line flags win; a run's config.yaml reproduces it)")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            parser.error(f"--config {path}: cannot read ({str(e).splitlines()[0]})")
        if not isinstance(values, dict):
            parser.error(f"--config {path}: expected a mapping of flag names to values")
        flags = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - flags)
        if unknown:
            parser.error(f"--config {path}: unknown key(s) {', '.join(unknown)}")
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def save_config(args: argparse.Namespace, path: Path) -> None:
    """Write the resolved flags as YAML; ``--config`` of this file reproduces the run."""
    values = {k: v for k, v in vars(args).items() if k not in ("config", "lr_given", "world_size")}
    if "lr_given" in vars(args):  # the lr the user gave, not the one derived from --blr: the linear scaling rule keeps applying
        values["lr"] = args.lr_given
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))


def add_optimisation_args(parser: argparse.ArgumentParser, **defaults) -> None:
    """Batch, schedule and optimiser flags; ``defaults`` gives each script's upstream values."""
    group = parser.add_argument_group("optimisation")
    group.add_argument("--batch_size", type=int, default=defaults["batch_size"], help="images per device per step (effective batch: x --accum_iter x GPUs)")
    group.add_argument("--epochs", type=int, default=defaults["epochs"], help="epochs of the whole run (a resume continues to it)")
    group.add_argument("--accum_iter", type=int, default=1, help="steps accumulated per optimiser update")
    group.add_argument("--lr", type=float, default=None, help="absolute learning rate (default: --blr x effective batch / 256)")
    group.add_argument("--blr", type=float, default=defaults["blr"], help="base learning rate per 256 images")
    group.add_argument("--min_lr", type=float, default=defaults["min_lr"], help="learning rate at the end of the cosine schedule")
    group.add_argument("--warmup_epochs", type=float, default=defaults["warmup_epochs"], help="epochs of linear LR warm-up (fractions allowed)")
    group.add_argument("--weight_decay", type=float, default=defaults["weight_decay"], help="AdamW / LARS weight decay")
    group.add_argument("--clip_grad", type=float, default=None, help="clip the gradient norm to this value (default: no clipping)")


def add_data_args(parser: argparse.ArgumentParser, input_size: int | None, train_path: str | None, patch_size: int | None = 16) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--train_path", default=train_path, help="CSV file (fMoW format), ImageFolder tree or image folder")
    group.add_argument("--dataset_type", default="auto", choices=DATASET_TYPES, help="auto detects from --train_path")
    group.add_argument("--input_size", type=int, default=input_size,
                       help="image side in pixels" + ("" if input_size else " (default: that of the pretrained weights)"))
    group.add_argument("--patch_size", type=int, default=patch_size,
                       help="patch side in pixels" + ("" if patch_size else " (default: that of the pretrained weights)"))
    group.add_argument("--in_chans", type=int, default=3, help="input channels")
    group.add_argument("--mean", type=float, nargs=3, default=list(FMOW_RGB_MEAN), help="normalisation mean (fMoW-RGB)")
    group.add_argument("--std", type=float, nargs=3, default=list(FMOW_RGB_STD), help="normalisation std (fMoW-RGB)")
    group.add_argument("--skip_bad_images", action="store_true",
                       help="skip unreadable images (each reported with a warning) instead of stopping")
    group.add_argument("--num_workers", type=int, default=8, help="DataLoader worker processes per GPU / process")
    group.add_argument("--pin_mem", action=argparse.BooleanOptionalAction, default=True, help="pinned host memory (CUDA)")


def add_runtime_args(parser: argparse.ArgumentParser, output_dir: str, training: bool = True,
                     output_help: str = "folder of checkpoints, config.yaml, log.txt, TensorBoard events and figures") -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--output_dir", default=output_dir, help=output_help)
    group.add_argument("--device", default="auto", help="auto (GPU if any, else CPU), cpu, cuda, cuda:N")
    group.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"),
                       help="autocast dtype; auto = bf16 where the device does it natively, else fp32")
    group.add_argument("--seed", type=int, default=0, help="random seed (data order, masks, initialisation)")
    group.add_argument("--dist_timeout", type=float, default=30.0, help="time before a stuck collective ends the job, in minutes")
    if not training:
        return
    group.add_argument("--log_dir", default=None, help="TensorBoard folder (default: --output_dir)")
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument("--attention", default="auto", choices=("auto", "sdpa", "math"),
                       help="auto: scaled_dot_product_attention on GPU, explicit matmul + softmax on CPU (faster there)")
    group.add_argument("--resume", default="", help="checkpoint to continue from, or 'auto' for the newest in --output_dir")
    group.add_argument("--start_epoch", type=int, default=0, help="first epoch (index) when not resuming")
    group.add_argument("--overwrite", action="store_true",
                       help="start a fresh run in an --output_dir that holds another run's checkpoints (they get replaced)")
    group.add_argument("--allow_changed_flags", action="store_true",
                       help="resume although --epochs, --batch_size, LR or schedule flags differ from the checkpoint's run")
    group.add_argument("--log_every", type=int, default=20, help="steps between log lines (each epoch also ends with a line: its time, the run's ETA)")


DEFAULT_INPUT_SIZE = 224  # classification's --input_size when not given (main_finetune.DEFAULT_INPUT_SIZE)


def classification_parser(description: str, *, global_pool: bool, head_init_std: float, **defaults) -> argparse.ArgumentParser:
    """The flags of fine-tuning and linear probing; ``defaults`` are each script's upstream values."""
    parser = new_parser(description)
    add_optimisation_args(parser, **defaults)
    add_data_args(parser, input_size=None, train_path=str(DEFAULT_TRAIN_CSV), patch_size=None)
    add_runtime_args(parser, output_dir="./output_dir")
    parser._option_string_actions["--input_size"].help = (
        f"image side in pixels (default: {DEFAULT_INPUT_SIZE}; with --eval: the checkpoint's)")
    group = parser.add_argument_group("classification")
    group.add_argument("--finetune", default="", metavar="PATH",
                       help="pretrained weights: our or upstream's pretraining checkpoint (either layout), or a timm encoder export")
    group.add_argument("--model", default=None, help="vit_{tiny,small,base,large,huge}_patch16 or vit_huge_patch14 "
                                                     "(default: the architecture of --finetune)")
    group.add_argument("--test_path", default=str(DEFAULT_VAL_CSV), help="evaluation data (CSV, ImageFolder)")
    group.add_argument("--nb_classes", type=int, default=None, help="number of classes (default: from the training labels)")
    group.add_argument("--global_pool", dest="global_pool", action="store_true", default=global_pool,
                       help="mean of the patch tokens + fc_norm")
    group.add_argument("--cls_token", dest="global_pool", action="store_false", help="the cls token after norm")
    group.add_argument("--head_init_std", type=float, default=head_init_std, help="std of the fresh head's initialisation")
    group.add_argument("--eval", action="store_true", help="only evaluate (--resume or --finetune weights) and exit")
    group.add_argument("--save_every", type=int, default=0, help="also keep checkpoint-{epoch}.pth every N epochs (0 = never)")
    group.add_argument("--wandb_project", default=None, help="ignored (upstream flag): logs go to TensorBoard")
    return parser


def check_common_args(args: argparse.Namespace) -> None:
    """Refuse flag values that cannot work, naming the flag."""
    if args.patch_size and args.input_size and args.input_size % args.patch_size:
        raise UsageError(f"--input_size {args.input_size} is not divisible by --patch_size {args.patch_size}")
    if args.accum_iter < 1:
        raise UsageError(f"--accum_iter must be at least 1, got {args.accum_iter}")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.epochs < 1 or args.log_every < 1:
        raise UsageError("--epochs and --log_every must be at least 1")
    if args.clip_grad is not None and not args.clip_grad > 0:  # also NaN; a negative norm would reverse the gradient
        raise UsageError(f"--clip_grad must be > 0 (or left out: no clipping), got {args.clip_grad}")
