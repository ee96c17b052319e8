"""Semantic segmentation: the training run (``train_segmenter``), the evaluation of a segmentation checkpoint
(``evaluate_segmenter``) and the final evaluation every segmenter gets, the per-pixel baseline's included
(``final_evaluation``): sliding-window inference at every scale, confusion matrices per image, mIoU with block-bootstrap
intervals, tables and figures."""

from __future__ import annotations

import csv
import datetime
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from model_loading import build_segmenter
from util import config
from util.config import Bands, Flags
from util.data import loaders, segmentation
from util.errors import CheckpointError, NonFiniteOutputError, UsageError
from util.eval import figures, inference, iou, location_blocks
from util.run import checkpoint, distributed, logger, loop, process, schedule
from util.run.distributed import main_print
from util.run.process import Run
from util.weights import layouts


@dataclass(frozen=True)
class Protocol:
    """How segmenters are evaluated (``config.add_segmentation_evaluation_args``; ``protocol``).

    Attributes:
        crop: Sliding-window side in pixels (``--input_size``).
        scales: Evaluation at each scale (images down-sampled by it, then up-sampled back).
        overlap: Sliding-window overlap, fraction of the crop.
        ignore_index: Mask value left out.
        exclude_classes: Classes left out of mIoU / mF1 (ISPRS: clutter).
        ignore_boundary: Ground-truth pixels within this many px of another class are not counted.
        block_pattern, block_size, bootstrap: Location blocks and resamples of the mIoU's interval.
        examples: Images in the prediction figure.
    """

    crop: int
    scales: tuple[float, ...] = (1.0,)
    overlap: float = 1 / 3
    ignore_index: int = config.IGNORE_INDEX
    exclude_classes: tuple[int, ...] = ()
    ignore_boundary: int = 0
    block_pattern: str = config.TILE_PATTERN
    block_size: int = config.BLOCK_TILES
    bootstrap: int = config.BOOTSTRAP
    examples: int = 4


def protocol(flags: Flags, crop: int | None = None) -> Protocol:
    """The ``Protocol`` of the evaluation flags (``crop``: the checkpoint's, for ``--eval``)."""
    return Protocol(
        crop or flags.input_size,
        tuple(sorted(flags.scales)),
        flags.overlap,
        flags.ignore_index,
        tuple(flags.exclude_classes),
        flags.eval_ignore_boundary,
        flags.block_pattern,
        flags.block_size,
        flags.bootstrap,
        flags.examples,
    )


