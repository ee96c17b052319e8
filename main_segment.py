"""Semantic segmentation with a pretrained Cross-Scale MAE encoder: UperNet (MAE / BEiT recipe) or a per-patch
linear probe, fine-tuned or on a frozen encoder; mIoU, mF1 and overall accuracy with sliding-window inference,
and mIoU against the resolution of the evaluation images.

    python main_segment.py --finetune output/pretrain_tiny/checkpoint-last.pth          # the embedded sample
    python main_segment.py --finetune weights/cross_scale_mae_base_pretrain.pth --palette isprs --input_size 512 \
        --train_path potsdam/train --test_path potsdam/val --exclude_classes 5          # ISPRS, clutter left out of the means
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2

import engine_finetune
import engine_segment
from model_loading import build_segmenter
from util import config
from util.data import loaders, raster_options, segmentation
from util.eval import figures, location_blocks
from util.run import checkpoint, distributed, logger, loop, process, schedule
from util.weights import layouts
from util.errors import CheckpointError, UsageError
from util.run.process import run_entry_point

SAMPLE = Path(__file__).resolve().parent / "data" / "sentinel2_rgb"


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Image / mask pairs, classes and band reading: shared with ``tools/seg_baseline.py``."""
    group = parser.add_argument_group("data (image / mask pairs)")
    group.add_argument("--train_path", default=str(SAMPLE / "seg_train.csv"),
                       help="CSV of (image path, mask path), or a folder holding images/ and masks/ (matched by file stem)")
    group.add_argument("--test_path", default=str(SAMPLE / "seg_val.csv"), help="evaluation pairs, as --train_path")
    group.add_argument("--input_size", type=int, default=128, help="crop side in pixels (training crops, sliding window)")
    config.add_band_args(group)
    group.add_argument("--palette", default=str(SAMPLE / "seg_palette.json"),
                       help="class names and colours: 'isprs' (6 classes), a JSON list of {name, color}, or 'none'; "
                            "RGB masks are decoded through it, index masks only take its names and colours")
    group.add_argument("--class_names", nargs="+", default=None, help="class names (instead of the palette's)")
    group.add_argument("--nb_classes", type=int, default=None, help="classes (default: from the palette or --class_names)")
    group.add_argument("--reduce_zero_label", action="store_true", help="LoveDA: mask 0 (no data) -> ignore, k -> k-1")
    group.add_argument("--ignore_index", type=int, default=segmentation.IGNORE_INDEX, help="mask value left out of loss and metrics")
    group.add_argument("--num_workers", type=int, default=8)
    group.add_argument("--pin_mem", action=argparse.BooleanOptionalAction, default=True, help="pinned host memory (CUDA)")


def add_evaluation_args(parser: argparse.ArgumentParser) -> None:
    """The evaluation protocol: scales, sliding window, classes counted, boundary erosion, location blocks.
    Shared with ``tools/seg_baseline.py``."""
    group = parser.add_argument_group("evaluation")
    group.add_argument("--scales", type=float, nargs="+", default=[1.0],
                       help="final evaluation at each scale: images down-sampled (area) by it and up-sampled back, e.g. 0.125 0.25 0.5 1.0")
    group.add_argument("--overlap", type=float, default=1 / 3, help="sliding-window overlap, fraction of the crop")
    group.add_argument("--exclude_classes", type=int, nargs="*", default=[],
                       help="classes left out of mIoU / mF1 (ISPRS protocol: 5 = clutter)")
    group.add_argument("--eval_ignore_boundary", type=int, default=0, metavar="PX",
                       help="evaluation only: ground-truth pixels within PX of another class are not counted (ISPRS's "
                            "eroded-boundary reference: 3; 0: every pixel)")
    group.add_argument("--block_pattern", default=location_blocks.TILE_PATTERN,
                       help="regular expression on each evaluation image's file stem naming its location block (groups "
                            "row and col: tiles grouped --block_size per side; other groups: their text; no match: the "
                            "image alone; '': every image alone); mIoU intervals resample blocks (util/eval/location_blocks.py)")
    group.add_argument("--block_size", type=int, default=location_blocks.BLOCK_TILES, help="tiles per block side (with groups row, col)")
    group.add_argument("--bootstrap", type=int, default=location_blocks.BOOTSTRAP,
                       help="block-bootstrap resamples of the final evaluation's 95 %% mIoU interval (0: no interval)")
    group.add_argument("--examples", type=int, default=4, help="evaluation images in the prediction figure")


