"""The command line: flag groups, ``--config file.yaml`` as the default layer (as timm's train.py does), the range of
every numeric flag, and the small typed configs the flags become (``Bands``, ``Schedule``, ``Loading``).

A leaf module: it imports no torch and nothing of the project but its error classes, so that ``--help`` and flag
errors answer before torch, timm and matplotlib load. Parsed flags are read-only (``Flags``): an entry script turns
them into what it needs once, and values derived from them (the learning rate of the linear scaling rule, statistics
read from ``--band_stats``, the checkpoint's input size) live in those configs or in the run's record
(``run_record``), never in the flags.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from util.errors import ReportableError, UsageError, first_line

STATS_TOOL = "tools/band_stats.py"

# Values --help shows (choices, default paths, normalisation statistics).
DATASET_TYPES = ("auto", "fmow_rgb", "csv", "imagefolder", "folder", "coco", "packed", "shards")
REPO = Path(__file__).resolve().parent.parent
DEFAULT_TRAIN_CSV = REPO / "data" / "sentinel2_rgb" / "train.csv"
DEFAULT_VAL_CSV = DEFAULT_TRAIN_CSV.with_name("val.csv")
SAMPLES = (DEFAULT_TRAIN_CSV.parent, REPO / "data" / "sentinel2_ms")  # the embedded samples (tools/make_sample_data.py)
# Each embedded training set and the evaluation set that goes with it: the default --test_path for it, and only for it.
SAMPLE_SPLITS = {"train.csv": "val.csv", "seg_train.csv": "seg_val.csv"}
SPLIT = "split"  # --test_path split: a seeded --val_fraction of --train_path

FMOW_RGB_MEAN = (0.43392888, 0.43578541, 0.40744025)
FMOW_RGB_STD = (0.19828456, 0.19250111, 0.19454683)

# Images declaring more pixels are refused (``--max_image_pixels``): a tiny PNG can declare 10^10 pixels and
# exhaust memory when decoded. The default admits a full Sentinel-2 tile (10980^2 ~ 120 Mpx).
MAX_IMAGE_PIXELS = 250_000_000
# What decoding a file may allocate, per pixel of --max_image_pixels: an 8-bit RGBA pixel (1 GB by default). A raster's
# decoding takes bands x pixels x (bytes per sample + 4): the file's samples and their float32 copy.
DECODED_BYTES_PER_PIXEL = 4

KNN_SCALE_MODES = ("resize", "native")
KNN_POOLS = ("cls", "mean")
DEFAULT_INPUT_SIZE = 224  # classification's --input_size when neither given nor taken from a checkpoint
SEGMENTATION_SAMPLE = DEFAULT_TRAIN_CSV.parent  # seg_train.csv, seg_val.csv, seg_palette.json of the embedded sample
IGNORE_INDEX = 255  # mask value left out of loss and metrics (mmsegmentation's and torchgeo's default)
# RGB masks: off-palette pixels tolerated per mask (a few stray pixels of a careless export); a one-unit typo in a
# palette colour, a colour-managed or resampled export, or a foreign patch exceeds it (torchgeo#1727)
OFF_PALETTE_TOLERANCE = 0.001
# Location blocks of the bootstrap (``util.eval.location_blocks``): the embedded sample's tiles are ``r{row}_c{col}``
# in blocks of 3 x 3 tiles; 2000 resamples.
TILE_PATTERN = r"r(?P<row>\d+)_c(?P<col>\d+)"
BLOCK_TILES = 3
BOOTSTRAP = 2000


def repository_relative(path: str) -> str | None:
    """``path`` relative to the repository (POSIX), or None where it is not an absolute path inside it.

    Its folder is resolved (symbolic links, ``..``) before it is compared, as ``REPO`` is: a clone reached through a
    link is inside, ``REPO/output/../../x`` is not, and two files never share an answer. The file's own name is kept
    (a linked checkpoint keeps its name)."""
    if not os.path.isabs(path):
        return None
    name = Path(path).name
    real = Path(path).resolve() if name in ("", "..") else Path(path).parent.resolve() / name
    try:
        return real.relative_to(REPO).as_posix()
    except ValueError:
        return None


def shown_path(value: Any) -> Any:
    """A default as ``--help`` shows it: a path inside the repository as ``the repository's data/...`` (the same on
    every clone; the flag's value stays absolute, so it resolves from any folder), anything else as it is."""
    if isinstance(value, list):
        return " ".join(str(shown_path(item)) for item in value)
    if isinstance(value, str) and (inside := repository_relative(value)) is not None:
        return f"the repository's {inside}"
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with every flag's default, once: not added where the help text already says what the default is
    (``default:`` or ``(default``); repository paths shown relative to it (``shown_path``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default:" in text or "(default" in text or "%(default)" in text:
            return text
        if action.required or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, argparse._StoreFalseAction):  # the other side of a pair (--cls_token): its default
            return text  # is the pair's, shown once by the other flag
        shown = str(shown_path(action.default)).replace("%", "%%")
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that keeps every flag it defines, in groups or not (``flags``: destination -> action), so
    that ``--config`` values are checked against them; ``--help`` shows the defaults (``HelpFormatter``)."""

    def __init__(self, description: str) -> None:
        self.flags: dict[str, argparse.Action] = {}
        self.groups_keep_flags = False  # argparse's own groups (positionals, options), made by __init__, stay plain
        super().__init__(description=description, formatter_class=HelpFormatter)
        self.groups_keep_flags = True

    def add_argument(self, *names: str, **options: Any) -> argparse.Action:
        action = super().add_argument(*names, **options)
        self.flags.setdefault(action.dest, action)
        return action

    def add_argument_group(self, *args: Any, **kwargs: Any) -> Any:
        group = super().add_argument_group(*args, **kwargs)
        return FlagGroup(self, group) if self.groups_keep_flags else group


class FlagGroup:
    """A group of ``Parser`` whose flags the parser keeps too."""

    def __init__(self, parser: Parser, group: Any) -> None:
        self.parser, self.group = parser, group

    def add_argument(self, *names: str, **options: Any) -> argparse.Action:
        action = self.group.add_argument(*names, **options)
        self.parser.flags.setdefault(action.dest, action)
        return action


def new_parser(description: str) -> Parser:
    """A ``Parser`` whose ``--help`` shows the defaults."""
    return Parser(description)


def summary(docstring: str) -> str:
    """The first paragraph of a script's docstring on one line: its ``--help`` description (a first line alone can
    stop mid-sentence)."""
    return " ".join(docstring.split("\n\n")[0].split())


class Flags(argparse.Namespace):
    """Parsed flags, read-only once parsed: assigning to one raises ``AttributeError``. Derived values go into the
    configs an entry script builds from the flags (``resolve_bands``, ``training_schedule``, ``loading``) or into the
    run's record (``run_record``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_parsed"):
            raise AttributeError(f"flags are read-only once parsed (--{name}): derive values outside them")
        super().__setattr__(name, value)

    def freeze(self) -> Flags:
        object.__setattr__(self, "_parsed", True)
        return self

    def as_dict(self) -> dict[str, Any]:
        """Every flag and its value (``vars`` without the read-only marker)."""
        return {name: value for name, value in vars(self).items() if not name.startswith("_")}


def flags(**values: Any) -> Flags:
    """Read-only ``Flags`` holding ``values`` (what parsing would give; for tools and tests)."""
    parsed = Flags()
    for name, value in values.items():
        setattr(parsed, name, value)
    return parsed.freeze()


def parse_args(parser: Parser, argv: Sequence[str] | None = None) -> Flags:
    """Parse ``argv`` into read-only ``Flags``; values of ``--config FILE`` become defaults, so flags on the command
    line win.

    Bad configuration exits with status 1 and one line ``error: --config FILE: …`` naming the file and the key.
    """
    parser.add_argument(
        "--config",
        default=None,
        help="YAML file of flag values (command-line flags win; a run's config.yaml reproduces it)",
    )
    known, _ = parser.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise SystemExit(f"error: --config {path.absolute()}: cannot read ({first_line(e)})") from None
        if not isinstance(values, dict):
            raise SystemExit(f"error: --config {path}: expected a mapping of flag names to values")
        actions = {dest: action for dest, action in parser.flags.items() if dest not in ("help", "config")}
        unknown = sorted(set(values) - set(actions))
        if unknown:
            raise SystemExit(f"error: --config {path}: unknown key(s) {', '.join(map(str, unknown))}")
        for key, value in values.items():
            try:
                values[key] = config_value(actions[key], value)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                raise SystemExit(f"error: --config {path}: {key}: {first_line(e)}") from None
        parser.set_defaults(**values)
    return parser.parse_args(argv, namespace=Flags()).freeze()


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
            raise ValueError(
                "expected a list"
                + (f" of {action.nargs} values" if isinstance(action.nargs, int) else "")
                + f", got {value!r}"
            )
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
            raise ValueError(
                f"{item!r} is not a valid {getattr(convert, '__name__', 'value')} ({first_line(e)})"
            ) from None
        if action.choices is not None and item not in action.choices:
            raise ValueError(f"{item!r} is not one of {', '.join(map(str, action.choices))}")
        converted.append(item)
    return converted if many else converted[0]


def save_config(flags: Flags, path: Path) -> None:
    """Write the flags as given (``--lr`` None where the linear scaling rule derives it) as YAML; ``--config`` of this
    file reproduces the run."""
    values = {name: value for name, value in flags.as_dict().items() if name != "config"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))