def train_segmenter(flags: Flags, bands: Bands) -> None:
    """The training run of ``main_segment.py``'s flags: data, segmenter (UperNet or linear head around the
    ``--finetune`` encoder), AdamW with layer-wise LR decay, resume, the epochs (each: train, evaluate at scale 1,
    checkpoints), then ``final_evaluation`` at every ``--scales`` into ``--output_dir``.

    Raises:
        UsageError, DataError, CheckpointError: one line naming the flag or file.
    """
    class_names, palette = classes_of(flags)
    num_classes = len(class_names)
    if flags.class_weights is not None and len(flags.class_weights) != num_classes:
        raise UsageError(f"--class_weights: {len(flags.class_weights)} weights for {num_classes} classes")
    checkpoint.check_output_dir(flags.output_dir, flags.resume, flags.overwrite)
    run = process.setup_run(flags.device, flags.amp, flags.seed, flags.output_dir, flags.dist_timeout)
    evaluation = protocol(flags)
    val_set = dataset_of(
        config.evaluation_path(flags.train_path, flags.test_path, split=False),
        segmentation.eval_transform(bands.mean, bands.std),
        bands,
        flags,
        num_classes,
        palette,
        "evaluation",
    )
    train_transform = segmentation.train_transform(
        flags.input_size, bands.mean, bands.std, flags.ignore_index, tuple(flags.crop_scale)
    )
    train_set = dataset_of(flags.train_path, train_transform, bands, flags, num_classes, palette, "training")
    check_weighted_pixels(flags.class_weights, train_set.masks.class_pixels, class_names, train_set.source)
    evaluation_blocks(val_set, evaluation)  # before training: a pattern that cannot work is found now, not after it

    model, _ = build_segmenter(
        num_classes,
        finetune=flags.finetune,
        model=flags.model,
        input_size=flags.input_size,
        patch_size=flags.patch_size,
        bands=bands,
        head=flags.head,
        freeze_encoder=flags.freeze_encoder,
        decoder_channels=flags.decoder_channels,
        drop_path=flags.drop_path,
    )
    if distributed.is_distributed():  # gloo as NCCL: the 2-process CPU tests run the synced path
        from models_segmentation import sync_batch_norms

        sync_batch_norms(model)
    model.to(run.device)
    plan = config.training_schedule(flags, run.world_size)
    record = config.run_record(
        flags,
        **bands.record(),
        patch_size=model.encoder.patch_embed.patch_size[0],
        nb_classes=num_classes,
        lr=plan.lr,
        lr_given=flags.lr,
        world_size=run.world_size,
    )
    optimizer = create_optimizer_v2(
        model,
        "adamw",
        lr=plan.lr,
        weight_decay=flags.weight_decay,
        layer_decay=flags.layer_decay,
        fused=run.device.type == "cuda",
    )
    weights = flags.class_weights  # over the largest: the weighted mean is the same, and 1e39 stays within float32
    weight = torch.tensor([w / max(weights) for w in weights], device=run.device) if weights else None

    def criterion(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return segmentation_loss(logits, masks, weight, flags.ignore_index)

    scaler = loop.grad_scaler(run)
    start_epoch, start_step, resumed = checkpoint.resume(
        flags.resume, record, run, model, optimizer, scaler, flags.start_epoch, flags.allow_changed_flags
    )
    logger.append_log(
        run,
        {
            "run_start": datetime.datetime.now().isoformat(timespec="seconds"),
            "resumed_from": str(resumed.get("path")) if resumed else None,
            "start_epoch": start_epoch,
        },
    )
    train_loader, sampler = loaders.train_loader(train_set, config.loading(flags), run)
    val_loader = single_image_loader(val_set, flags, run)
    steps_per_epoch = len(train_loader)
    scheduler = schedule.lr_scheduler(optimizer, plan, steps_per_epoch)
    best_miou = resumed.get("best_miou", -1.0)
    writer = logger.start_logs(run, flags, flags.log_dir)
    extra = {"class_names": class_names, "palette": [list(c) for c in palette.colors] if palette else None}
    main_print(
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters "
        f"({'frozen encoder, ' if flags.freeze_encoder else ''}{flags.head} head, blocks {list(model.blocks)}), "
        f"{len(train_set)} training / {len(val_set)} evaluation images, {num_classes} classes, {steps_per_epoch} "
        "steps/epoch, "
        f"lr {plan.lr:.3e}, device {run.device}, autocast {run.amp_dtype or 'off (fp32)'}"
    )
    train_model = loop.distribute(model, run, flags.attention, flags.compile, unused=model.unused_parameters)
    at_scale_1 = Protocol(
        evaluation.crop, (1.0,), evaluation.overlap, evaluation.ignore_index, evaluation.exclude_classes
    )
    try:
        for epoch, first_step in loop.epochs(plan, sampler, start_epoch, start_step, run, steps_per_epoch):
            train_stats = loop.train_supervised_epoch(
                train_model,
                criterion,
                train_loader,
                optimizer,
                scheduler,
                scaler,
                run,
                plan,
                epoch,
                steps_per_epoch,
                writer,
                first_step,
            )
            confusions, _ = evaluate(model, val_loader, run, num_classes, at_scale_1)
            row = results_table(confusions, class_names, evaluation.exclude_classes)[0]
            improved = row["mIoU"] > best_miou
            best_miou = max(best_miou, row["mIoU"])
            report([row], len(val_set), f"epoch {epoch}", best_miou)
            log = {
                **{f"train_{k}": v for k, v in train_stats.items()},
                **{f"test_{k}": row[k] for k in ("mIoU", "mF1", "OA")},
            }
            loop.end_epoch(
                run,
                epoch,
                model,
                optimizer,
                scaler,
                record,
                log,
                writer=writer,
                improved=improved,
                save_every=flags.save_every,
                best_miou=best_miou,
                **extra,
            )
    except process.Preempted as stop:
        checkpoint.save_preempted(run, stop, model, optimizer, scaler, record, best_miou=best_miou, **extra)
        return
    if writer is not None:
        writer.close()
    final_evaluation(
        model, val_set, evaluation, bands, run, class_names, palette, run.output_dir, "last epoch", flags.num_workers
    )


def segmentation_loss(
    logits: torch.Tensor, masks: torch.Tensor, weight: torch.Tensor | None, ignore_index: int
) -> torch.Tensor:
    """Cross-entropy (fp32) of logits [B, K, H, W] against masks [B, H, W], averaged over the labelled pixels (weighted
    by ``weight`` [K] of their class, as ``nn.CrossEntropyLoss``'s mean). A batch without a labelled pixel (sparse
    annotations under a small crop, LoveDA's no-data, 1 x 1 tiles) gives 0 with a zero gradient, not 0 / 0 = NaN
    (mmsegmentation#1409, pytorch#116349): such a batch teaches nothing, as in mmsegmentation."""
    total = F.cross_entropy(logits.float(), masks, weight=weight, ignore_index=ignore_index, reduction="sum")
    labelled = masks != ignore_index
    count = weight[masks[labelled]].sum() if weight is not None else labelled.sum()
    return total / count.clamp(min=torch.finfo(torch.float32).tiny)


def evaluate_segmenter(flags: Flags, bands: Bands) -> None:
    """``--eval``: the segmenter a checkpoint of ``main_segment.py`` holds (``--resume PATH|auto`` or ``--finetune``),
    at every ``--scales``; outputs go to ``--output_dir/eval/``. Head, architecture, crop and classes come from it;
    masks are decoded with ``--palette`` when it has the checkpoint's classes, else with the checkpoint's palette.

    Raises:
        UsageError: no checkpoint given; band flags other than the checkpoint's.
        CheckpointError: not a segmentation checkpoint, or weights that do not fit.
    """
    path, state = checkpoint.checkpoint_to_evaluate(flags.resume, flags.finetune, flags.output_dir, "segmenter")
    weights = checkpoint.model_state(state)
    saved = state.get("args") or {}
    if "class_names" not in state or not any(k.startswith("head.") for k in weights):
        raise CheckpointError(f"{path}: not a segmentation checkpoint of main_segment.py (no head / class names)")
    class_names = list(state["class_names"])
    check_class_flags(flags, class_names)
    if "reduce_zero_label" in saved and bool(saved["reduce_zero_label"]) != flags.reduce_zero_label:
        # Not refused: the convention belongs to the evaluation set's masks, which may differ from the training set's.
        trained_with, here = ("with", "without") if saved["reduce_zero_label"] else ("without", "with")
        main_print(
            f"note: {path} was trained {trained_with} --reduce_zero_label and this evaluation reads masks {here} it: "
            "right only if these masks use the other convention (0 = no data); else every class is scored as its "
            "neighbour"
        )
    if saved.get("in_chans", 3) != bands.in_chans:
        raise UsageError(
            f"{path}: the segmenter reads {saved['in_chans']} band(s): give --in_chans {saved['in_chans']} "
            "and the --bands / --band_stats (or --mean / --std) it was trained with"
        )
    checkpoint.check_band_flags(saved, bands, path)
    architecture = {
        key: saved.get(key) if saved.get(key) is not None else flags.as_dict()[key]
        for key in ("head", "decoder_channels", "input_size", "patch_size", "model")
    }
    palette_used = (
        segmentation.Palette(tuple(class_names), tuple(tuple(c) for c in state["palette"]))
        if state.get("palette")
        else None
    )
    decode = evaluation_palette(flags.palette, path, class_names, palette_used)
    run = process.setup_run(flags.device, flags.amp, flags.seed, Path(flags.output_dir) / "eval", flags.dist_timeout)
    evaluation = protocol(flags, crop=architecture["input_size"])
    val_set = dataset_of(
        config.evaluation_path(flags.train_path, flags.test_path, split=False),
        segmentation.eval_transform(bands.mean, bands.std),
        bands,
        flags,
        len(class_names),
        decode,
        "evaluation",
    )
    evaluation_blocks(val_set, evaluation)
    model, _ = build_segmenter(
        len(class_names),
        finetune="",
        model=architecture["model"],
        input_size=architecture["input_size"],
        patch_size=architecture["patch_size"],
        bands=bands,
        head=architecture["head"],
        freeze_encoder=False,
        decoder_channels=architecture["decoder_channels"],
        weights=layouts.read_encoder(path),
        load=False,
    )
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: does not fit the segmenter it describes ({str(e).strip().splitlines()[-1].strip()})"
        ) from None
    model.to(run.device)
    loop.set_fused_attention(model, loop.use_sdpa(flags.attention, run.device))  # the attention path training used
    main_print(
        f"eval: the segmenter of {path} ({architecture['model'] or 'its encoder'}, {architecture['head']} head, "
        f"{len(class_names)} classes, crop {architecture['input_size']} px)"
    )
    final_evaluation(
        model,
        val_set,
        evaluation,
        bands,
        run,
        class_names,
        palette_used or decode,
        run.output_dir,
        f"eval of {path.name}",
        flags.num_workers,
    )