def get_args_parser() -> argparse.ArgumentParser:
    parser = config.new_parser("Cross-Scale MAE semantic segmentation")
    config.add_optimisation_args(parser, batch_size=8, epochs=20, blr=1.6e-3, min_lr=1e-6, warmup_epochs=2, weight_decay=0.05)
    add_data_args(parser)
    group = parser.add_argument_group("augmentation")
    group.add_argument("--crop_scale", type=float, nargs=2, default=[0.25, 1.0], help="RandomResizedCrop area range")
    config.add_runtime_args(parser, output_dir="./output_segment")
    group = parser.add_argument_group("segmentation")
    group.add_argument("--finetune", default="", metavar="PATH",
                       help="pretrained weights: any checkpoint main_finetune.py accepts (ours, upstream's, timm export, classifier)")
    group.add_argument("--model", default=None, help="vit_{tiny,small,base,large,huge}_patch16 (default: the architecture of --finetune)")
    group.add_argument("--patch_size", type=int, default=None, help="patch side (default: that of the pretrained weights)")
    group.add_argument("--head", default="upernet", choices=("upernet", "linear"),
                       help="upernet: 4-level pyramid + UperNet; linear: per-patch linear probe upsampled to pixels")
    group.add_argument("--freeze_encoder", action="store_true", help="train only neck and head (PANGAEA's frozen-encoder protocol)")
    group.add_argument("--decoder_channels", type=int, default=512, help="UperNet width")
    group.add_argument("--layer_decay", type=float, default=0.65, help="layer-wise LR decay (timm)")
    group.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth rate of the encoder")
    group.add_argument("--class_weights", type=float, nargs="+", default=None, help="cross-entropy weight of each class")
    add_evaluation_args(parser)
    group = parser.add_argument_group("run mode")
    group.add_argument("--eval", action="store_true", help="only evaluate the segmenter of --resume (or --finetune) and exit")
    group.add_argument("--save_every", type=int, default=0, help="also keep checkpoint-{epoch}.pth every N epochs")
    return parser


def check_evaluation_args(args: argparse.Namespace) -> None:
    """Refuse evaluation flags that cannot work (``add_evaluation_args``), naming the flag.

    Raises:
        UsageError: one line.
    """
    if not 0 <= args.overlap < 1:
        raise UsageError(f"--overlap must be in [0, 1), got {args.overlap}")
    if any(not 0 < s <= 1 for s in args.scales):
        raise UsageError(f"--scales must be in (0, 1], got {args.scales}")
    if not 0 <= args.ignore_index <= 255:
        raise UsageError(f"--ignore_index must be in 0..255 (masks are 8-bit), got {args.ignore_index}")
    if args.eval_ignore_boundary < 0 or args.bootstrap < 0:
        raise UsageError("--eval_ignore_boundary and --bootstrap must be >= 0")
    location_blocks.block_ids([], args.block_pattern, args.block_size)  # checks the pattern and the size


def check_args(args: argparse.Namespace) -> None:
    config.check_common_args(args)
    check_evaluation_args(args)


def classes_of(args: argparse.Namespace) -> tuple[list[str], segmentation.Palette | None]:
    """Class names (index = class) and the palette, from --palette, --class_names and --nb_classes."""
    palette = None if str(args.palette).lower() in ("", "none") else segmentation.load_palette(args.palette)
    names = list(args.class_names or (palette.names if palette else []))
    if not names and args.nb_classes:
        names = [f"class_{k}" for k in range(args.nb_classes)]
    if args.nb_classes is not None and args.nb_classes != len(names):
        raise UsageError(f"--nb_classes {args.nb_classes}: {len(names)} class names given (palette or --class_names)")
    if len(names) < 2:
        raise UsageError("give the classes: --palette (isprs or JSON), --class_names, or --nb_classes (at least 2)")
    if getattr(args, "class_weights", None) is not None and len(args.class_weights) != len(names):
        raise UsageError(f"--class_weights: {len(args.class_weights)} weights for {len(names)} classes")
    if any(not 0 <= k < len(names) for k in args.exclude_classes):
        raise UsageError(f"--exclude_classes {args.exclude_classes}: classes are 0..{len(names) - 1}")
    return names, palette


