"""Classification: one training epoch, evaluation over the whole evaluation set, and frozen-feature caching
(shared by fine-tuning and linear probing)."""
from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.tensorboard import SummaryWriter

from util.run.distributed import main_print
from util.errors import NonFiniteError
from util.eval.inference import infer
from util.run.process import Run
from util.run.loop import StepLoop


def train_one_epoch(model: nn.Module, criterion: nn.Module, loader, optimizer: torch.optim.Optimizer, scheduler,
                    scaler: torch.amp.GradScaler | None, run: Run, epoch: int, steps_per_epoch: int,
                    args: argparse.Namespace, writer: SummaryWriter | None = None, start_step: int = 0,
                    mixup: Callable | None = None) -> dict[str, float]:
    """One epoch of classification training (also per-pixel: segmentation); returns the mean loss.

    Args:
        model: What trains (the classifier, only its head on cached features, or a segmenter), possibly DDP-wrapped.
        criterion: Loss on (logits [B, K], targets [B] or soft [B, K]); for segmentation (logits [B, K, H, W],
            masks [B, H, W]).
        loader: Yields (images [B, C, H, W] or features [B, D], labels [B] or masks [B, H, W]).
        mixup: timm ``Mixup`` applied to each batch, or None.

    Raises:
        Preempted: SIGTERM arrived; the update of the current step is done.
        NonFiniteLossError: the loss became NaN or infinite.
    """
    model.train()
    steps = StepLoop(model, optimizer, scheduler, scaler, run, args, epoch, steps_per_epoch, ("loss",), writer, start_step)
    for step, (samples, targets) in enumerate(loader, start=start_step):
        samples = samples.to(run.device, non_blocking=True)
        targets = targets.to(run.device, non_blocking=True)
        with steps.accumulate(step):
            with run.autocast():
                if mixup is not None:
                    samples, targets = mixup(samples, targets)  # targets become soft [B, K]
                loss = criterion(model(samples), targets)
            steps.backward(loss)
        steps.end_step(step, {"loss": loss}, samples.shape[0])
    return steps.epoch_means()


class FeatureDataset(torch.utils.data.Dataset):
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
        loader, run.device, run.amp_dtype, "frozen features",
    )
    return outputs["features"], labels


class NonFiniteOutputError(NonFiniteError):
    """The model's outputs are NaN or infinite: no accuracy can be computed from them."""


def evaluate(model: nn.Module, loader, run: Run, num_classes: int) -> tuple[dict[str, float], torch.Tensor]:
    """Top-1, top-5 (5+ classes), macro-F1 (over the classes present in the evaluation set) and mean loss over
    the whole evaluation set, and its confusion matrix.

    Returns:
        (metrics in % (loss: nats), confusion [num_classes, num_classes], rows = true class).
    """
    model.eval()
    outputs, labels = infer(lambda images: {"logits": model(images)}, loader, run.device, run.amp_dtype, "evaluation")
    logits = outputs["logits"]
    if not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits)).any(1).nonzero()[:, 0]
        raise NonFiniteOutputError(f"evaluation: the model's logits are NaN/inf for {len(bad)} of {len(labels)} images "
                                   f"(first: image {bad[0].item()} of the evaluation set); refusing to report an accuracy")
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


def report(metrics: dict[str, float], count: int, what: str, best: float | None = None) -> None:
    """Print one line of evaluation metrics (rank 0)."""
    line = f"{what}: {count} images, top-1 {metrics['acc1']:.2f}%"
    if "acc5" in metrics:
        line += f", top-5 {metrics['acc5']:.2f}%"
    line += f", macro-F1 {metrics['macro_f1']:.2f}%, loss {metrics['loss']:.4f}"
    if best is not None:
        line += f" (best top-1 {best:.2f}%)"
    main_print(line)
