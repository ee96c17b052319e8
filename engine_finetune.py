"""Classification: the runs of fine-tuning and linear probing (``train_classifier``; ``evaluate_classifier`` for
``--eval``), each script's recipe (``finetune_recipe``, ``linprobe_recipe``), evaluation over the whole evaluation set,
and frozen-feature caching."""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from timm.data import Mixup, create_transform
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torchvision.transforms import v2

from model_loading import build_classifier, classifier_name
from util import config
from util.config import Bands, Flags
from util.data import datasets, loaders, transforms
from util.data.loaders import SampleDataset
from util.errors import CheckpointError, NonFiniteOutputError, UsageError, first_line
from util.eval import figures
from util.eval.inference import infer
from util.files import best_effort
from util.run import checkpoint, logger, loop, process, schedule
from util.run.distributed import main_print
from util.run.lars import LARS
from util.run.process import Run
from util.weights import layouts


@dataclass
class Recipe:
    """What a classification script decides; the rest of the run is shared (``train_classifier``).

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


# A script's recipe: (flags, how files become inputs, input size, the classifier, class count, peak lr) -> Recipe.
RecipeFn = Callable[[Flags, Bands, int, nn.Module, int, float], Recipe]


def finetune_recipe(
    flags: Flags, bands: Bands, input_size: int, model: nn.Module, num_classes: int, lr: float
) -> Recipe:
    """Fine-tuning (``main_finetune.py``): all parameters train; AdamW with layer-wise LR decay; mixup / cutmix with
    soft-target cross-entropy (MAE's ``main_finetune.py``).

    Raises:
        UsageError: an odd batch with mixup / cutmix; RGB-only augmentation for other data (``finetune_transform``).
    """
    mixing = flags.mixup > 0 or flags.cutmix > 0 or flags.cutmix_minmax is not None
    if mixing and flags.batch_size % 2:
        raise UsageError(f"--batch_size {flags.batch_size}: mixup/cutmix need an even batch (or --mixup 0 --cutmix 0)")
    mixup = (
        Mixup(
            mixup_alpha=flags.mixup,
            cutmix_alpha=flags.cutmix,
            cutmix_minmax=flags.cutmix_minmax,
            prob=flags.mixup_prob,
            switch_prob=flags.mixup_switch_prob,
            mode=flags.mixup_mode,
            label_smoothing=flags.smoothing,
            num_classes=num_classes,
        )
        if mixing
        else None
    )
    if mixing:
        criterion = SoftTargetCrossEntropy()
    elif flags.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(flags.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    optimizer = create_optimizer_v2(
        model, "adamw", lr=lr, weight_decay=flags.weight_decay, layer_decay=flags.layer_decay, fused=True
    )
    return Recipe(model, model, optimizer, criterion, finetune_transform(flags, bands, input_size), mixup)


def finetune_transform(flags: Flags, bands: Bands, input_size: int) -> Callable:
    """8-bit RGB: timm's ``create_transform`` (RandomResizedCrop scale 0.25-1, flips, RandAugment ``--aa`` or colour
    jitter, random erasing), as upstream's flags describe. Other band counts / bit depths (``Bands.raster``):
    RandAugment and colour jitter are RGB-only operations (hue, solarize, PIL colour enhancement), so they are off:
    the raster crop + flips (``transforms.build_raster_transform``), then timm's random erasing, which works on any
    band count.

    Raises:
        UsageError: ``--aa`` (other than none) or ``--color_jitter`` given for raster data.
    """
    policy = (
        flags.aa if flags.aa is not None else "none" if bands.raster else "rand-m9-mstd0.5-inc1"
    )  # upstream's for RGB
    if not bands.raster:
        return create_transform(
            input_size,
            is_training=True,
            scale=(0.25, 1.0),
            hflip=0.5,
            vflip=0.5,
            interpolation="bicubic",
            auto_augment=None if policy == "none" else policy,
            color_jitter=flags.color_jitter,
            re_prob=flags.reprob,
            re_mode=flags.remode,
            re_count=flags.recount,
            mean=bands.mean,
            std=bands.std,
        )
    for flag, value in (("aa", None if policy == "none" else policy), ("color_jitter", flags.color_jitter)):
        if value is not None:
            raise UsageError(
                f"--{flag} {value}: RandAugment and colour jitter are RGB-only; leave them out for "
                f"{bands.in_chans}-band / non-8-bit data (crops, flips, random erasing, mixup and cutmix still apply)"
            )
    main_print(
        f"{bands.in_chans}-band data: RandAugment and colour jitter off (RGB-only); crops, flips, "
        f"random erasing (p {flags.reprob}), mixup / cutmix as set"
    )
    erase = RandomErasing(flags.reprob, mode=flags.remode, max_count=flags.recount, device="cpu")
    return v2.Compose([transforms.build_raster_transform(True, input_size, bands.mean, bands.std), erase])


def linprobe_head(model: nn.Module) -> nn.Module:
    """Linear probing's classifier: the head becomes BatchNorm1d(affine=False) + Linear (MAE's ``main_linprobe.py``),
    and only it trains. Returns ``model``."""
    model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head).to(
        model.head.weight.device
    )
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("head.")
    return model


def linprobe_recipe(
    flags: Flags, bands: Bands, input_size: int, model: nn.Module, num_classes: int, lr: float
) -> Recipe:
    """Linear probing (``main_linprobe.py``): only the head trains (``linprobe_head``), with LARS (MAE's
    ``main_linprobe.py``); with ``--no_aug`` on the frozen encoder's features computed once."""
    model = linprobe_head(model)
    optimizer = LARS(model.head.parameters(), lr=lr, weight_decay=flags.weight_decay)
    transform = transforms.image_transform(bands, input_size, is_train=not flags.no_aug)
    return Recipe(
        model,
        model.head if flags.no_aug else model,
        optimizer,
        nn.CrossEntropyLoss(),
        transform,
        cache_features=flags.no_aug,
    )