def run_record(flags: Flags, **derived: Any) -> dict[str, Any]:
    """What a checkpoint records of its run (its ``args``): every flag as given, then the values derived from them
    (``lr``: the learning rate used, ``lr_given``: ``--lr`` as given; ``world_size``; ``mean`` / ``std`` as read from
    ``--band_stats``; ...), plain types only. ``--eval`` and ``--resume`` compare the next run's record with it."""
    record = {**flags.as_dict(), **derived}
    return {
        name: list(value) if isinstance(value, tuple) else value
        for name, value in record.items()
        if isinstance(value, (int, float, str, bool, list, tuple, type(None)))
    }


def add_optimisation_args(parser: Parser, **defaults: float) -> None:
    """Batch, schedule and optimiser flags; ``defaults`` gives each script's upstream values."""
    group = parser.add_argument_group("optimisation")
    group.add_argument(
        "--batch_size",
        type=int,
        default=defaults["batch_size"],
        help="images per device per step (effective batch: x --accum_iter x GPUs)",
    )
    group.add_argument(
        "--epochs", type=int, default=defaults["epochs"], help="epochs of the whole run (a resume continues to it)"
    )
    group.add_argument("--accum_iter", type=int, default=1, help="steps accumulated per optimiser update")
    group.add_argument(
        "--lr", type=float, default=None, help="absolute learning rate (default: --blr x effective batch / 256)"
    )
    group.add_argument("--blr", type=float, default=defaults["blr"], help="base learning rate per 256 images")
    group.add_argument(
        "--min_lr", type=float, default=defaults["min_lr"], help="learning rate at the end of the cosine schedule"
    )
    group.add_argument(
        "--warmup_epochs",
        type=float,
        default=defaults["warmup_epochs"],
        help="epochs of linear LR warm-up (fractions allowed)",
    )
    group.add_argument("--weight_decay", type=float, default=defaults["weight_decay"], help="AdamW / LARS weight decay")
    group.add_argument(
        "--clip_grad", type=float, default=None, help="clip the gradient norm to this value (default: no clipping)"
    )