def evaluation_palette(
    given: str, path: Path, class_names: list[str], saved: segmentation.Palette | None
) -> segmentation.Palette | None:
    """The palette ``--eval`` decodes masks with: ``--palette`` where given and of the checkpoint's classes (its names,
    or its colours), else the checkpoint's own (also where ``--palette`` is left at its default, the sample's).

    Raises:
        UsageError: a ``--palette`` given of other classes than the checkpoint's: its colours would decode to other
            class indices, and the mIoU would silently score the wrong classes.
    """
    default = config.SEGMENTATION_SAMPLE / "seg_palette.json"
    if str(given).lower() in ("", "none") or Path(given) == default:
        return saved
    palette = segmentation.load_palette(given)
    if list(palette.names) == class_names or saved is not None and palette.colors == saved.colors:
        return palette
    raise UsageError(
        f"--palette {given}: {len(palette.names)} classes ({', '.join(palette.names[:6])}"
        f"{', ...' if len(palette.names) > 6 else ''}), but {path} was trained on {len(class_names)} "
        f"({', '.join(class_names[:6])}{', ...' if len(class_names) > 6 else ''}): give the palette it was trained "
        "with, or leave --palette out (its own is used)"
    )


def classes_of(flags: Flags) -> tuple[list[str], segmentation.Palette | None]:
    """Class names (index = class) and the palette, from --palette, --class_names and --nb_classes.

    Raises:
        UsageError: fewer than 2 classes; --nb_classes, --exclude_classes or --ignore_index that do not fit the names
            (``check_class_flags``).
    """
    palette = None if str(flags.palette).lower() in ("", "none") else segmentation.load_palette(flags.palette)
    names = list(flags.class_names or (palette.names if palette else []))
    if not names and flags.nb_classes:
        names = [f"class_{k}" for k in range(flags.nb_classes)]
    if flags.nb_classes is not None and flags.nb_classes != len(names):
        raise UsageError(f"--nb_classes {flags.nb_classes}: {len(names)} class names given (palette or --class_names)")
    if len(names) < 2:
        raise UsageError("give the classes: --palette (isprs or JSON), --class_names, or --nb_classes (at least 2)")
    check_class_flags(flags, names)
    sample_palette = config.SEGMENTATION_SAMPLE / "seg_palette.json"
    if (
        palette is not None
        and not flags.class_names
        and Path(flags.palette).resolve() == sample_palette.resolve()
        and not Path(flags.train_path).resolve().is_relative_to(config.SEGMENTATION_SAMPLE.resolve().parent)
    ):  # the default palette on the user's own masks: their indices would report under the sample's names
        main_print(
            f"note: classes: the embedded sample's {', '.join(names)} (--palette default "
            f"{sample_palette.relative_to(config.REPO)}); name your own with --class_names NAME ... (index 0 first), "
            "--palette none --nb_classes N, or a JSON --palette"
        )
    return names, palette