def train_classifier(flags: Flags, bands: Bands, recipe_fn: RecipeFn, drop_path: float = 0.0) -> None:
    """Train a classifier head (and, for fine-tuning, the encoder) on ``--train_path``, evaluating on ``--test_path``
    every epoch; checkpoints (last, best, every ``--save_every``), ``log.txt``, TensorBoard and confusion matrices go
    to ``--output_dir``.

    Args:
        bands: How files become inputs (``config.resolve_bands``).
        recipe_fn: The script's recipe (``finetune_recipe``, ``linprobe_recipe``).
        drop_path: Stochastic depth rate of the encoder (fine-tuning's ``--drop_path``).

    Raises:
        UsageError, DataError, CheckpointError: one line naming the flag or file.
    """
    input_size = flags.input_size or config.DEFAULT_INPUT_SIZE
    test_path = config.evaluation_path(flags.train_path, flags.test_path)
    checkpoint.check_output_dir(flags.output_dir, flags.resume, flags.overwrite)
    run = process.setup_run(flags.device, flags.amp, flags.seed, flags.output_dir, flags.dist_timeout)
    train_set = datasets.build_dataset(
        flags.train_path,
        flags.dataset_type,
        bands=bands,
        skip_bad=flags.skip_bad_images,
        draft_size=transforms.draft_size_for(True, input_size),
    )
    train_set, val_set, origin = datasets.held_out(
        train_set,
        test_path,
        flags.val_fraction,
        flags.seed,
        transforms.image_transform(bands, input_size, False),
        dataset_type=flags.dataset_type,
        bands=bands,
        draft_size=transforms.draft_size_for(False, input_size),
        skip_bad=flags.skip_bad_images,
    )
    main_print(f"data: {origin}")
    class_names = datasets.check_labels(train_set, [val_set], flags.nb_classes)
    num_classes = len(class_names)

    model, _ = build_classifier(
        num_classes,
        finetune=flags.finetune,
        model=flags.model,
        input_size=input_size,
        patch_size=flags.patch_size,
        bands=bands,
        global_pool=flags.global_pool,
        drop_path=drop_path,
        head_init_std=flags.head_init_std,
    )
    model.to(run.device)
    plan = config.training_schedule(flags, run.world_size)
    recipe = recipe_fn(flags, bands, input_size, model, num_classes, plan.lr)
    train_set.transform = recipe.train_transform
    record = config.run_record(
        flags,
        **bands.record(),
        input_size=input_size,
        patch_size=model.patch_embed.patch_size[0],
        nb_classes=num_classes,
        lr=plan.lr,
        lr_given=flags.lr,
        world_size=run.world_size,
    )
    scaler = loop.grad_scaler(run)
    start_epoch, start_step, resumed = checkpoint.resume(
        flags.resume, record, run, model, recipe.optimizer, scaler, flags.start_epoch, flags.allow_changed_flags
    )
    logger.append_log(
        run,
        {
            "run_start": datetime.datetime.now().isoformat(timespec="seconds"),
            "resumed_from": str(resumed.get("path")) if resumed else None,
            "start_epoch": start_epoch,
        },
    )

    reading = config.loading(flags)
    if recipe.cache_features:  # the encoder is final now (resumed or loaded): its features never change
        main_print("no augmentation: computing the frozen encoder's features once, then training the head on them")
        train_set = FeatureDataset(*extract_features(model, loaders.eval_loader(train_set, reading, run), run))
        val_set = FeatureDataset(*extract_features(model, loaders.eval_loader(val_set, reading, run), run))
        reading = dataclasses.replace(reading, num_workers=0)  # features are in memory already
    train_loader, sampler = loaders.train_loader(train_set, reading, run)
    val_loader = loaders.eval_loader(val_set, reading, run)
    steps_per_epoch = len(train_loader)
    scheduler = schedule.lr_scheduler(recipe.optimizer, plan, steps_per_epoch)
    best_acc1 = resumed.get("best_acc1", -1.0)  # below any accuracy: the first epoch writes checkpoint-best
    writer = logger.start_logs(run, flags, flags.log_dir)
    eval_model = recipe.trainable if recipe.cache_features else model

    main_print(
        f"{sum(p.numel() for p in recipe.trainable.parameters() if p.requires_grad):,} trainable parameters, "
        f"{len(train_set)} training / {len(val_set)} evaluation images, {num_classes} classes, "
        f"{steps_per_epoch} steps/epoch, lr {plan.lr:.3e}, device {run.device}, autocast "
        f"{run.amp_dtype or 'off (fp32)'}"
    )
    train_model = loop.distribute(recipe.trainable, run, flags.attention, flags.compile)
    try:
        for epoch, first_step in loop.epochs(plan, sampler, start_epoch, start_step, run, steps_per_epoch):
            train_stats = loop.train_supervised_epoch(
                train_model,
                recipe.criterion,
                train_loader,
                recipe.optimizer,
                scheduler,
                scaler,
                run,
                plan,
                epoch,
                steps_per_epoch,
                writer,
                first_step,
                recipe.mixup,
            )
            metrics, confusion = evaluate(eval_model, val_loader, run, num_classes)
            improved = metrics["acc1"] > best_acc1
            best_acc1 = max(best_acc1, metrics["acc1"])
            report(metrics, len(val_set), f"epoch {epoch}", best_acc1)
            log = {**{f"train_{k}": v for k, v in train_stats.items()}, **{f"test_{k}": v for k, v in metrics.items()}}
            loop.end_epoch(
                run,
                epoch,
                model,
                recipe.optimizer,
                scaler,
                record,
                log,
                writer=writer,
                improved=improved,
                save_every=flags.save_every,
                best_acc1=best_acc1,
                class_names=class_names,
            )
            if run.is_main:
                title = f"epoch {epoch}: top-1 {metrics['acc1']:.1f}% on {len(val_set)} images of {evaluated(flags)}"
                for name in ("last", "best") if improved else ("last",):
                    path = run.output_dir / f"confusion_matrix_{name}.png"
                    best_effort(path, partial(figures.save_confusion_png, confusion, class_names, path, title))
    except process.Preempted as stop:
        checkpoint.save_preempted(
            run, stop, model, recipe.optimizer, scaler, record, best_acc1=best_acc1, class_names=class_names
        )
        return
    if writer is not None:
        writer.close()
    main_print(f"outputs: {run.output_dir} (checkpoint-best.pth, checkpoint-last.pth, log.txt, confusion matrices)")