def add_band_args(group: FlagGroup) -> None:
    """The flags of how image files become model inputs, for every entry point that reads images (``resolve_bands``):
    --in_chans, --mean, --std, --bands, --band_stats, --nodata, --rgb_bands, --checkpoint_rgb_bands, --stretch,
    --max_image_pixels."""
    group.add_argument("--in_chans", type=int, default=3, help="input channels")
    group.add_argument(
        "--mean",
        type=float,
        nargs="+",
        default=list(FMOW_RGB_MEAN),
        help="normalisation mean, one per band (8-bit RGB: fMoW-RGB in [0, 1]; multispectral: in the file's units)",
    )
    group.add_argument(
        "--std", type=float, nargs="+", default=list(FMOW_RGB_STD), help="normalisation std, one per band"
    )
    group.add_argument(
        "--bands",
        type=int,
        nargs="+",
        default=None,
        metavar="I",
        help="0-based band indices to read, in order (multispectral; with --stretch: the 3 bands shown as R G B; "
        "default: all)",
    )
    group.add_argument(
        "--band_stats",
        default=None,
        metavar="FILE.json",
        help=f"per-band mean / std written by {STATS_TOOL} (multispectral and 16-bit data)",
    )
    group.add_argument(
        "--nodata",
        type=float,
        default=None,
        help="no-data value (default: a TIFF's GDAL_NODATA tag); such pixels are filled with the band mean",
    )
    group.add_argument(
        "--rgb_bands",
        type=int,
        nargs="+",
        default=None,
        metavar="I",
        help="bands (indices into the bands read) shown as R G B in figures (default: the first three; "
        "one band: grey); loading RGB weights into a model of more bands: the bands that get the RGB "
        "filters (the others start at zero)",
    )
    group.add_argument(
        "--checkpoint_rgb_bands",
        type=int,
        nargs=3,
        default=None,
        metavar="I",
        help="loading multispectral weights into a 3-band (RGB) model: the checkpoint's bands whose "
        "filters become R G B (the others are dropped)",
    )
    group.add_argument(
        "--stretch",
        action="store_true",
        help="8-bit RGB path: stretch 16-bit / float images from their 1st to 99th percentile per band "
        "(default: refuse them: give --band_stats instead); files of more than 3 bands need --bands (R G B)",
    )
    group.add_argument(
        "--max_image_pixels",
        type=float,
        default=float(MAX_IMAGE_PIXELS),
        help="refuse images declaring more pixels, or whose decoding would take more than 4 bytes per pixel of "
        "this (bands x pixels x (bytes per sample + 4): decompression bombs); the default (1 GB) admits a full "
        "8-bit RGB or single-band Sentinel-2 tile (~120 Mpx)",
    )


def add_data_args(
    parser: Parser,
    input_size: int | None,
    train_path: str | None,
    patch_size: int | None = 16,
    train_help: str = "CSV file (fMoW format), ImageFolder tree or image folder",
    input_help: str = "image side in pixels",
) -> FlagGroup:
    """The data flags of the image-level tasks (pretraining, classification, kNN); returns the group."""
    group = parser.add_argument_group("data")
    group.add_argument("--train_path", default=train_path, help=train_help)
    group.add_argument("--dataset_type", default="auto", choices=DATASET_TYPES, help="auto detects from --train_path")
    group.add_argument(
        "--input_size",
        type=int,
        default=input_size,
        help=input_help
        + ("" if input_size or "default" in input_help else " (default: that of the pretrained weights)"),
    )
    group.add_argument(
        "--patch_size",
        type=int,
        default=patch_size,
        help="patch side in pixels" + ("" if patch_size else " (default: that of the pretrained weights)"),
    )
    add_band_args(group)
    group.add_argument(
        "--skip_bad_images",
        action="store_true",
        help="skip unreadable images (each reported with a warning) instead of stopping",
    )
    add_loader_args(group)
    return group


def add_evaluation_set_args(group: FlagGroup, what: str = "evaluation data (CSV, ImageFolder)") -> None:
    """--test_path and --val_fraction of fine-tuning, linear probing and kNN: an evaluation set, or a seeded split
    of --train_path (``evaluation_path``; ``util.data.datasets.held_out``)."""
    group.add_argument(
        "--test_path",
        default=None,
        help=f"{what}; '{SPLIT}': a seeded --val_fraction of --train_path (--seed), the rest trains (default: the "
        "embedded sample's val.csv when --train_path is its train.csv; other training data needs --test_path)",
    )
    group.add_argument(
        "--val_fraction", type=float, default=0.2, help=f"share of --train_path held out with --test_path {SPLIT}"
    )


def evaluation_path(train_path: str | None, given: str | None, split: bool = True) -> str:
    """The evaluation set: ``given`` (--test_path), else the one that goes with an embedded sample's training set
    (``SAMPLE_SPLITS``: its val.csv), never the sample's for other training data.

    Args:
        split: Whether the task can hold out a part of --train_path instead (classification, kNN: ``SPLIT``).

    Raises:
        UsageError: no ``given`` and ``train_path`` is not an embedded sample's training set; ``SPLIT`` given where
            ``split`` is False.
    """
    if given == SPLIT and not split:
        raise UsageError(f"--test_path {SPLIT}: this task cannot split --train_path; give its evaluation set")
    if given is not None:
        return given
    train = Path(train_path).absolute() if train_path else None
    if train is not None:
        for sample in SAMPLES:
            for train_name, test_name in SAMPLE_SPLITS.items():
                if train.parent.resolve() == sample.resolve() and train.name == train_name:
                    return str(sample / test_name)
    asked = f"give the evaluation set of --train_path {train} (--test_path PATH)"
    if split:
        asked += f", or --test_path {SPLIT} to hold out a seeded --val_fraction of it"
    raise UsageError(f"--test_path missing: {asked}")


