"""Command-line parsing with ``--config file.yaml`` as the default layer, as timm's train.py does."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import yaml

from util.errors import UsageError, first_line

STATS_TOOL = "tools/band_stats.py"

# Values --help shows (choices, default paths, normalisation statistics): this module imports no torch, so that
# --help and flag errors answer before torch, timm and matplotlib load.
DATASET_TYPES = ("auto", "fmow_rgb", "csv", "imagefolder", "folder", "coco", "packed", "shards")
DEFAULT_TRAIN_CSV = Path(__file__).resolve().parent.parent / "data" / "sentinel2_rgb" / "train.csv"
DEFAULT_VAL_CSV = DEFAULT_TRAIN_CSV.with_name("val.csv")

FMOW_RGB_MEAN = (0.43392888, 0.43578541, 0.40744025)
FMOW_RGB_STD = (0.19828456, 0.19250111, 0.19454683)

# Images declaring more pixels are refused (``--max_image_pixels``): a tiny PNG can declare 10^10 pixels and
# exhaust memory when decoded. The default admits a full Sentinel-2 tile (10980^2 ~ 120 Mpx).
MAX_IMAGE_PIXELS = 250_000_000

KNN_SCALE_MODES = ("resize", "native")
KNN_POOLS = ("cls", "mean")


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

    Bad configuration exits with status 1 and one line ``error: --config FILE: …`` naming the file and the key.
    """
    parser.add_argument("--config", default=None, help="YAML file of flag values (command-line flags win; a run's config.yaml reproduces it)")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise SystemExit(f"error: --config {path}: cannot read ({first_line(e)})") from None
        if not isinstance(values, dict):
            raise SystemExit(f"error: --config {path}: expected a mapping of flag names to values")
        flags = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - flags)
        if unknown:
            raise SystemExit(f"error: --config {path}: unknown key(s) {', '.join(unknown)}")
        actions = {action.dest: action for action in parser._actions}
        for key, value in values.items():
            try:
                values[key] = config_value(actions[key], value)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                raise SystemExit(f"error: --config {path}: {key}: {first_line(e)}") from None
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def config_value(action: argparse.Action, value):
    """A ``--config`` value checked and converted as the flag's command-line text would be: the flag's ``type``,
    ``nargs`` and ``choices`` (argparse applies them only to strings, so a YAML ``epochs: [1]`` would pass).

    Raises:
        ValueError: naming what the flag expects.
    """
    if value is None:
        if action.default is None:
            return None
        raise ValueError(f"null, but the flag needs a value (default {action.default!r})")
    if action.nargs == 0:  # store_true / store_false / BooleanOptionalAction
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    convert = action.type or str
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if many:
        if not isinstance(value, list):
            raise ValueError("expected a list" + (f" of {action.nargs} values" if isinstance(action.nargs, int) else "")
                             + f", got {value!r}")
        if isinstance(action.nargs, int) and len(value) != action.nargs or action.nargs == "+" and not value:
            raise ValueError(f"expected {action.nargs} value(s), got {len(value)}")
        items = value
    else:
        items = [value]
    converted = []
    for item in items:
        if isinstance(item, (list, dict, bool)) and convert is not bool:
            raise ValueError(f"expected a single {getattr(convert, '__name__', 'value')}, got {item!r}")
        try:
            item = convert(str(item))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise ValueError(f"{item!r} is not a valid {getattr(convert, '__name__', 'value')} ({first_line(e)})") from None
        if action.choices is not None and item not in action.choices:
            raise ValueError(f"{item!r} is not one of {', '.join(map(str, action.choices))}")
        converted.append(item)
    return converted if many else converted[0]


def save_config(args: argparse.Namespace, path: Path) -> None:
    """Write the resolved flags as YAML; ``--config`` of this file reproduces the run."""
    values = {k: v for k, v in vars(args).items() if k not in ("config", "lr_given", "world_size", "raster", "shard_manifest")}
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