def dataset_of(args: argparse.Namespace, path: str, transform, num_classes: int, palette) -> segmentation.SegDataset:
    """The image / mask pairs of ``path`` as ``--in_chans`` / ``--bands`` / ``--nodata`` and the masks' flags say
    (``args.raster``, set by ``config.resolve_band_args``: multispectral / high-bit-depth rasters, else 8-bit RGB)."""
    raster = raster_options.raster_options(args)
    return segmentation.SegDataset(segmentation.find_pairs(path, raster=args.raster), transform, num_classes, palette,
                               args.ignore_index, args.reduce_zero_label, raster)


def datasets_of(args: argparse.Namespace, num_classes: int, palette, train: bool = True):
    """(training set with the joint augmentation or None, evaluation set)."""
    val_set = dataset_of(args, args.test_path, segmentation.eval_transform(args.mean, args.std), num_classes, palette)
    if not train:
        return None, val_set
    transform = segmentation.train_transform(args.input_size, args.mean, args.std, args.ignore_index, tuple(args.crop_scale))
    return dataset_of(args, args.train_path, transform, num_classes, palette), val_set


def evaluation_blocks(val_set, args: argparse.Namespace) -> tuple[list[str], np.ndarray]:
    """The evaluation images' file names and location blocks (``--block_pattern``, ``--block_size``).

    Raises:
        UsageError: a pattern whose row / col groups match no integer.
    """
    names = [Path(image).name for image, _ in val_set.pairs]
    return names, location_blocks.block_ids(names, args.block_pattern, args.block_size)


def bootstrap_resamples(args: argparse.Namespace, image_block: np.ndarray) -> int:
    """``--bootstrap``, or 0 (no interval, with a note) where the images form fewer than 2 location blocks: every
    resample would be the whole set, an interval of width 0 that would claim a certainty the data cannot give."""
    if args.bootstrap and len(np.unique(image_block)) < 2:
        distributed.main_print(f"note: --block_pattern {args.block_pattern!r} (--block_size {args.block_size}) puts the "
                               f"{len(image_block)} evaluation image(s) of {args.test_path} into 1 location block: no "
                               "bootstrap interval (it needs at least 2 blocks)")
        return 0
    return args.bootstrap


def single_image_loader(dataset, args: argparse.Namespace, run: process.Run):
    """Evaluation loader of one image per batch (images may differ in size), sharded over ranks."""
    one = copy.copy(args)
    one.batch_size = 1
    return loaders.eval_loader(dataset, one, run)