def check_paths(flags: Flags, *names: str) -> None:
    """Refuse input paths that do not exist, before torch loads: each flag of ``names`` that is set, but for the
    words that are no path (--resume auto, --test_path split, --checkpoints none, --palette isprs / none).

    Raises:
        UsageError: ``--flag PATH: no such file or folder``, PATH absolute (as resolved from this folder).
    """
    words = {"resume": ("auto",), "test_path": (SPLIT,), "checkpoints": ("none",), "palette": ("isprs", "none")}
    for name in names:
        value = getattr(flags, name, None)
        for item in value if isinstance(value, list) else [value]:
            if item in (None, "") or item in words.get(name, ()):
                continue
            if not Path(item).exists():
                raise UsageError(f"--{name} {Path(item).absolute()}: no such file or folder")


def check_or_exit(check: Callable[[Flags], Any], flags: Flags) -> None:
    """Run an entry script's torch-free ``check(flags)`` from its command line, before torch loads: an error exits
    with its one line ``error: ...`` and status 1, as ``util.run.process.run_entry_point`` (which imports torch, and
    runs the checks again inside the script's ``main``) would."""
    try:
        check(flags)
    except ReportableError as e:
        raise SystemExit(f"error: {first_line(e)}") from None


def check_classification_paths(flags: Flags) -> None:
    """Fine-tuning and linear probing: the input paths exist (``check_paths``; --eval reads --train_path only to
    split it) and the evaluation set is known (``evaluation_path``), before torch loads.

    Raises:
        UsageError: one line naming the flag and the absolute path.
    """
    if not flags.eval:
        check_paths(flags, "train_path")
    check_paths(flags, "test_path", "finetune", "resume", "band_stats")
    if evaluation_path(flags.train_path, flags.test_path) == SPLIT:  # --eval reads the training set only to split it
        check_paths(flags, "train_path")


def note_upstream_defaults(flags: Flags, defaults: dict[str, Any], launcher: str) -> str | None:
    """Print (rank 0) and return a start-up note where a script runs an embedded sample with upstream's paper
    defaults (``defaults``: flag -> value, e.g. ``input_size`` 224, ``batch_size`` 512), which the sample's 180 tiles
    of 64-128 px do not suit, naming the launcher that runs the sample with its own. None (nothing printed) where
    the data is not a sample or no such default is in use."""
    train = Path(flags.train_path).absolute() if flags.train_path else None
    if getattr(flags, "eval", False) or train is None:  # --eval trains nothing
        return None
    if not any(train.parent.resolve() == sample.resolve() for sample in SAMPLES):
        return None
    kept = [f"--{name} {value:g}" for name, value in defaults.items() if getattr(flags, name, None) == value]
    if not kept:
        return None
    note = (
        f"note: {' '.join(kept)}: upstream's paper defaults (fMoW-RGB) on the small embedded sample; "
        f"`{launcher}` runs the sample with its own settings (the top of the launcher)"
    )
    if os.environ.get("RANK", "0") == "0":
        print(note, flush=True)
    return note


def add_loader_args(group: FlagGroup) -> None:
    group.add_argument(
        "--num_workers",
        type=int,
        default=None,
        help="DataLoader worker processes per GPU / process (default: the process's share of the CPUs less one, at "
        "least 1, printed with the reason: util/run/threads.py)",
    )
    group.add_argument(
        "--pin_mem", action=argparse.BooleanOptionalAction, default=True, help="pinned host memory (CUDA)"
    )


def add_runtime_args(
    parser: Parser,
    output_dir: str,
    training: bool = True,
    output_help: str = "folder of checkpoints, config.yaml, log.txt, TensorBoard events and figures",
) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--output_dir", default=output_dir, help=output_help)
    group.add_argument("--device", default="auto", help="auto (GPU if any, else CPU), cpu, cuda, cuda:N")
    group.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "bf16", "fp16", "none"),
        help="autocast dtype; auto = bf16 where the device does it natively, else fp32",
    )
    group.add_argument("--seed", type=int, default=0, help="random seed (data order, masks, initialisation)")
    group.add_argument(
        "--dist_timeout", type=float, default=30.0, help="time before a stuck collective ends the job, in minutes"
    )
    if not training:
        return
    group.add_argument("--log_dir", default=None, help="TensorBoard folder (default: --output_dir)")
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument(
        "--attention",
        default="auto",
        choices=("auto", "sdpa", "math"),
        help="auto: scaled_dot_product_attention on GPU, explicit matmul + softmax on CPU (faster there)",
    )
    group.add_argument(
        "--resume", default="", help="checkpoint to continue from, or 'auto' for the newest in --output_dir"
    )
    group.add_argument("--start_epoch", type=int, default=0, help="first epoch (index) when not resuming")
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="start a fresh run in an --output_dir that holds another run's checkpoints (they get replaced)",
    )
    group.add_argument(
        "--allow_changed_flags",
        action="store_true",
        help="resume although --epochs, --batch_size, LR or schedule flags differ from the checkpoint's run",
    )
    group.add_argument(
        "--log_every",
        type=int,
        default=20,
        help="steps between log lines (each epoch also ends with a line: its time, the run's ETA)",
    )


