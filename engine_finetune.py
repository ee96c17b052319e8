"""Fine-tuning and linear probing: the flags, the run and the evaluation that both scripts share.

``main_finetune.py`` and ``main_linprobe.py`` differ only in the ``Setup`` they build: the model's head,
which parameters train, the optimiser, the loss and the training transform.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import models_vit  # noqa: E402
from util import checkpoint, config, datasets, engine, misc  # noqa: E402


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


def get_args_parser(description: str, *, global_pool: bool, head_init_std: float, **defaults) -> argparse.ArgumentParser:
    """The flags both scripts take; ``defaults`` are each script's upstream values."""
    parser = argparse.ArgumentParser(description)
    config.add_optimisation_args(parser, **defaults)
    config.add_data_args(parser, input_size=224, train_path=str(datasets.DEFAULT_TRAIN_CSV), patch_size=None)
    config.add_runtime_args(parser, output_dir="./output_dir")
    group = parser.add_argument_group("classification")
    group.add_argument("--finetune", default="", metavar="PATH",
                       help="pretrained weights: our or upstream's pretraining checkpoint (either layout), or a timm encoder export")
    group.add_argument("--model", default=None, help="vit_{tiny,small,base,large,huge}_patch16 or vit_huge_patch14 "
                                                     "(default: the architecture of --finetune)")
    group.add_argument("--test_path", default=str(datasets.DEFAULT_VAL_CSV), help="evaluation data (CSV, ImageFolder)")
    group.add_argument("--nb_classes", type=int, default=None, help="classes (default: from the training labels)")
    group.add_argument("--global_pool", dest="global_pool", action="store_true", default=global_pool,
                       help="mean of the patch tokens + fc_norm")
    group.add_argument("--cls_token", dest="global_pool", action="store_false", help="the cls token after norm")
    group.add_argument("--head_init_std", type=float, default=head_init_std, help="std of the fresh head's initialisation")
    group.add_argument("--eval", action="store_true", help="only evaluate (--resume or --finetune weights) and exit")
    group.add_argument("--save_every", type=int, default=0, help="also keep checkpoint-{epoch}.pth every N epochs")
    group.add_argument("--wandb_project", default=None, help="ignored (upstream flag): logs go to TensorBoard")
    return parser


def check_args(args: argparse.Namespace) -> None:
    config.check_common_args(args)
    if args.model is not None and args.model not in models_vit.CLASSIFIER_PRESETS:
        raise misc.UsageError(f"--model {args.model}: unknown; choose one of {', '.join(models_vit.CLASSIFIER_PRESETS)}")


class FeatureDataset(torch.utils.data.Dataset):
    """Pre-computed features with labels; accepts the (index, seed) keys of ``SeededSampler``."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        return self.features[index], self.labels[index]


def extract_features(model: nn.Module, loader, run: engine.Run) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (what the head sees) and labels of every sample, on the CPU, in dataset order."""
    model.eval()
    outputs, labels = engine.infer(
        lambda images: {"features": model.forward_head(model.forward_features(images), pre_logits=True)},
        loader, run.device, run.amp_dtype,
    )
    return outputs["features"], labels


def evaluate(model: nn.Module, loader, run: engine.Run, num_classes: int) -> tuple[dict[str, float], torch.Tensor]:
    """Top-1, top-5 (5+ classes), macro-F1 and mean loss over the whole evaluation set, and its confusion matrix.

    Returns:
        (metrics, confusion [num_classes, num_classes], rows = true class).
    """
    model.eval()
    outputs, labels = engine.infer(lambda images: {"logits": model(images)}, loader, run.device, run.amp_dtype)
    logits = outputs["logits"]
    confusion = torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2).reshape(num_classes, num_classes)
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