def main(args: argparse.Namespace) -> None:
    check_args(args)
    if args.eval:
        evaluate_checkpoint(args)
        return
    class_names, palette = classes_of(args)
    num_classes = args.nb_classes = len(class_names)
    checkpoint.check_output_dir(args)
    run = process.setup_run(args)
    train_set, val_set = datasets_of(args, num_classes, palette)
    evaluation_blocks(val_set, args)  # before training: a pattern that cannot work is found now, not after it

    model, _ = build_segmenter(args, num_classes)
    if distributed.is_distributed() and run.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(run.device)
    schedule.resolve_lr(args, run.world_size)
    optimizer = create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=args.weight_decay, layer_decay=args.layer_decay,
                                    fused=run.device.type == "cuda")
    weight = torch.tensor(args.class_weights, device=run.device) if args.class_weights else None
    cross_entropy = nn.CrossEntropyLoss(weight=weight, ignore_index=args.ignore_index)

    def criterion(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:  # [B, K, H, W], [B, H, W]; fp32 loss
        return cross_entropy(logits.float(), masks)
    scaler = loop.grad_scaler(run)
    start_epoch, start_step, resumed = checkpoint.resume(args, run, model, optimizer, scaler)
    logger.append_log(run, {"run_start": datetime.datetime.now().isoformat(timespec="seconds"),
                            "resumed_from": str(resumed.get("path")) if resumed else None, "start_epoch": start_epoch})
    train_loader, sampler = loaders.train_loader(train_set, args, run)
    val_loader = single_image_loader(val_set, args, run)
    steps_per_epoch = len(train_loader)
    scheduler = schedule.lr_scheduler(optimizer, args, steps_per_epoch)
    best_miou = resumed.get("best_miou", -1.0)
    writer = logger.summary_writer(run, args)
    extra = {"class_names": class_names, "palette": [list(c) for c in palette.colors] if palette else None}
    distributed.main_print(
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters "
        f"({'frozen encoder, ' if args.freeze_encoder else ''}{args.head} head, blocks {list(model.blocks)}), "
        f"{len(train_set)} training / {len(val_set)} evaluation images, {num_classes} classes, {steps_per_epoch} steps/epoch, "
        f"lr {args.lr:.3e}, device {run.device}, autocast {run.amp_dtype or 'off (fp32)'}"
    )
    train_model = loop.distribute(model, run, args, unused=model.unused_parameters)
    evaluation = dict(num_classes=num_classes, crop=args.input_size, overlap=args.overlap, ignore_index=args.ignore_index)
    try:
        for epoch, first_step in loop.epochs(args, sampler, start_epoch, start_step):
            train_stats = engine_finetune.train_one_epoch(train_model, criterion, train_loader, optimizer, scheduler, scaler,
                                                         run, epoch, steps_per_epoch, args, writer, first_step)
            confusions, _ = engine_segment.evaluate(model, val_loader, run, **evaluation)
            row = engine_segment.results_table(confusions, class_names, args.exclude_classes)[0]
            improved = row["mIoU"] > best_miou
            best_miou = max(best_miou, row["mIoU"])
            engine_segment.report([row], len(val_set), f"epoch {epoch}", best_miou)
            checkpoint.save_epoch(run, "checkpoint-last.pth", model, optimizer, scaler, epoch, args, best_miou=best_miou, **extra)
            if improved:
                checkpoint.save_epoch(run, "checkpoint-best.pth", model, optimizer, scaler, epoch, args, best_miou=best_miou, **extra)
            if args.save_every and (epoch + 1) % args.save_every == 0:
                checkpoint.save_epoch(run, f"checkpoint-{epoch}.pth", model, optimizer, scaler, epoch, args, best_miou=best_miou, **extra)
            logger.append_log(run, {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                                    **{f"test_{k}": row[k] for k in ("mIoU", "mF1", "OA")}})
            if writer is not None:
                for name in ("mIoU", "mF1", "OA"):
                    writer.add_scalar(f"test/{name}", row[name], epoch)
    except process.Preempted as stop:
        checkpoint.save_preempted(run, stop, model, optimizer, scaler, args, best_miou=best_miou, **extra)
        return
    if writer is not None:
        writer.close()
    final_evaluation(model, val_set, args, run, class_names, palette, run.output_dir, "last epoch")


def final_evaluation(model: nn.Module, val_set, args: argparse.Namespace, run: process.Run, class_names: list[str],
                     palette, directory: Path, what: str) -> list[dict]:
    """Evaluate at every ``--scales``, with the mIoU's 95 % block-bootstrap interval (``--block_pattern``,
    ``--bootstrap``); rank 0 writes seg_results.csv / .md, seg_confusion.json (per scale: the set's and each
    image's confusion matrix, with the images' names and blocks), mIoU against scale, per-class IoU and the
    prediction figure into ``directory``. Used by ``tools/seg_baseline.py`` too."""
    confusions, examples = engine_segment.evaluate(
        model, single_image_loader(val_set, args, run), run, len(class_names), args.input_size, sorted(args.scales),
        args.overlap, args.ignore_index, keep=args.examples if run.is_main else 0, ignore_boundary=args.eval_ignore_boundary)
    names, image_block = evaluation_blocks(val_set, args)
    resamples = bootstrap_resamples(args, image_block)
    rows = engine_segment.results_table(confusions, class_names, args.exclude_classes, image_block, resamples)
    engine_segment.report(rows, len(val_set), what)
    if run.is_main:
        excluded = ", ".join(class_names[k] for k in args.exclude_classes)
        note = ("IoU in %; means over the classes present in ground truth or predictions"
                + (f", without {excluded}" if excluded else "") + "; n/a: class absent from both"
                + (f"; pixels within {args.eval_ignore_boundary} px of another class not counted" if args.eval_ignore_boundary else "")
                + (f". mIoU_low / mIoU_high: 95 % percentile interval of {resamples} bootstrap resamples of the "
                   f"{len(np.unique(image_block))} location blocks of the {len(names)} images (--block_pattern '"
                   f"{args.block_pattern}', --block_size {args.block_size}; seed 0)" if resamples else "") + ".")
        engine_segment.write_tables(rows, directory, note)
        (directory / "seg_confusion.json").write_text(json.dumps(
            {f"{s:g}": c.sum(0).tolist() for s, c in confusions.items()}
            | {"class_names": class_names, "images": names, "blocks": image_block.tolist(),
               "per_image": {f"{s:g}": c.tolist() for s, c in confusions.items()}}))
        one = next(row for row in rows if row["scale"] == max(args.scales))
        figures.save_per_class_iou(one, class_names, directory / "per_class_iou.png",
                                       f"per-class IoU ({what}, scale {one['scale']:g}): mIoU {one['mIoU']:.1f}%")
        if len(rows) > 1:
            figures.save_miou_vs_scale(rows, directory / "miou_vs_scale.png", what)
        if examples:
            shown = palette if palette is not None and list(palette.names) == class_names else figures.default_palette(class_names)
            figures.save_examples(examples, shown, args.mean, args.std, directory / "seg_examples.png",
                                      f"{what}: mIoU {one['mIoU']:.1f}% at scale {one['scale']:g}", stretch=args.raster,
                                      rgb_bands=args.rgb_bands)
        distributed.main_print(f"segmentation outputs: {directory}")
    return rows


def evaluate_checkpoint(args: argparse.Namespace) -> None:
    """``--eval``: the segmenter a checkpoint of this script holds (``--resume PATH|auto`` or ``--finetune``), at
    every ``--scales``; outputs go to ``--output_dir/eval/``. Head, architecture, crop and classes come from it.

    Raises:
        UsageError: no checkpoint given.
        CheckpointError: not a segmentation checkpoint, or weights that do not fit.
    """
    path, state = checkpoint.checkpoint_to_evaluate(args, "segmenter")
    weights = checkpoint.model_state(state)
    saved = state.get("args") or {}
    if "class_names" not in state or not any(k.startswith("head.") for k in weights):
        raise CheckpointError(f"{path}: not a segmentation checkpoint of main_segment.py (no head / class names)")
    class_names = list(state["class_names"])
    for key in ("head", "decoder_channels", "input_size", "patch_size", "model"):
        if saved.get(key) is not None:
            setattr(args, key, saved[key])
    if saved.get("in_chans", 3) != args.in_chans:
        raise UsageError(f"{path}: the segmenter reads {saved['in_chans']} band(s): give --in_chans {saved['in_chans']} "
                         "and the --bands / --band_stats (or --mean / --std) it was trained with")
    checkpoint.check_band_flags(saved, args, path)
    args.freeze_encoder, args.nb_classes, args.class_names = False, len(class_names), class_names
    if state.get("palette"):
        palette_used = segmentation.Palette(tuple(class_names), tuple(tuple(c) for c in state["palette"]))
    else:
        palette_used = None
    args.output_dir = str(Path(args.output_dir) / "eval")
    run = process.setup_run(args)
    decode = segmentation.load_palette(args.palette) if str(args.palette).lower() not in ("", "none") else palette_used
    if decode is not None and len(decode.colors) != len(class_names):
        decode = palette_used
    _, val_set = datasets_of(args, len(class_names), decode, train=False)
    evaluation_blocks(val_set, args)
    model, _ = build_segmenter(args, len(class_names), layouts.read_encoder(path), load=False)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not fit the segmenter it describes ({str(e).strip().splitlines()[-1].strip()})") from None
    model.to(run.device)
    loop.set_fused_attention(model, loop.use_sdpa(args.attention, run.device))  # the attention path training used
    distributed.main_print(f"eval: the segmenter of {path} ({args.model or 'its encoder'}, {args.head} head, {len(class_names)} classes, "
                           f"crop {args.input_size} px)")
    final_evaluation(model, val_set, args, run, class_names, palette_used or decode, run.output_dir, f"eval of {path.name}")


if __name__ == "__main__":
    run_entry_point(main, config.parse_args(get_args_parser()))