def check_weighted_pixels(
    weights: Sequence[float] | None, class_pixels: Sequence[int], class_names: Sequence[str], source: str
) -> None:
    """Refuse --class_weights that give every labelled training pixel weight 0: the loss would be 0 with no gradient
    at every step, and the run would train nothing and exit 0.

    Raises:
        UsageError: naming the weights and the classes the pixels are of.
    """
    if weights is None or any(w > 0 and n > 0 for w, n in zip(weights, class_pixels)):
        return
    present = ", ".join(f"{class_names[k]} {n}" for k, n in enumerate(class_pixels) if n)
    raise UsageError(
        f"--class_weights {' '.join(f'{w:g}' for w in weights)}: every labelled pixel of {source} ({present}) is of a "
        "class of weight 0: nothing to learn from"
    )


def check_class_flags(flags: Flags, class_names: Sequence[str]) -> None:
    """Refuse --exclude_classes outside the classes or covering them all (no class left to score: mIoU n/a with exit
    0), and an --ignore_index that is a class's index (every pixel of that class would leave the loss and the metrics,
    and the run would end with exit 0 and the class n/a). Training and ``--eval`` (the checkpoint's classes) alike.

    Raises:
        UsageError: naming the flag and the classes.
    """
    ignore_index, count = flags.ignore_index, len(class_names)
    if any(not 0 <= k < count for k in flags.exclude_classes):
        raise UsageError(f"--exclude_classes {flags.exclude_classes}: classes are 0..{count - 1}")
    if set(flags.exclude_classes) >= set(range(count)):
        raise UsageError(f"--exclude_classes {flags.exclude_classes}: every one of the {count} classes: none to score")
    if ignore_index < count:
        raise UsageError(
            f"--ignore_index {ignore_index} is class {ignore_index} ({class_names[ignore_index]}) of the "
            f"{count} classes: its pixels would count in no loss and no metric; give a value from {count} to 255 "
            "(255 by default)"
        )