def add_band_args(group) -> None:
    """The band flags every entry point reads (multispectral / high-bit-depth data, ``resolve_band_args``):
    --in_chans, --mean, --std, --bands, --band_stats, --nodata, --rgb_bands, --checkpoint_rgb_bands, --stretch."""
    group.add_argument("--in_chans", type=int, default=3, help="input channels")
    group.add_argument("--mean", type=float, nargs="+", default=list(FMOW_RGB_MEAN),
                       help="normalisation mean, one per band (8-bit RGB: fMoW-RGB in [0, 1]; multispectral: in the file's units)")
    group.add_argument("--std", type=float, nargs="+", default=list(FMOW_RGB_STD), help="normalisation std, one per band")
    group.add_argument("--bands", type=int, nargs="+", default=None, metavar="I",
                       help="0-based band indices to read, in order (multispectral; default: all)")
    group.add_argument("--band_stats", default=None, metavar="FILE.json",
                       help=f"per-band mean / std written by {STATS_TOOL} (multispectral and 16-bit data)")
    group.add_argument("--nodata", type=float, default=None,
                       help="no-data value (default: a TIFF's GDAL_NODATA tag); such pixels are filled with the band mean")
    group.add_argument("--rgb_bands", type=int, nargs="+", default=None, metavar="I",
                       help="bands (indices into the bands read) shown as R G B in reconstruction figures "
                            "(default: the first three; one band: grey); loading RGB weights into a model of more "
                            "bands: the bands that get the RGB filters (the others start at zero)")
    group.add_argument("--checkpoint_rgb_bands", type=int, nargs=3, default=None, metavar="I",
                       help="loading multispectral weights into a 3-band (RGB) model: the checkpoint's bands whose "
                            "filters become R G B (the others are dropped)")
    group.add_argument("--stretch", action="store_true",
                       help="8-bit RGB path: stretch 16-bit / float images from their 1st to 99th percentile per band "
                            "(default: refuse them: give --band_stats instead)")


def add_data_args(parser: argparse.ArgumentParser, input_size: int | None, train_path: str | None, patch_size: int | None = 16) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--train_path", default=train_path, help="CSV file (fMoW format), ImageFolder tree or image folder")
    group.add_argument("--dataset_type", default="auto", choices=DATASET_TYPES, help="auto detects from --train_path")
    group.add_argument("--input_size", type=int, default=input_size,
                       help="image side in pixels" + ("" if input_size else " (default: that of the pretrained weights)"))
    group.add_argument("--patch_size", type=int, default=patch_size,
                       help="patch side in pixels" + ("" if patch_size else " (default: that of the pretrained weights)"))
    add_band_args(group)
    group.add_argument("--max_image_pixels", type=float, default=float(MAX_IMAGE_PIXELS),
                       help="refuse images declaring more pixels (decompression bombs); the default admits a full "
                            "Sentinel-2 tile (~120 Mpx)")
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


# The valid range of every numeric flag of every entry point (absent or None flags are not checked):
# flag -> (lowest, highest, whether the ends are included). NaN is outside every range.
INF = float("inf")
RANGES = {
    "lr": (0, INF, False), "blr": (0, INF, False), "min_lr": (0, INF, True), "warmup_epochs": (0, INF, True),
    "weight_decay": (0, INF, True), "num_workers": (0, INF, True), "input_size": (1, INF, True),
    "patch_size": (1, INF, True), "in_chans": (1, INF, True), "std": (0, INF, False), "mean": (-INF, INF, False),
    "seed": (0, 2**32 - 1, True), "dist_timeout": (0, INF, False), "start_epoch": (0, INF, True),
    "save_every": (0, INF, True), "plot_every": (0, INF, True), "knn_eval_every": (0, INF, True),
    "log_every": (1, INF, True), "epochs": (1, INF, True), "accum_iter": (1, INF, True), "batch_size": (1, INF, True),
    "temperature": (0, INF, False), "head_init_std": (0, INF, True), "nb_classes": (1, INF, True),
    "layer_decay": (0, 1, True), "drop_path": (0, 1, True), "smoothing": (0, 1, True), "reprob": (0, 1, True),
    "recount": (0, INF, True), "mixup": (0, INF, True), "cutmix": (0, INF, True), "mixup_prob": (0, 1, True),
    "mixup_switch_prob": (0, 1, True), "scale_range": (0, 1, True), "val_fraction": (0, 1, False),
    "k": (1, INF, True), "majority_k": (1, INF, True), "max_image_pixels": (1, INF, True),
    "workers": (1, INF, True), "size": (1, INF, True), "color_jitter": (0, INF, True),
}


