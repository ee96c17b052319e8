"""Fine-tune a pretrained Cross-Scale MAE encoder end to end for classification.

    python main_finetune.py --finetune weights/cross_scale_mae_base_pretrain.pth --input_size 128 \
        --train_path train_128.csv --test_path val_128.csv
"""
from __future__ import annotations

import argparse

from util import config


def get_args_parser() -> argparse.ArgumentParser:
    parser = config.classification_parser(
        "Cross-Scale MAE fine-tuning", global_pool=True, head_init_std=2e-5,
        batch_size=512, epochs=100, blr=1e-3, min_lr=1e-6, warmup_epochs=5, weight_decay=0.05,
    )
    group = parser.add_argument_group("fine-tuning")
    group.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise LR decay (timm param_groups_layer_decay)")
    group.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth rate")
    group.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    group = parser.add_argument_group("augmentation (timm create_transform; upstream parsed these but never applied them)")
    group.add_argument("--aa", default=None, help="RandAugment policy, or 'none' (default: rand-m9-mstd0.5-inc1 for 8-bit RGB, "
                                                  "none for other band counts / bit depths: RGB-only)")
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


if __name__ == "__main__":  # --help and flag errors answer here, before torch and timm load (~5 s)
    config.parse_args(get_args_parser())

import datetime  # noqa: E402
import json  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from timm.data import Mixup, create_transform  # noqa: E402
from timm.data.random_erasing import RandomErasing  # noqa: E402
from torchvision.transforms import v2  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

import engine_finetune  # noqa: E402
from model_loading import build_classifier, classifier_name  # noqa: E402
from util import config  # noqa: E402
from util.data import datasets, loaders, raster_options, transforms
from util.eval import figures
from util.run import checkpoint, distributed, logger, loop, process, schedule
from util.weights import layouts
from util.errors import CheckpointError, UsageError, first_line  # noqa: E402
from util.files import best_effort
from util.run.process import run_entry_point


def setup(args: argparse.Namespace, model: nn.Module, num_classes: int) -> Setup:
    """All parameters train; AdamW with layer-wise LR decay; mixup/cutmix with soft-target cross-entropy."""
    mixing = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if mixing and args.batch_size % 2:
        raise UsageError(f"--batch_size {args.batch_size}: mixup/cutmix need an even batch (or --mixup 0 --cutmix 0)")
    mixup = Mixup(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing, num_classes=num_classes,
    ) if mixing else None
    if mixing:
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    optimizer = create_optimizer_v2(
        model, "adamw", lr=args.lr, weight_decay=args.weight_decay, layer_decay=args.layer_decay, fused=True,
    )
    return Setup(model, model, optimizer, criterion, train_transform(args), mixup)


def train_transform(args: argparse.Namespace) -> Callable:
    """8-bit RGB: timm's ``create_transform`` (RandomResizedCrop scale 0.25-1, flips, RandAugment ``--aa`` or colour
    jitter, random erasing), as upstream's flags describe. Other band counts / bit depths (``args.raster``): RandAugment
    and colour jitter are RGB-only operations (hue, solarize, PIL colour enhancement), so they are off: the raster
    crop + flips (``transforms.build_raster_transform``), then timm's random erasing, which works on any band count.

    Raises:
        UsageError: ``--aa`` (other than none) or ``--color_jitter`` given for raster data.
    """
    if args.aa is None:  # the default depends on the data: upstream's policy for RGB, none otherwise
        args.aa = "none" if args.raster else "rand-m9-mstd0.5-inc1"
    if not args.raster:
        return create_transform(
            args.input_size, is_training=True, scale=(0.25, 1.0), hflip=0.5, vflip=0.5, interpolation="bicubic",
            auto_augment=None if args.aa == "none" else args.aa, color_jitter=args.color_jitter,
            re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, mean=args.mean, std=args.std,
        )
    for flag, value in (("aa", None if args.aa == "none" else args.aa), ("color_jitter", args.color_jitter)):
        if value is not None:
            raise UsageError(f"--{flag} {value}: RandAugment and colour jitter are RGB-only; leave them out for "
                             f"{args.in_chans}-band / non-8-bit data (crops, flips, random erasing, mixup and cutmix still apply)")
    distributed.main_print(f"{args.in_chans}-band data: RandAugment and colour jitter off (RGB-only); crops, flips, "
                           f"random erasing (p {args.reprob}), mixup / cutmix as set")
    erase = RandomErasing(args.reprob, mode=args.remode, max_count=args.recount, device="cpu")
    return v2.Compose([transforms.build_raster_transform(True, args.input_size, args.mean, args.std), erase])