def classification_parser(description: str, *, global_pool: bool, head_init_std: float, **defaults: float) -> Parser:
    """The flags of fine-tuning and linear probing; ``defaults`` are each script's upstream values."""
    parser = new_parser(description)
    add_optimisation_args(parser, **defaults)
    add_data_args(
        parser,
        input_size=None,
        train_path=str(DEFAULT_TRAIN_CSV),
        patch_size=None,
        input_help=f"image side in pixels (default: {DEFAULT_INPUT_SIZE}; with --eval: the checkpoint's)",
    )
    add_runtime_args(parser, output_dir="./output_dir")
    group = parser.add_argument_group("classification")
    group.add_argument(
        "--finetune",
        default="",
        metavar="PATH",
        help="pretrained weights: our or upstream's pretraining checkpoint (either layout), or a timm encoder export",
    )
    group.add_argument(
        "--model",
        default=None,
        help="vit_{tiny,small,base,large,huge}_patch16 or vit_huge_patch14 (default: the architecture of --finetune)",
    )
    add_evaluation_set_args(group)
    group.add_argument(
        "--nb_classes", type=int, default=None, help="number of classes (default: from the training labels)"
    )
    group.add_argument(
        "--global_pool",
        dest="global_pool",
        action="store_true",
        default=global_pool,
        help="mean of the patch tokens + fc_norm",
    )
    group.add_argument("--cls_token", dest="global_pool", action="store_false", help="the cls token after norm")
    group.add_argument(
        "--head_init_std", type=float, default=head_init_std, help="std of the fresh head's initialisation"
    )
    group.add_argument("--eval", action="store_true", help="only evaluate (--resume or --finetune weights) and exit")
    group.add_argument(
        "--save_every", type=int, default=0, help="also keep checkpoint-{epoch}.pth every N epochs (0 = never)"
    )
    group.add_argument("--wandb_project", default=None, help="ignored (upstream flag): logs go to TensorBoard")
    return parser


def add_segmentation_data_args(parser: Parser) -> None:
    """Image / mask pairs, classes and band reading of ``main_segment.py`` and ``tools/seg_baseline.py``."""
    group = parser.add_argument_group("data (image / mask pairs)")
    group.add_argument(
        "--train_path",
        default=str(SEGMENTATION_SAMPLE / "seg_train.csv"),
        help="CSV of (image path, mask path), or a folder holding images/ and masks/ (matched by file stem)",
    )
    group.add_argument(
        "--test_path",
        default=None,
        help="evaluation pairs, as --train_path (default: the embedded sample's seg_val.csv when --train_path is "
        "its seg_train.csv; other training data needs --test_path)",
    )
    group.add_argument(
        "--input_size", type=int, default=128, help="crop side in pixels (training crops, sliding window)"
    )
    add_band_args(group)
    group.add_argument(
        "--palette",
        default=str(SEGMENTATION_SAMPLE / "seg_palette.json"),
        help="class names and colours: 'isprs' (6 classes), a JSON list of {name, color}, or 'none'; "
        "RGB masks are decoded through it, index masks only take its names and colours",
    )
    group.add_argument("--class_names", nargs="+", default=None, help="class names (instead of the palette's)")
    group.add_argument(
        "--nb_classes", type=int, default=None, help="classes (default: from the palette or --class_names)"
    )
    group.add_argument("--reduce_zero_label", action="store_true", help="LoveDA: mask 0 (no data) -> ignore, k -> k-1")
    group.add_argument("--ignore_index", type=int, default=IGNORE_INDEX, help="mask value left out of loss and metrics")
    group.add_argument(
        "--off_palette_tolerance",
        type=float,
        default=OFF_PALETTE_TOLERANCE,
        metavar="FRACTION",
        help="RGB masks: pixels of colours not in --palette count as --ignore_index up to this fraction of a "
        "mask; a mask with more is refused, naming the colours (1: accept any, e.g. ISPRS's black boundary pixels)",
    )
    add_loader_args(group)


def add_segmentation_evaluation_args(parser: Parser) -> None:
    """The evaluation protocol of ``main_segment.py`` and ``tools/seg_baseline.py``: scales, sliding window, classes
    counted, boundary erosion, location blocks."""
    group = parser.add_argument_group("evaluation")
    group.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=[1.0],
        help="final evaluation at each scale: images down-sampled (area) by it and up-sampled back, e.g. 0.125 0.25 "
        "0.5 1.0",
    )
    group.add_argument("--overlap", type=float, default=1 / 3, help="sliding-window overlap, fraction of the crop")
    group.add_argument(
        "--exclude_classes",
        type=int,
        nargs="*",
        default=[],
        help="classes left out of mIoU / mF1 (ISPRS protocol: 5 = clutter)",
    )
    group.add_argument(
        "--eval_ignore_boundary",
        type=int,
        default=0,
        metavar="PX",
        help="evaluation only: ground-truth pixels within PX of another class are not counted (ISPRS's "
        "eroded-boundary reference: 3; 0: every pixel)",
    )
    group.add_argument(
        "--block_pattern",
        default=TILE_PATTERN,
        help="regular expression on each evaluation image's file stem naming its location block (groups "
        "row and col: tiles grouped --block_size per side; other groups: their text; no match: the "
        "image alone; '': every image alone); mIoU intervals resample blocks (util/eval/location_blocks.py)",
    )
    group.add_argument(
        "--block_size", type=int, default=BLOCK_TILES, help="tiles per block side (with groups row, col)"
    )
    group.add_argument(
        "--bootstrap",
        type=int,
        default=BOOTSTRAP,
        help="block-bootstrap resamples of the final evaluation's 95 %% mIoU interval (0: no interval)",
    )
    group.add_argument("--examples", type=int, default=4, help="evaluation images in the prediction figure")