def describe_range(low: float, high: float, inclusive: bool) -> str:
    if high == INF:
        return (f"at least {low:g}" if inclusive else f"> {low:g}") if low != -INF else "finite"
    return f"in [{low:g}, {high:g}]" if inclusive else f"in ({low:g}, {high:g})"


def check_ranges(args: argparse.Namespace) -> None:
    """Refuse a numeric flag outside its range in ``RANGES`` (the one table every entry point checks).

    Raises:
        UsageError: ``--flag must be RANGE, got VALUE``.
    """
    for flag, (low, high, inclusive) in RANGES.items():
        value = getattr(args, flag, None)
        if value is None or isinstance(value, (str, bool)):
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(item, (int, float)):
                continue
            inside = (low <= item <= high) if inclusive else (low < item < high)
            if not inside or item != item:
                shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
                raise UsageError(f"--{flag} must be {describe_range(low, high, inclusive)}, got {shown}")


def is_raster_run(args: argparse.Namespace) -> bool:
    """Whether the data goes through ``images.read_raster`` (any band count, the file's units) rather than the
    8-bit RGB path: --in_chans other than 3, or any of --bands, --band_stats, --nodata."""
    return (getattr(args, "in_chans", 3) != 3 or bool(getattr(args, "bands", None)) or bool(getattr(args, "band_stats", None))
            or getattr(args, "nodata", None) is not None)