def main(args: argparse.Namespace) -> None:
    run_classification(args, setup)


@dataclass
class Setup:
    """What a script decides; the rest of the run is shared.

    Attributes:
        model: The whole classifier (saved in checkpoints, used by ``--eval``).
        trainable: The module the optimiser updates and DDP wraps (the model, or only its head).
        optimizer: Over ``trainable``'s parameters.
        criterion: Loss on (logits, targets); targets may be soft (mixup).
        train_transform: Transform of training images.
        mixup: timm ``Mixup`` applied to each training batch, or None.
        cache_features: Train ``trainable`` (the head) on features of the frozen encoder computed once.
    """

    model: nn.Module
    trainable: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    train_transform: Callable
    mixup: Callable | None = None
    cache_features: bool = False


SetupFn = Callable[[argparse.Namespace, nn.Module, int], Setup]


def run_classification(args: argparse.Namespace, setup_fn: SetupFn) -> None:
    """Train a classifier head (and, for fine-tuning, the encoder), evaluating every epoch; with ``--eval``,
    evaluate the classifier a checkpoint holds (``evaluate_checkpoint``)."""
    config.check_common_args(args)
    if args.eval:
        evaluate_checkpoint(args, setup_fn)
        return
    if args.input_size is None:
        args.input_size = DEFAULT_INPUT_SIZE
    checkpoint.check_output_dir(args)
    run = process.setup_run(args)
    raster = raster_options.raster_options(args)
    train_set = datasets.build_dataset(args.train_path, args.dataset_type, draft_size=transforms.draft_size_for(True, args.input_size),
                                       skip_bad=args.skip_bad_images, raster=raster)
    val_set = datasets.build_dataset(args.test_path, args.dataset_type, transforms.image_transform(args, False),
                                     transforms.draft_size_for(False, args.input_size), args.skip_bad_images,
                                     classes=train_set.classes or None, raster=raster)
    class_names = datasets.check_labels(train_set, [val_set], args.nb_classes)
    num_classes = args.nb_classes = len(class_names)

    model, _ = build_classifier(args, num_classes)
    model.to(run.device)
    schedule.resolve_lr(args, run.world_size)
    setup = setup_fn(args, model, num_classes)
    train_set.transform = setup.train_transform
    scaler = loop.grad_scaler(run)
    start_epoch, start_step, resumed = checkpoint.resume(args, run, model, setup.optimizer, scaler)
    logger.append_log(run, {"run_start": datetime.datetime.now().isoformat(timespec="seconds"),
                            "resumed_from": str(resumed.get("path")) if resumed else None, "start_epoch": start_epoch})

    if setup.cache_features:  # the encoder is final now (resumed or loaded): its features never change
        distributed.main_print("no augmentation: computing the frozen encoder's features once, then training the head on them")
        train_set = engine_finetune.FeatureDataset(*engine_finetune.extract_features(model, loaders.eval_loader(train_set, args, run), run))
        val_set = engine_finetune.FeatureDataset(*engine_finetune.extract_features(model, loaders.eval_loader(val_set, args, run), run))
        args.num_workers = 0  # features are in memory already
    train_loader, sampler = loaders.train_loader(train_set, args, run)
    val_loader = loaders.eval_loader(val_set, args, run)
    steps_per_epoch = len(train_loader)
    scheduler = schedule.lr_scheduler(setup.optimizer, args, steps_per_epoch)
    best_acc1 = resumed.get("best_acc1", -1.0)  # below any accuracy: the first epoch writes checkpoint-best
    writer = logger.summary_writer(run, args)
    eval_model = setup.trainable if setup.cache_features else model
    extra = {"class_names": class_names}

    distributed.main_print(
        f"{sum(p.numel() for p in setup.trainable.parameters() if p.requires_grad):,} trainable parameters, "
        f"{len(train_set)} training / {len(val_set)} evaluation images, {num_classes} classes, "
        f"{steps_per_epoch} steps/epoch, lr {args.lr:.3e}, device {run.device}, autocast {run.amp_dtype or 'off (fp32)'}"
    )
    train_model = loop.distribute(setup.trainable, run, args)

    try:
        for epoch, first_step in loop.epochs(args, sampler, start_epoch, start_step, run, steps_per_epoch):
            train_stats = engine_finetune.train_one_epoch(train_model, setup.criterion, train_loader, setup.optimizer, scheduler,
                                                          scaler, run, epoch, steps_per_epoch, args, writer, first_step, setup.mixup)
            metrics, confusion = engine_finetune.evaluate(eval_model, val_loader, run, num_classes)
            improved = metrics["acc1"] > best_acc1
            best_acc1 = max(best_acc1, metrics["acc1"])
            engine_finetune.report(metrics, len(val_set), f"epoch {epoch}", best_acc1)
            checkpoint.save_epoch(run, "checkpoint-last.pth", model, setup.optimizer, scaler, epoch, args, best_acc1=best_acc1, **extra)
            if improved:
                checkpoint.save_epoch(run, "checkpoint-best.pth", model, setup.optimizer, scaler, epoch, args, best_acc1=best_acc1, **extra)
            if args.save_every and (epoch + 1) % args.save_every == 0:
                checkpoint.save_epoch(run, f"checkpoint-{epoch}.pth", model, setup.optimizer, scaler, epoch, args, best_acc1=best_acc1, **extra)
            logger.append_log(run, {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                                    **{f"test_{k}": v for k, v in metrics.items()}})
            if run.is_main:
                for name, value in metrics.items():
                    writer.add_scalar(f"test/{name}", value, epoch)
                title = f"epoch {epoch}: top-1 {metrics['acc1']:.1f}% on {len(val_set)} images of {Path(args.test_path).name}"
                for name in ("last", "best") if improved else ("last",):
                    path = run.output_dir / f"confusion_matrix_{name}.png"
                    best_effort(path, lambda: figures.save_confusion_png(confusion, class_names, path, title))
    except process.Preempted as stop:
        checkpoint.save_preempted(run, stop, model, setup.optimizer, scaler, args, best_acc1=best_acc1, **extra)
        return
    if writer is not None:
        writer.close()
    distributed.main_print(f"outputs: {run.output_dir} (checkpoint-best.pth, checkpoint-last.pth, log.txt, confusion matrices)")