def check_segmentation_evaluation_flags(flags: Flags) -> None:
    """Refuse evaluation flags that cannot work (``add_segmentation_evaluation_args``), naming the flag; the block
    pattern is checked by ``util.eval.location_blocks.compile_pattern``.

    Raises:
        UsageError: one line.
    """
    check_ranges(flags)
    if not 0 <= flags.overlap < 1:
        raise UsageError(f"--overlap must be in [0, 1), got {flags.overlap}")
    if any(not 0 < s <= 1 for s in flags.scales):
        raise UsageError(f"--scales must be in (0, 1], got {flags.scales}")
    if not 0 <= flags.ignore_index <= 255:
        raise UsageError(f"--ignore_index must be in 0..255 (masks are 8-bit), got {flags.ignore_index}")
    if flags.eval_ignore_boundary < 0 or flags.bootstrap < 0:
        raise UsageError("--eval_ignore_boundary and --bootstrap must be >= 0")


def check_segmentation_training_flags(flags: Flags) -> None:
    """Refuse segmentation training flags that cannot work, naming the flag (ranges: ``check_ranges``).

    Raises:
        UsageError: one line.
    """
    check_ranges(flags)
    low, high = flags.crop_scale
    if not 0 < low <= high <= 1:
        raise UsageError(
            f"--crop_scale must satisfy 0 < min <= max <= 1 (area fractions of the image), got {low:g} {high:g}"
        )
    if flags.class_weights is not None and not any(w > 0 for w in flags.class_weights):
        raise UsageError(f"--class_weights: at least one weight must be > 0, got {_numbers(flags.class_weights)}")


def _numbers(values: Sequence[float]) -> str:
    return " ".join(f"{v:g}" for v in values)


# The valid range of every numeric flag of every entry point (absent or None flags are not checked):
# flag -> (lowest, highest, whether the ends are included). NaN and infinity are outside every range.
INF = float("inf")
RANGES = {
    "lr": (0, INF, False),
    "blr": (0, INF, False),
    "min_lr": (0, INF, True),
    "warmup_epochs": (0, INF, True),
    "weight_decay": (0, INF, True),
    "num_workers": (0, INF, True),
    "input_size": (1, INF, True),
    "patch_size": (1, INF, True),
    "in_chans": (1, INF, True),
    "std": (0, INF, False),
    "mean": (-INF, INF, False),
    "seed": (0, 2**32 - 1, True),
    "dist_timeout": (0, INF, False),
    "start_epoch": (0, INF, True),
    "save_every": (0, INF, True),
    "plot_every": (0, INF, True),
    "knn_eval_every": (0, INF, True),
    "log_every": (1, INF, True),
    "epochs": (1, INF, True),
    "accum_iter": (1, INF, True),
    "batch_size": (1, INF, True),
    "temperature": (0, INF, False),
    "head_init_std": (0, INF, True),
    "nb_classes": (1, INF, True),
    "layer_decay": (0, 1, True),
    "drop_path": (0, 1, True),
    "smoothing": (0, 1, True),
    "reprob": (0, 1, True),
    "recount": (0, INF, True),
    "mixup": (0, INF, True),
    "cutmix": (0, INF, True),
    "mixup_prob": (0, 1, True),
    "mixup_switch_prob": (0, 1, True),
    "scale_range": (0, 1, True),
    "val_fraction": (0, 1, False),
    "k": (1, INF, True),
    "majority_k": (1, INF, True),
    "max_image_pixels": (1, INF, True),
    "workers": (1, INF, True),
    "size": (1, INF, True),
    "color_jitter": (0, INF, True),
    "decoder_channels": (1, INF, True),
    "class_weights": (0, INF, True),
    "off_palette_tolerance": (0, 1, True),
    "pixels": (1, INF, True),
    "C": (0, INF, False),
    "max_iter": (1, INF, True),
    "tiles": (1, INF, True),
    "large_size": (1, INF, True),
    "seconds": (0, INF, False),
    "rounds": (1, INF, True),
    "count": (1, INF, True),
    "distinct": (1, INF, True),
}


def describe_range(low: float, high: float, inclusive: bool) -> str:
    if high == INF:
        return (f"at least {low:g}" if inclusive else f"> {low:g}") if low != -INF else "finite"
    return f"in [{low:g}, {high:g}]" if inclusive else f"in ({low:g}, {high:g})"


def check_ranges(values: argparse.Namespace | dict[str, Any]) -> None:
    """Refuse a numeric flag outside its range in ``RANGES`` (the one table every entry point and tool checks);
    flags that are absent, None or not numbers are not checked.

    Raises:
        UsageError: ``--flag must be RANGE, got VALUE``.
    """
    values = values if isinstance(values, dict) else vars(values)
    for flag, value in values.items():
        if flag not in RANGES or value is None or isinstance(value, (str, bool)):
            continue
        low, high, inclusive = RANGES[flag]
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(item, (int, float)):
                continue
            inside = (low <= item <= high) if inclusive else (low < item < high)
            if not inside or item != item or abs(item) == INF:  # inf: --max_image_pixels inf, --class_weights inf
                shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
                allowed = describe_range(low, high, inclusive)
                allowed = f"finite and {allowed}" if abs(item) == INF and allowed != "finite" else allowed
                raise UsageError(f"--{flag} must be {allowed}, got {shown}")