def same_value(a, b) -> bool:
    """``a == b``, with NaN equal to NaN (``--nodata nan``)."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def resolve_band_args(args: argparse.Namespace) -> None:
    """Check --bands / --mean / --std / --band_stats / --rgb_bands against --in_chans; set ``args.raster`` and, from
    --band_stats, ``args.mean`` / ``args.std``.

    Raises:
        UsageError: one line naming the flag (and the statistics tool where statistics are missing).
    """
    args.raster = is_raster_run(args)
    count = args.in_chans
    if getattr(args, "bands", None) and len(args.bands) != count:
        raise UsageError(f"--bands names {len(args.bands)} band(s) but --in_chans is {count}")
    if getattr(args, "bands", None) and min(args.bands) < 0:
        raise UsageError(f"--bands are 0-based indices, got {' '.join(map(str, args.bands))}")
    default = list(args.mean) == list(FMOW_RGB_MEAN) and list(args.std) == list(FMOW_RGB_STD)
    if getattr(args, "band_stats", None):
        if not default:
            raise UsageError("--band_stats and --mean / --std both give statistics: give one of them")
        args.mean, args.std = read_band_stats(args.band_stats, args.bands, count)
        # ...: an older file, which does not say; a run without --nodata is checked per file (util.data.raster_options.RasterOptions)
        given = band_stats_source(args.band_stats).get("nodata", ...)
        nodata = getattr(args, "nodata", None)
        if given is not ... and nodata is not None and not same_value(given, nodata):
            raise UsageError(f"--band_stats {args.band_stats} was computed with " + (f"--nodata {given:g}" if given is not None
                             else "no --nodata (the files' GDAL_NODATA tags, if any)") + f", this run has --nodata {nodata:g}: "
                             "give the same no-data value (statistics and inputs would count other pixels as data)")
    elif args.raster and default:
        raise UsageError(f"{count}-band / non-8-bit data needs per-band statistics: run {STATS_TOOL} on the training data "
                         "and pass --band_stats FILE.json (or --mean / --std, one per band, in the file's units)")
    for flag in ("mean", "std"):
        if len(getattr(args, flag)) != count:
            raise UsageError(f"--{flag} has {len(getattr(args, flag))} value(s) but --in_chans is {count}: one per band")
    rgb = getattr(args, "rgb_bands", None)
    if rgb is not None and (len(rgb) not in (1, 3) or not all(0 <= b < count for b in rgb)):
        raise UsageError(f"--rgb_bands needs 1 or 3 indices in 0..{count - 1} (of the bands read), got {' '.join(map(str, rgb))}")


def band_stats_source(path: str) -> dict:
    """What a ``tools/band_stats.py`` file says of the data it was computed on: ``dtype`` (sample type) and ``nodata``
    (the --nodata given to it, or None), where it records them ({} if unreadable: ``read_band_stats`` reports that)."""
    import json

    try:
        stats = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(stats, dict):
        return {}
    found = {key: stats[key] for key in ("dtype", "nodata") if key in stats}
    if not isinstance(found.get("dtype", ""), str):
        found.pop("dtype")
    if "nodata" in found and not (found["nodata"] is None or isinstance(found["nodata"], (int, float))):
        found.pop("nodata")
    return found


def read_band_stats(path: str, bands: list[int] | None, count: int) -> tuple[list[float], list[float]]:
    """Mean and std from a ``tools/band_stats.py`` JSON file, for ``bands`` (indices of the file's bands; None: all).

    Raises:
        UsageError: unreadable file, missing keys, bands it lacks, or a length other than ``count``.
    """
    import json

    try:
        stats = json.loads(Path(path).read_text())
        mean, std = [float(v) for v in stats["mean"]], [float(v) for v in stats["std"]]
        have = [int(b) for b in stats.get("bands", range(len(mean)))]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--band_stats {path}: not a {STATS_TOOL} file ({type(e).__name__}: {first_line(e)})") from None
    if not len(have) == len(mean) == len(std) or len(set(have)) != len(have):
        raise UsageError(f"--band_stats {path}: bands {' '.join(map(str, have))} (each once) need as many means and stds, "
                         f"found {len(mean)} and {len(std)}")
    if bands:
        missing = [b for b in bands if b not in have]
        if missing:
            raise UsageError(f"--band_stats {path}: no statistics for band(s) {' '.join(map(str, missing))} "
                             f"(it has {' '.join(map(str, have))})")
        mean, std = [mean[have.index(b)] for b in bands], [std[have.index(b)] for b in bands]
    if len(mean) != count or len(std) != count:
        raise UsageError(f"--band_stats {path}: {len(mean)} band(s) of statistics but --in_chans is {count}")
    if not all(s > 0 and s != INF for s in std) or not all(abs(m) != INF and m == m for m in mean):
        raise UsageError(f"--band_stats {path}: mean must be finite and std finite and > 0 in every band, got mean "
                         f"{mean}, std {std}")
    return mean, std


def check_data_args(args: argparse.Namespace) -> None:
    """The flag checks of every entry point that reads images: ranges (``check_ranges``), ``--max_image_pixels`` and
    ``--stretch`` applied, the band flags resolved (``resolve_band_args``).

    Raises:
        UsageError: naming the flag.
    """
    check_ranges(args)
    if getattr(args, "max_image_pixels", None):
        from util.data import images  # here: PIL and NumPy need not load for --help

        images.set_max_image_pixels(args.max_image_pixels)
    if hasattr(args, "stretch"):
        from util.data import images

        images.set_stretch(args.stretch)
    if hasattr(args, "mean") and hasattr(args, "in_chans"):
        resolve_band_args(args)


def check_common_args(args: argparse.Namespace) -> None:
    """Refuse flag values that cannot work, naming the flag (``check_data_args``, then the training flags)."""
    check_data_args(args)
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