def dataset_of(
    path: str,
    transform,
    bands: Bands,
    flags: Flags,
    num_classes: int,
    palette: segmentation.Palette | None,
    what: str,
) -> segmentation.SegDataset:
    """The image / mask pairs of ``path``, read as ``bands`` say (multispectral / high-bit-depth rasters, else 8-bit
    RGB), masks as --ignore_index / --reduce_zero_label / --off_palette_tolerance say, every mask checked once
    (``SegDataset.check_masks``; ``what``: ``training`` or ``evaluation``).

    Raises:
        DataError: no pairs, a bad mask, masks beyond --off_palette_tolerance, or no labelled pixel at all.
    """
    dataset = segmentation.SegDataset(
        segmentation.find_pairs(path, raster=bands.raster),
        transform,
        num_classes,
        palette,
        flags.ignore_index,
        flags.reduce_zero_label,
        bands,
        flags.off_palette_tolerance,
    )
    dataset.source = str(path)
    dataset.check_masks(what)
    return dataset


def evaluation_blocks(val_set: segmentation.SegDataset, evaluation: Protocol) -> tuple[list[str], np.ndarray]:
    """The evaluation images' file names and location blocks (``--block_pattern``, ``--block_size``).

    Raises:
        UsageError: a pattern whose row / col groups match no integer.
    """
    names = [Path(image).name for image, _ in val_set.pairs]
    return names, location_blocks.block_ids(names, evaluation.block_pattern, evaluation.block_size)


def bootstrap_resamples(evaluation: Protocol, image_block: np.ndarray, source: str) -> int:
    """``--bootstrap``, or 0 (no interval, with a note) where the images form fewer than 2 location blocks: every
    resample would be the whole set, an interval of width 0 that would claim a certainty the data cannot give."""
    if evaluation.bootstrap and len(np.unique(image_block)) < 2:
        main_print(
            f"note: --block_pattern {evaluation.block_pattern!r} (--block_size {evaluation.block_size}) puts the "
            f"{len(image_block)} evaluation image(s) of {source} into 1 location block: no bootstrap interval "
            "(it needs at least 2 blocks)"
        )
        return 0
    return evaluation.bootstrap


def single_image_loader(dataset: segmentation.SegDataset, flags: Flags, run: Run):
    """Evaluation loader of one image per batch (images may differ in size), sharded over ranks."""
    return loaders.eval_loader(dataset, config.loading(flags, batch_size=1), run)