def same_value(a: Any, b: Any) -> bool:
    """``a == b``, with NaN equal to NaN (``--nodata nan``)."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


@dataclass(frozen=True)
class Bands:
    """How image files become model inputs (the flags of ``add_band_args``, resolved by ``resolve_bands``).

    Attributes:
        in_chans: Bands per image after ``bands``.
        mean, std: Normalisation per band: for 8-bit RGB in [0, 1] units (fMoW-RGB's by default), else in the
            file's units (from ``--band_stats`` or given).
        bands: 0-based band indices read from each file, in order (None: all).
        nodata: The no-data value given (None: a TIFF's GDAL_NODATA tag, if any).
        band_stats: The statistics file, if any; ``stats_dtype`` / ``stats_nodata``: the sample type and the
            ``--nodata`` it was computed with, where it records them (None: not recorded, or no ``--nodata``).
        rgb_bands, checkpoint_rgb_bands: ``--rgb_bands`` / ``--checkpoint_rgb_bands``.
        stretch: ``--stretch``: the 8-bit RGB path stretches 16-bit / float images instead of refusing them.
        max_pixels: ``--max_image_pixels``: images declaring more pixels are refused.
    """

    in_chans: int = 3
    mean: tuple[float, ...] = FMOW_RGB_MEAN
    std: tuple[float, ...] = FMOW_RGB_STD
    bands: tuple[int, ...] | None = None
    nodata: float | None = None
    band_stats: str | None = None
    stats_dtype: str | None = None
    stats_nodata: float | None = None
    rgb_bands: tuple[int, ...] | None = None
    checkpoint_rgb_bands: tuple[int, ...] | None = None
    stretch: bool = False
    max_pixels: int = MAX_IMAGE_PIXELS

    @property
    def raster(self) -> bool:
        """Whether files go through ``images.read_raster`` (any band count, the file's units) rather than the 8-bit
        RGB path: --in_chans other than 3, or any of --band_stats, --nodata, --bands (with --stretch, --bands
        chooses the three bands the 8-bit path stretches to R G B)."""
        return (
            self.in_chans != 3
            or (bool(self.bands) and not self.stretch)
            or bool(self.band_stats)
            or self.nodata is not None
        )

    def record(self) -> dict[str, Any]:
        """What a checkpoint records of them (``run_record``), and ``--eval`` / ``--resume`` compare."""
        return {
            "in_chans": self.in_chans,
            "bands": list(self.bands) if self.bands else None,
            "mean": list(self.mean),
            "std": list(self.std),
            "nodata": self.nodata,
            "raster": self.raster,
        }


def resolve_bands(flags: Flags) -> Bands:
    """The ``Bands`` of an entry point's band flags: --bands / --mean / --std / --band_stats / --rgb_bands checked
    against --in_chans, statistics read from --band_stats.

    Raises:
        UsageError: one line naming the flag (and the statistics tool where statistics are missing).
    """
    count, bands = flags.in_chans, tuple(flags.bands) if flags.bands else None
    if bands and len(bands) != count:
        raise UsageError(f"--bands names {len(bands)} band(s) but --in_chans is {count}")
    if bands and min(bands) < 0:
        raise UsageError(f"--bands are 0-based indices, got {' '.join(map(str, bands))}")
    mean, std = tuple(flags.mean), tuple(flags.std)
    default = mean == FMOW_RGB_MEAN and std == FMOW_RGB_STD
    source: dict[str, Any] = {}
    if flags.band_stats:
        if not default:
            raise UsageError("--band_stats and --mean / --std both give statistics: give one of them")
        mean, std = (tuple(v) for v in read_band_stats(flags.band_stats, list(bands) if bands else None, count))
        source = band_stats_source(flags.band_stats)
        given = source.get("nodata", ...)  # ...: an older file, which does not say; then checked per file
        if given is not ... and flags.nodata is not None and not same_value(given, flags.nodata):
            raise UsageError(
                f"--band_stats {flags.band_stats} was computed with "
                + (f"--nodata {given:g}" if given is not None else "no --nodata (the files' GDAL_NODATA tags, if any)")
                + f", this run has --nodata {flags.nodata:g}: give the same no-data value (statistics and "
                "inputs would count other pixels as data)"
            )
    resolved = Bands(
        count,
        mean,
        std,
        bands,
        flags.nodata,
        flags.band_stats,
        source.get("dtype"),
        source.get("nodata"),
        tuple(flags.rgb_bands) if flags.rgb_bands else None,
        tuple(flags.checkpoint_rgb_bands) if flags.checkpoint_rgb_bands else None,
        flags.stretch,
        int(flags.max_image_pixels),
    )
    if resolved.raster and default and not flags.band_stats:
        if count == 3 and not (bands and not flags.stretch) and flags.nodata is not None:
            raise UsageError(
                f"--nodata {flags.nodata:g} reads the files as rasters (values in the file's units, 0..255 for 8-bit "
                f"data), which needs per-band statistics in those units: run {STATS_TOOL} --nodata "
                f"{flags.nodata:g} on the training data and pass --band_stats FILE.json (or --mean / --std in the "
                "file's units); the 8-bit RGB path has no no-data handling"
            )
        raise UsageError(
            f"{count}-band / non-8-bit data needs per-band statistics: run {STATS_TOOL} on the training data "
            "and pass --band_stats FILE.json (or --mean / --std, one per band, in the file's units)"
        )
    for flag, values in (("mean", mean), ("std", std)):
        if len(values) != count:
            raise UsageError(f"--{flag} has {len(values)} value(s) but --in_chans is {count}: one per band")
    check_normalisation(mean, std, f"--band_stats {flags.band_stats}" if flags.band_stats else "--std", bands)
    rgb = flags.rgb_bands
    if rgb is not None and (len(rgb) not in (1, 3) or not all(0 <= b < count for b in rgb)):
        raise UsageError(
            f"--rgb_bands needs 1 or 3 indices in 0..{count - 1} (of the bands read), got {' '.join(map(str, rgb))}"
        )
    return resolved


# The smallest std, relative to the band's mean, that normalisation may divide by: below it the "spread" is float
# rounding of a constant band (float32 resolves 6e-8 of a value), and normalised inputs become rounding noise
# magnified by 1e7 or more (a std of 1e-30 overflows the network's activations). Absolute floor where the mean is 0.
MIN_RELATIVE_STD = 1e-6
MIN_STD = 1e-12
FLOAT32_MAX = 3.4028234663852886e38  # inputs are normalised in float32: a larger mean or std becomes inf there


def check_normalisation(
    mean: Sequence[float], std: Sequence[float], source: str, bands: Sequence[int] | None = None
) -> None:
    """Refuse per-band statistics that cannot normalise: a std within rounding of 0 for its mean (a constant band), a
    mean or std beyond float32's range (inf in float32: every input would become 0 or NaN).

    Raises:
        UsageError: naming ``source`` (the flag), the band (its index in the file: ``bands``), its mean and std.
    """
    for band, m, s in zip(bands or range(len(mean)), mean, std):
        if max(abs(m), s) > FLOAT32_MAX:
            raise UsageError(
                f"{source}: band {band} has mean {m:g}, std {s:g}: beyond float32's range ({FLOAT32_MAX:.1e}), in "
                "which inputs are normalised"
            )
        if s < max(MIN_RELATIVE_STD * abs(m), MIN_STD):
            raise UsageError(
                f"{source}: band {band} has std {s:g} (mean {m:g}): too small to normalise by (a constant band? its "
                f"values would be multiplied by {1 / s:.0e}); leave the band out with --bands, or give --mean / --std"
            )


def band_stats_source(path: str) -> dict[str, Any]:
    """What a ``tools/band_stats.py`` file says of the data it was computed on: ``dtype`` (sample type) and ``nodata``
    (the --nodata given to it, or None), where it records them ({} if unreadable: ``read_band_stats`` reports that)."""
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
    try:
        stats = json.loads(Path(path).read_text())
        mean, std = [float(v) for v in stats["mean"]], [float(v) for v in stats["std"]]
        have = [int(b) for b in stats.get("bands", range(len(mean)))]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(
            f"--band_stats {path}: not a {STATS_TOOL} file ({type(e).__name__}: {first_line(e)})"
        ) from None
    if not len(have) == len(mean) == len(std) or len(set(have)) != len(have):
        raise UsageError(
            f"--band_stats {path}: bands {' '.join(map(str, have))} (each once) need as many means and stds, "
            f"found {len(mean)} and {len(std)}"
        )
    if bands:
        missing = [b for b in bands if b not in have]
        if missing:
            raise UsageError(
                f"--band_stats {path}: no statistics for band(s) {' '.join(map(str, missing))} "
                f"(it has {' '.join(map(str, have))})"
            )
        mean, std = [mean[have.index(b)] for b in bands], [std[have.index(b)] for b in bands]
    if len(mean) != count or len(std) != count:
        raise UsageError(f"--band_stats {path}: {len(mean)} band(s) of statistics but --in_chans is {count}")
    if not all(s > 0 and s != INF for s in std) or not all(abs(m) != INF and m == m for m in mean):
        raise UsageError(
            f"--band_stats {path}: mean must be finite and std finite and > 0 in every band, got mean {mean}, std {std}"
        )
    return mean, std


@dataclass(frozen=True)
class Schedule:
    """The training schedule of a run (``training_schedule``).

    Attributes:
        epochs: Epochs of the whole run.
        batch_size: Images per device per step.
        accum_iter: Steps accumulated per optimiser update.
        lr: Peak learning rate: ``--lr``, or ``--blr`` x effective batch / 256 (the linear scaling rule of MAE,
            Goyal et al. 2017).
        min_lr: Learning rate at the end of the cosine.
        warmup_epochs: Epochs of linear warm-up (fractions allowed).
        clip_grad: Gradient-norm clipping (None: none).
        log_every: Steps between log lines.
    """

    epochs: int
    batch_size: int
    accum_iter: int
    lr: float
    min_lr: float
    warmup_epochs: float
    clip_grad: float | None = None
    log_every: int = 20


def training_schedule(flags: Flags, world_size: int) -> Schedule:
    """The ``Schedule`` of the optimisation flags for ``world_size`` processes."""
    lr = flags.lr if flags.lr is not None else flags.blr * flags.batch_size * flags.accum_iter * world_size / 256
    return Schedule(
        flags.epochs,
        flags.batch_size,
        flags.accum_iter,
        lr,
        flags.min_lr,
        flags.warmup_epochs,
        flags.clip_grad,
        flags.log_every,
    )


@dataclass(frozen=True)
class Loading:
    """How a DataLoader feeds this process: images per batch, worker processes, pinned memory, the data-order seed."""

    batch_size: int
    num_workers: int | None = 0  # None: the process's share of the CPUs (util.data.loaders.worker_count)
    pin_mem: bool = True
    seed: int = 0


def loading(flags: Flags, batch_size: int | None = None) -> Loading:
    """The ``Loading`` of --batch_size (or ``batch_size``), --num_workers, --pin_mem and --seed."""
    return Loading(batch_size or flags.batch_size, flags.num_workers, flags.pin_mem, flags.seed)


def check_training_flags(flags: Flags) -> None:
    """Refuse training flags that cannot work, naming the flag (ranges: ``check_ranges``).

    Raises:
        UsageError: one line.
    """
    check_ranges(flags)
    if flags.patch_size and flags.input_size and flags.input_size % flags.patch_size:
        raise UsageError(f"--input_size {flags.input_size} is not divisible by --patch_size {flags.patch_size}")
    if getattr(flags, "start_epoch", 0) >= flags.epochs and not getattr(flags, "resume", ""):
        raise UsageError(f"--start_epoch {flags.start_epoch} is not below --epochs {flags.epochs}: nothing to train")
    if flags.clip_grad is not None and not flags.clip_grad > 0:  # also NaN; a negative norm would reverse the gradient
        raise UsageError(f"--clip_grad must be > 0 (or left out: no clipping), got {flags.clip_grad}")