def evaluate_classifier(flags: Flags, bands: Bands, head_fn: Callable[[nn.Module], nn.Module] | None = None) -> None:
    """``--eval``: the accuracy of the classifier a checkpoint holds, head included (``head_fn``: the script's head,
    e.g. ``linprobe_head``; None: the classifier's own linear head).

    The checkpoint is ``--resume`` (a path, or ``auto``: the newest in ``--output_dir``) or ``--finetune``.
    Architecture, patch size, pooling, class count and class names come from it; ``--input_size`` too unless
    given. Outputs go to ``--output_dir/eval/``, never over a training run's files. Only the evaluation set
    is read, so ``--batch_size`` need not fit the training set.

    Raises:
        UsageError: no checkpoint given, or ``--resume auto`` found none.
        CheckpointError: no classification head in it (a freshly initialised head would report chance
            accuracy), non-finite weights, or weights that do not fit.
    """
    path, state = checkpoint.checkpoint_to_evaluate(flags.resume, flags.finetune, flags.output_dir, "classifier")
    weights = checkpoint.model_state(state)
    head = next((weights[k] for k in ("head.weight", "head.1.weight") if k in weights), None)
    if head is None or head.ndim != 2:
        raise CheckpointError(
            f"{path}: holds no classification head (a pretraining checkpoint or an encoder export?); "
            "--eval would report the accuracy of a freshly initialised head: fine-tune or linear-probe it first"
        )
    non_finite = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if non_finite:
        raise CheckpointError(
            f"{path}: non-finite values (NaN/inf) in {layouts.summarise(non_finite, 3)}; refusing to evaluate it"
        )
    saved = state.get("args") or {}
    checkpoint.check_band_flags(saved, bands, path)
    num_classes = head.shape[0]
    if flags.nb_classes is not None and flags.nb_classes != num_classes:
        raise UsageError(f"--nb_classes {flags.nb_classes}: {path} holds a head of {num_classes} classes")
    encoder = layouts.read_encoder(path)
    input_size = flags.input_size or saved.get("input_size") or encoder.shape.input_size
    model_name = flags.model or saved.get("model") or classifier_name(encoder)
    output_dir = Path(flags.output_dir) / "eval"
    run = process.setup_run(flags.device, flags.amp, flags.seed, output_dir, flags.dist_timeout)
    known_names = state.get("class_names")
    if known_names is not None and len(known_names) != num_classes:
        raise CheckpointError(f"{path}: {len(known_names)} class names for a head of {num_classes} classes")
    if (
        known_names is None and flags.train_path and Path(flags.train_path).is_dir()
    ):  # older checkpoints: the training tree's folders
        known_names = datasets.scan_image_folder(Path(flags.train_path))[1]
    test_path = config.evaluation_path(flags.train_path, flags.test_path)
    reading = dict(
        bands=bands,
        draft_size=transforms.draft_size_for(False, input_size),
        skip_bad=flags.skip_bad_images,
        classes=known_names,
    )
    transform = transforms.image_transform(bands, input_size, False)
    if test_path == config.SPLIT:  # the images the run held out: the same seed and fraction give the same split
        for name in ("seed", "val_fraction"):
            if saved.get("test_path") == config.SPLIT and saved.get(name, getattr(flags, name)) != getattr(flags, name):
                raise UsageError(
                    f"--test_path split: {path} was trained with --{name} {saved[name]}, which chose its held-out "
                    f"images; give --{name} {saved[name]}"
                )
        train = datasets.build_dataset(flags.train_path, flags.dataset_type, transform, **reading)
        val_set = datasets.split_dataset(train, flags.val_fraction, flags.seed)[1]
    else:
        val_set = datasets.build_dataset(test_path, flags.dataset_type, transform, **reading)
    if isinstance(val_set, datasets.ImageDataset) and val_set.classes and known_names is None:
        raise CheckpointError(
            f"{path}: holds no class names, so the folders of {test_path} cannot be matched to its head; "
            "give --train_path (the training tree)"
        )
    class_names = datasets.check_labels(None, [val_set], num_classes, known_names)

    model, _ = build_classifier(
        num_classes,
        finetune=flags.finetune,
        model=model_name,
        input_size=input_size,
        patch_size=flags.patch_size,
        bands=bands,
        global_pool="fc_norm.weight" in weights,
        head_init_std=flags.head_init_std,
        weights=encoder,
        load=False,
    )
    if head_fn is not None:
        model = head_fn(model)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        if ("head.1.weight" in weights) != ("head.1.weight" in model.state_dict()):
            script = "main_linprobe.py" if "head.1.weight" in weights else "main_finetune.py"
            raise CheckpointError(
                f"{path}: its head is another script's (BatchNorm + linear head: linear probing); "
                f"evaluate it with {script}"
            ) from None
        raise CheckpointError(
            f"{path}: does not fit {model_name} at {input_size} px ({first_line(e, last=True)})"
        ) from None
    model.to(run.device)
    epoch = state.get("epoch")
    main_print(
        f"eval: the whole classifier from {path} ({model_name}, {num_classes} classes, head included, "
        f"input {input_size} px"
        + (f", {epoch + 1} epoch{'s' if epoch else ''} trained" if isinstance(epoch, int) else "")
        + ")"
    )
    metrics, confusion = evaluate(model, loaders.eval_loader(val_set, config.loading(flags), run), run, num_classes)
    report(metrics, len(val_set), "eval")
    if run.is_main:
        result = {
            **metrics,
            "checkpoint": str(path),
            "test_path": str(test_path),
            "evaluated": evaluated(flags),
            "images": len(val_set),
            "input_size": input_size,
            "class_names": class_names,
        }
        best_effort(
            run.output_dir / "eval_metrics.json",
            lambda: (run.output_dir / "eval_metrics.json").write_text(json.dumps(result, indent=2)),
        )
        title = f"{model_name}: top-1 {metrics['acc1']:.1f}% on {len(val_set)} images of {evaluated(flags)}"
        best_effort(
            run.output_dir / "confusion_matrix_eval.png",
            lambda: figures.save_confusion_png(
                confusion, class_names, run.output_dir / "confusion_matrix_eval.png", title
            ),
        )
        main_print(f"eval outputs: {run.output_dir}")