def final_evaluation(
    model: nn.Module,
    val_set: segmentation.SegDataset,
    evaluation: Protocol,
    bands: Bands,
    run: Run,
    class_names: list[str],
    palette: segmentation.Palette | None,
    directory: Path,
    what: str,
    num_workers: int | None = 0,
) -> list[dict]:
    """Evaluate at every scale of ``evaluation``, with the mIoU's 95 % block-bootstrap interval; rank 0 writes
    seg_results.csv / .md, seg_confusion.json (per scale: the set's and each image's confusion matrix, with the images'
    names and blocks), mIoU against scale, per-class IoU and the prediction figure into ``directory``. Used by
    ``tools/seg_baseline.py`` too. Returns the rows of ``results_table``."""
    loader = loaders.eval_loader(val_set, config.Loading(1, num_workers), run)
    confusions, examples = evaluate(
        model, loader, run, len(class_names), evaluation, keep=evaluation.examples if run.is_main else 0
    )
    names, image_block = evaluation_blocks(val_set, evaluation)
    resamples = bootstrap_resamples(evaluation, image_block, val_set.source or "the evaluation set")
    rows = results_table(confusions, class_names, evaluation.exclude_classes, image_block, resamples)
    report(rows, len(val_set), what)
    masks = val_set.masks.describe(val_set.palette is not None) if val_set.masks else ""
    if masks:
        main_print(f"{what}: masks of {val_set.source or 'the evaluation set'}: {masks}")
    if run.is_main:
        excluded = ", ".join(class_names[k] for k in evaluation.exclude_classes)
        note = (
            "IoU in %; means over the classes present in ground truth or predictions"
            + (f", without {excluded}" if excluded else "")
            + "; n/a: class absent from both"
            + (
                f"; pixels within {evaluation.ignore_boundary} px of another class not counted"
                if evaluation.ignore_boundary
                else ""
            )
            + (
                f". mIoU_low / mIoU_high: 95 % percentile interval of {resamples} bootstrap resamples of the "
                f"{len(np.unique(image_block))} location blocks of the {len(names)} images (--block_pattern '"
                f"{evaluation.block_pattern}', --block_size {evaluation.block_size}; seed 0)"
                if resamples
                else ""
            )
            + (f". Masks: {masks}" if masks else "")
            + "."
        )
        write_tables(rows, directory, note)
        (directory / "seg_confusion.json").write_text(
            json.dumps(
                {f"{s:g}": c.sum(0).tolist() for s, c in confusions.items()}
                | {
                    "off_palette_pixels": val_set.masks.off_palette if val_set.masks else None,
                    "class_names": class_names,
                    "images": names,
                    "blocks": image_block.tolist(),
                    "per_image": {f"{s:g}": c.tolist() for s, c in confusions.items()},
                }
            )
        )
        one = next(row for row in rows if row["scale"] == max(evaluation.scales))
        figures.save_per_class_iou(
            one,
            class_names,
            directory / "per_class_iou.png",
            f"per-class IoU ({what}, scale {one['scale']:g}): mIoU {one['mIoU']:.1f}%",
        )
        if len(rows) > 1:
            figures.save_miou_vs_scale(rows, directory / "miou_vs_scale.png", what, images=len(names))
        if examples:
            shown = (
                palette
                if palette is not None and list(palette.names) == class_names
                else figures.default_palette(class_names)
            )
            figures.save_examples(
                examples,
                shown,
                bands.mean,
                bands.std,
                directory / "seg_examples.png",
                f"{what}: mIoU {one['mIoU']:.1f}% at scale {one['scale']:g}",
                stretch=bands.raster,
                rgb_bands=bands.rgb_bands,
            )
        main_print(f"segmentation outputs: {directory}")
    return rows


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, run: Run, num_classes: int, evaluation: Protocol, keep: int = 0
) -> tuple[dict[float, torch.Tensor], list]:
    """Per-image confusion matrices [N, K, K] per scale over the whole evaluation set (gathered from every rank,
    in dataset order), and up to ``keep`` (image, ground truth, prediction at the largest scale) triples of this
    rank for figures, spread over its images. Sum over the images for the set's confusion matrix; keep them apart
    for intervals over location blocks (``iou.block_bootstrap_miou``).

    Each image goes through ``inference.degrade`` (down-sample by the scale, up-sample back) and sliding-window
    inference at the crop size (``evaluation``). ``loader`` yields images (any size) with their masks, sharded over
    ranks as ``util.data.loaders.eval_loader`` does (rank r: images r, r + W, ...). ``evaluation.ignore_boundary`` > 0:
    ground-truth pixels within that many px of another class are not counted (``iou.ignore_boundaries``; ISPRS: 3).

    Raises:
        NonFiniteOutputError: NaN / inf scores on any rank (counted on the device, checked once for the whole set:
            the loop never waits for the GPU; every rank raises alike).
    """
    model.eval()
    scales, ignore_index = evaluation.scales, evaluation.ignore_index
    per_image = {s: [] for s in scales}
    non_finite = {s: torch.zeros((), dtype=torch.long, device=run.device) for s in scales}  # checked once, at the end
    examples = []
    every = max(len(loader) // keep, 1) if keep else 1  # figure examples spread over the set
    for index, (image, mask) in enumerate(loader):
        image = image.to(run.device, non_blocking=True)
        mask = iou.ignore_boundaries(
            mask.to(run.device, non_blocking=True), evaluation.ignore_boundary, num_classes, ignore_index
        )
        for scale in scales:  # float32 whatever --amp trains with (util.eval.inference.infer says why)
            probs = inference.sliding_window(
                model, inference.degrade(image, scale), num_classes, evaluation.crop, evaluation.overlap
            )
            non_finite[scale] += (~torch.isfinite(probs)).sum()
            pred = probs.argmax(1)
            per_image[scale].append(iou.confusion_matrices(pred, mask, num_classes, ignore_index))
            if scale == max(scales) and len(examples) < keep and index % every == 0:
                examples += [
                    (image[i].cpu(), mask[i].cpu(), pred[i].cpu()) for i in range(min(len(image), keep - len(examples)))
                ]
    # one collective and one host synchronisation for the whole set; every rank gets the same answer
    means = distributed.all_reduce_mean({str(s): n for s, n in non_finite.items()}, run.device)
    bad = {s: round(means[str(s)] * run.world_size) for s in scales if means[str(s)]}
    if bad:
        raise NonFiniteOutputError(
            "evaluation: NaN/inf class scores ("
            + ", ".join(f"{n} value(s) at scale {s:g}" for s, n in bad.items())
            + "); refusing to report an mIoU"
        )
    empty = torch.zeros(0, num_classes, num_classes, dtype=torch.long, device=run.device)  # a rank without images
    return {s: iou.gather_confusions(torch.cat(c) if c else empty) for s, c in per_image.items()}, examples


def results_table(
    confusions: dict[float, torch.Tensor],
    class_names: Sequence[str],
    exclude: Sequence[int] = (),
    image_block: np.ndarray | None = None,
    resamples: int = 0,
) -> list[dict]:
    """One row per scale: scale, mIoU, mF1, OA, pixels counted and each class's IoU (%; NaN: class absent from
    both) of the set (its images' confusions [N, K, K] summed). With ``image_block`` ([N] block of each image) and
    ``resamples`` > 0, also mIoU_low / mIoU_high: the 95 % block-bootstrap interval (``iou.block_bootstrap_miou``)."""
    rows = []
    for scale, per_image in sorted(confusions.items()):
        confusion = per_image.sum(0)
        s = iou.scores(confusion, exclude)
        interval = {}
        if image_block is not None and resamples:
            low, high = iou.block_bootstrap_miou(per_image, image_block, exclude, resamples)
            interval = {"mIoU_low": low, "mIoU_high": high}
        rows.append(
            {
                "scale": scale,
                "mIoU": s["mIoU"],
                **interval,
                "mF1": s["mF1"],
                "OA": s["OA"],
                "pixels": int(confusion.sum()),
                **{f"IoU_{name}": v for name, v in zip(class_names, s["IoU"])},
            }
        )
    return rows


def _fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def write_tables(rows: list[dict], directory: Path, note: str = "") -> tuple[Path, Path]:
    """``seg_results.csv`` and ``seg_results.md`` (one row per scale); the Markdown also goes to stdout."""
    directory.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    csv_path, md_path = directory / "seg_results.csv", directory / "seg_results.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += [
        "| " + " | ".join(_fmt(row[c]) if c != "scale" else f"{row[c]:g}" for c in columns) + " |" for row in rows
    ]
    text = "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")
    md_path.write_text(text)
    main_print(text)
    return csv_path, md_path


def report(rows: list[dict], count: int, what: str, best: float | None = None) -> None:
    """One line per scale (rank 0); the block-bootstrap interval in brackets when the rows have one."""
    for row in rows:
        if row["pixels"] == 0:  # every ground-truth pixel ignored (eroded boundaries of tiny objects, say)
            main_print(f"{what}: {count} images, scale {row['scale']:g}: 0 pixels scored (all ignored): no mIoU")
            continue
        interval = f" [{_fmt(row['mIoU_low'])}, {_fmt(row['mIoU_high'])}]" if "mIoU_low" in row else ""
        line = (
            f"{what}: {count} images, scale {row['scale']:g}: mIoU {_fmt(row['mIoU'])}%{interval}, mF1 "
            f"{_fmt(row['mF1'])}%, "
            f"OA {_fmt(row['OA'])}%"
        )
        if best is not None and row["scale"] == 1.0:
            line += f" (best mIoU {_fmt(best) if best >= 0 else 'n/a'}%)"
        main_print(line)