def save_confusion_png(confusion: torch.Tensor, class_names: list[str], path: Path, title: str) -> None:
    size = max(4.0, 0.45 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set(xticks=range(len(class_names)), yticks=range(len(class_names)), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(class_names, rotation=90)
    ax.set_yticklabels(class_names)
    if len(class_names) <= 30:
        threshold = confusion.max().item() / 2
        for (row, col), count in zip(torch.cartesian_prod(torch.arange(len(class_names)), torch.arange(len(class_names))).tolist(),
                                     confusion.flatten().tolist()):
            ax.text(col, row, count, ha="center", va="center", fontsize=8, color="white" if count > threshold else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def class_names_of(dataset: datasets.ImageDataset, num_classes: int) -> list[str]:
    return dataset.classes if len(dataset.classes) == num_classes else [str(i) for i in range(num_classes)]


def build_classifier(args: argparse.Namespace, num_classes: int) -> tuple[nn.Module, checkpoint.EncoderWeights | None]:
    """The classifier with ``--finetune``'s encoder loaded (every encoder tensor, or an error)."""
    weights = checkpoint.read_encoder(args.finetune) if args.finetune else None
    name = args.model or (weights.classifier_name if weights else None)
    if name is None:
        raise misc.UsageError("give --finetune PATH (pretrained weights) or --model NAME (random initialisation)")
    args.patch_size = args.patch_size or (weights.patch_size if weights else models_vit.CLASSIFIER_PRESETS[name][1])
    if args.input_size % args.patch_size:
        raise misc.UsageError(f"--input_size {args.input_size} is not divisible by --patch_size {args.patch_size}")
    model = models_vit.create_classifier(
        name, num_classes, img_size=args.input_size, patch_size=args.patch_size, in_chans=args.in_chans,
        global_pool=args.global_pool, drop_path_rate=getattr(args, "drop_path", 0.0),
        norm_style=weights.norm_style if weights else "pre", head_init_std=args.head_init_std,
    )
    if weights is None:
        misc.main_print(f"no --finetune: {name} starts from random initialisation")
    else:
        misc.main_print(checkpoint.load_encoder(model, weights))
    return model, weights


def main(args: argparse.Namespace, setup_fn: SetupFn) -> None:
    """Train a classifier head (and, for fine-tuning, the encoder), evaluating every epoch."""
    check_args(args)
    run = engine.setup_run(args)
    train_set = datasets.build_dataset(args.train_path, args.dataset_type, draft_size=datasets.draft_size_for(True, args.input_size),
                                       skip_bad=args.skip_bad_images)
    val_set = datasets.build_dataset(args.test_path, args.dataset_type, datasets.build_transform(False, args.input_size, args.mean, args.std),
                                     datasets.draft_size_for(False, args.input_size), args.skip_bad_images)
    num_classes = args.nb_classes or max(max(train_set.targets), max(val_set.targets)) + 1
    if min(train_set.targets) < 0 or max(train_set.targets) >= num_classes:
        raise datasets.DataError(f"{args.train_path}: labels must lie in 0..{num_classes - 1} (--nb_classes {num_classes})")
    args.nb_classes = num_classes

    model, _ = build_classifier(args, num_classes)
    model.to(run.device)
    engine.resolve_lr(args, run)
    setup = setup_fn(args, model, num_classes)
    train_set.transform = setup.train_transform
    class_names = class_names_of(val_set, num_classes)
    scaler = engine.grad_scaler(run)
    start_epoch, start_step, resumed = engine.resume(args, run, model, setup.optimizer, scaler)

    if setup.cache_features:  # the encoder is final now (resumed or loaded): its features never change
        misc.main_print("no augmentation: computing the frozen encoder's features once, then training the head on them")
        train_set = FeatureDataset(*extract_features(model, engine.eval_loader(train_set, args, run), run))
        val_set = FeatureDataset(*extract_features(model, engine.eval_loader(val_set, args, run), run))
        args.num_workers = 0  # features are in memory already
    train_loader, sampler = engine.train_loader(train_set, args, run)
    val_loader = engine.eval_loader(val_set, args, run)
    steps_per_epoch = len(train_loader)
    scheduler = engine.lr_scheduler(setup.optimizer, args, steps_per_epoch)
    best_acc1 = resumed.get("best_acc1", -1.0)  # below any accuracy: the first epoch writes checkpoint-best
    writer = engine.summary_writer(run, args)
    eval_model = setup.trainable if setup.cache_features else model

    if args.eval:
        metrics, confusion = evaluate(eval_model, val_loader, run, num_classes)
        report(metrics, len(val_set), run, "eval")
        if run.is_main:
            (run.output_dir / "eval_metrics.json").write_text(json.dumps(metrics, indent=2))
            save_confusion_png(confusion, class_names, run.output_dir / "confusion_matrix_eval.png", f"top-1 {metrics['acc1']:.1f}%")
        return

    misc.main_print(
        f"{sum(p.numel() for p in setup.trainable.parameters() if p.requires_grad):,} trainable parameters, "
        f"{len(train_set)} training / {len(val_set)} evaluation images, {num_classes} classes, "
        f"{steps_per_epoch} steps/epoch, lr {args.lr:.3e}, device {run.device}, autocast {run.amp_dtype or 'off (fp32)'}"
    )
    train_model = engine.distribute(setup.trainable, run, args)

    def loss_fn(samples: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if setup.mixup is not None:
            samples, targets = setup.mixup(samples, targets)
        return {"loss": setup.criterion(train_model(samples), targets)}

    for epoch in range(start_epoch, args.epochs):
        first_step = start_step if epoch == start_epoch else 0
        sampler.set_epoch(epoch)
        sampler.set_start(first_step * args.batch_size)
        try:
            train_stats = engine.train_one_epoch(train_model, loss_fn, (), train_loader, setup.optimizer, scheduler, scaler,
                                                 run, epoch, steps_per_epoch, args, writer, first_step)
        except engine.Preempted as stop:
            engine.save_preempted(run, stop, model, setup.optimizer, scaler, args, best_acc1=best_acc1)
            return
        metrics, confusion = evaluate(eval_model, val_loader, run, num_classes)
        improved = metrics["acc1"] > best_acc1
        best_acc1 = max(best_acc1, metrics["acc1"])
        report(metrics, len(val_set), run, f"epoch {epoch}", best_acc1)
        engine.save_epoch(run, "checkpoint-last.pth", model, setup.optimizer, scaler, epoch, args, best_acc1=best_acc1)
        if improved:
            engine.save_epoch(run, "checkpoint-best.pth", model, setup.optimizer, scaler, epoch, args, best_acc1=best_acc1)
        if args.save_every and (epoch + 1) % args.save_every == 0:
            engine.save_epoch(run, f"checkpoint-{epoch}.pth", model, setup.optimizer, scaler, epoch, args, best_acc1=best_acc1)
        engine.append_log(run, {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                                **{f"test_{k}": v for k, v in metrics.items()}})
        if run.is_main:
            for name, value in metrics.items():
                writer.add_scalar(f"test/{name}", value, epoch)
            title = f"epoch {epoch}: top-1 {metrics['acc1']:.1f}%"
            save_confusion_png(confusion, class_names, run.output_dir / "confusion_matrix_last.png", title)
            if improved:
                save_confusion_png(confusion, class_names, run.output_dir / "confusion_matrix_best.png", title)
    if writer is not None:
        writer.close()


def report(metrics: dict[str, float], count: int, run: engine.Run, what: str, best: float | None = None) -> None:
    line = f"{what}: {count} images, top-1 {metrics['acc1']:.2f}%"
    if "acc5" in metrics:
        line += f", top-5 {metrics['acc5']:.2f}%"
    line += f", macro-F1 {metrics['macro_f1']:.2f}%, loss {metrics['loss']:.4f}"
    if best is not None:
        line += f" (best top-1 {best:.2f}%)"
    misc.main_print(line)