DEFAULT_INPUT_SIZE = config.DEFAULT_INPUT_SIZE


def evaluate_checkpoint(args: argparse.Namespace, setup_fn: SetupFn) -> None:
    """``--eval``: the accuracy of the classifier a checkpoint holds, head included.

    The checkpoint is ``--resume`` (a path, or ``auto``: the newest in ``--output_dir``) or ``--finetune``.
    Architecture, patch size, pooling, class count and class names come from it; ``--input_size`` too unless
    given. Outputs go to ``--output_dir/eval/``, never over a training run's files. Only the evaluation set
    is read, so ``--batch_size`` need not fit the training set.

    Raises:
        UsageError: no checkpoint given, or ``--resume auto`` found none.
        CheckpointError: no classification head in it (a freshly initialised head would report chance
            accuracy), non-finite weights, or weights that do not fit.
    """
    path, state = checkpoint.checkpoint_to_evaluate(args, "classifier")
    weights = checkpoint.model_state(state)
    head = next((weights[k] for k in ("head.weight", "head.1.weight") if k in weights), None)
    if head is None or head.ndim != 2:
        raise CheckpointError(f"{path}: holds no classification head (a pretraining checkpoint or an encoder export?); "
                              "--eval would report the accuracy of a freshly initialised head: fine-tune or linear-probe it first")
    non_finite = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if non_finite:
        raise CheckpointError(f"{path}: non-finite values (NaN/inf) in {layouts.summarise(non_finite, 3)}; refusing to evaluate it")
    saved = state.get("args") or {}
    checkpoint.check_band_flags(saved, args, path)
    num_classes = head.shape[0]
    if args.nb_classes is not None and args.nb_classes != num_classes:
        raise UsageError(f"--nb_classes {args.nb_classes}: {path} holds a head of {num_classes} classes")
    args.nb_classes = num_classes
    encoder = layouts.read_encoder(path)
    args.global_pool = "fc_norm.weight" in weights
    args.input_size = args.input_size or saved.get("input_size") or encoder.shape.input_size
    args.model = args.model or saved.get("model") or classifier_name(encoder)
    args.drop_path = 0.0
    for flag in ("mixup", "cutmix"):  # the training batch's mixing is irrelevant here (and needs an even batch)
        if hasattr(args, flag):
            setattr(args, flag, 0.0)
    if hasattr(args, "cutmix_minmax"):
        args.cutmix_minmax = None
    args.output_dir = str(Path(args.output_dir) / "eval")
    run = process.setup_run(args)
    known_names = state.get("class_names")
    if known_names is not None and len(known_names) != num_classes:
        raise CheckpointError(f"{path}: {len(known_names)} class names for a head of {num_classes} classes")
    if known_names is None and args.train_path and Path(args.train_path).is_dir():  # older checkpoints: the training tree's folders
        known_names = datasets.scan_image_folder(Path(args.train_path))[1]
    val_set = datasets.build_dataset(args.test_path, args.dataset_type, transforms.image_transform(args, False),
                                     transforms.draft_size_for(False, args.input_size), args.skip_bad_images, classes=known_names,
                                     raster=raster_options.raster_options(args))
    if isinstance(val_set, datasets.ImageDataset) and val_set.classes and known_names is None:
        raise CheckpointError(f"{path}: holds no class names, so the folders of {args.test_path} cannot be matched to its head; "
                              "give --train_path (the training tree)")
    class_names = datasets.check_labels(None, [val_set], num_classes, known_names)

    model, _ = build_classifier(args, num_classes, encoder, load=False)
    schedule.resolve_lr(args, run.world_size)
    model = setup_fn(args, model, num_classes).model  # the head the script builds (linear probing: BatchNorm + linear)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        if ("head.1.weight" in weights) != ("head.1.weight" in model.state_dict()):
            script = "main_linprobe.py" if "head.1.weight" in weights else "main_finetune.py"
            raise CheckpointError(f"{path}: its head is another script's (BatchNorm + linear head: linear probing); "
                                  f"evaluate it with {script}") from None
        raise CheckpointError(f"{path}: does not fit {args.model} at {args.input_size} px "
                              f"({first_line(e, last=True)})") from None
    model.to(run.device)
    epoch = state.get("epoch")
    distributed.main_print(f"eval: the whole classifier from {path} ({args.model}, {num_classes} classes, head included, "
                           f"input {args.input_size} px" + (f", {epoch + 1} epochs trained" if isinstance(epoch, int) else "") + ")")
    metrics, confusion = engine_finetune.evaluate(model, loaders.eval_loader(val_set, args, run), run, num_classes)
    engine_finetune.report(metrics, len(val_set), "eval")
    if run.is_main:
        result = {**metrics, "checkpoint": str(path), "test_path": str(args.test_path), "images": len(val_set),
                  "input_size": args.input_size, "class_names": class_names}
        best_effort(run.output_dir / "eval_metrics.json", lambda: (run.output_dir / "eval_metrics.json").write_text(json.dumps(result, indent=2)))
        title = f"{args.model}: top-1 {metrics['acc1']:.1f}% on {len(val_set)} images of {Path(args.test_path).name}"
        best_effort(run.output_dir / "confusion_matrix_eval.png", lambda: figures.save_confusion_png(
            confusion, class_names, run.output_dir / "confusion_matrix_eval.png", title))
        distributed.main_print(f"eval outputs: {run.output_dir}")


if __name__ == "__main__":
    run_entry_point(main, config.parse_args(get_args_parser()))