class FeatureDataset(SampleDataset):
    """Pre-computed features with labels; accepts the (index, seed) keys of ``SeededSampler``."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        return self.features[index], self.labels[index]


def extract_features(model: nn.Module, loader, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features [N, D] (what the head sees) and labels [N] of every sample, on the CPU, in dataset order."""
    model.eval()
    outputs, labels = infer(
        lambda images: {"features": model.forward_head(model.forward_features(images), pre_logits=True)},
        loader,
        run.device,
        "frozen features",
    )
    return outputs["features"], labels


def evaluate(model: nn.Module, loader, run: Run, num_classes: int) -> tuple[dict[str, float], torch.Tensor]:
    """Top-1, top-5 (5+ classes), macro-F1 (over the classes present in the evaluation set) and mean loss over
    the whole evaluation set, and its confusion matrix.

    Returns:
        (metrics in % (loss: nats), confusion [num_classes, num_classes], rows = true class).
    """
    model.eval()
    outputs, labels = infer(lambda images: {"logits": model(images)}, loader, run.device, "evaluation")
    logits = outputs["logits"]
    if not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits)).any(1).nonzero()[:, 0]
        raise NonFiniteOutputError(
            f"evaluation: the model's logits are NaN/inf for {len(bad)} of {len(labels)} images "
            f"(first: image {bad[0].item()} of the evaluation set); refusing to report an accuracy"
        )
    confusion = torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2).reshape(
        num_classes, num_classes
    )
    true_positives = confusion.diagonal().double()
    precision = true_positives / confusion.sum(0).clamp(min=1)
    recall = true_positives / confusion.sum(1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(precision))
    present = confusion.sum(1) > 0
    metrics = {
        "acc1": 100.0 * true_positives.sum().item() / len(labels),
        "macro_f1": 100.0 * f1[present].mean().item(),
        "loss": nn.functional.cross_entropy(logits, labels).item(),
    }
    if num_classes >= 5:
        top5 = logits.topk(5, dim=1).indices.eq(labels[:, None]).any(1)
        metrics["acc5"] = 100.0 * top5.double().mean().item()
    return metrics, confusion


def evaluated(flags: Flags) -> str:
    """What a classification run evaluates on, for titles and records: the evaluation set's file name, or the
    held-out share of the training set (``--test_path split``)."""
    test_path = config.evaluation_path(flags.train_path, flags.test_path)
    if test_path == config.SPLIT:
        return f"{flags.val_fraction:.0%} of {Path(flags.train_path).name} held out (seed {flags.seed})"
    return Path(test_path).name


def report(metrics: dict[str, float], count: int, what: str, best: float | None = None) -> None:
    """Print one line of evaluation metrics (rank 0)."""
    line = f"{what}: {count} images, top-1 {metrics['acc1']:.2f}%"
    if "acc5" in metrics:
        line += f", top-5 {metrics['acc5']:.2f}%"
    line += f", macro-F1 {metrics['macro_f1']:.2f}%, loss {metrics['loss']:.4f}"
    if best is not None:
        line += f" (best top-1 {best:.2f}%)"
    main_print(line)
