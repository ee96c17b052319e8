"""Pretraining: one epoch of Cross-Scale MAE, the reconstruction figure, and kNN evaluation during training."""
from __future__ import annotations

import argparse

import torch
from torch.utils.tensorboard import SummaryWriter

import models_cross_scale_mae as models_mae
from util.eval import knn
from util.data.raster_options import split_valid
from util.run.distributed import main_print
from util.files import best_effort
from util.run.process import Run
from util.run.loop import StepLoop
from util.eval.figures import grid_image, reconstruction_columns, save_reconstruction_png


def train_one_epoch(model: torch.nn.Module, loss_names: tuple[str, ...], loader, optimizer: torch.optim.Optimizer,
                    scheduler, scaler: torch.amp.GradScaler | None, run: Run, epoch: int, steps_per_epoch: int,
                    args: argparse.Namespace, writer: SummaryWriter | None = None, start_step: int = 0,
                    device_transform: torch.nn.Module | None = None) -> dict[str, float]:
    """One epoch of Cross-Scale MAE pretraining; returns the mean of each loss term.

    Args:
        model: What trains: the ``CrossScaleMAE``, possibly DDP-wrapped or compiled.
        loss_names: The terms the model reports besides ``loss`` (``CrossScaleMAE.loss_names``).
        loader: Yields (images [B, C, H, W], labels); labels are ignored. Rasters carry a validity band last
            ([B, C + 1, H, W], ``raster_options.split_valid``): no-data pixels are left out of the reconstruction loss.
        steps_per_epoch: Steps of a whole epoch (a resumed one starts at ``start_step``).
        device_transform: Augmentation of each batch on the device (packed uint8 datasets), or None.

    Raises:
        Preempted: SIGTERM arrived; the update of the current step is done.
        NonFiniteLossError: a loss term became NaN or infinite.
    """
    model.train()
    steps = StepLoop(model, optimizer, scheduler, scaler, run, args, epoch, steps_per_epoch, ("loss", *loss_names),
                     writer, start_step)
    for step, (samples, _labels) in enumerate(loader, start=start_step):
        samples = samples.to(run.device, non_blocking=True)  # [B, C, H, W]
        if device_transform is not None:
            samples = device_transform(samples)
        samples, valid = split_valid(samples, args.in_chans)  # valid [B, 1, H, W]: rasters' no-data weights, or None
        with steps.accumulate(step):
            with run.autocast():
                out = model(samples, mask_ratio=args.mask_ratio, valid=valid)  # loss, terms, pred [B, L, p*p*C], mask [B, L]
            steps.backward(out["loss"])
        steps.end_step(step, out, samples.shape[0])
    return steps.epoch_means()


def save_reconstruction(mae: models_mae.CrossScaleMAE, images: torch.Tensor, args: argparse.Namespace, run: Run,
                        epoch: int, writer: SummaryWriter | None = None) -> None:
    """Write ``plots/reconstruction_epochNNNN.png`` (a titled matplotlib figure: a column per original / masked /
    reconstruction of each scale, model and epoch above) and the plain grid to TensorBoard, for ``images`` [B, C, H, W]."""
    raster = getattr(args, "raster", False)  # multispectral / 16-bit: bands shown at +-2 std, --rgb_bands as R G B
    columns, names = reconstruction_columns(mae, images, None if raster else args.mean, None if raster else args.std,
                                            rgb_bands=getattr(args, "rgb_bands", None))
    title = f"{args.model} ({args.input_size} px, patch {args.patch_size}): epoch {epoch}"
    path = run.output_dir / "plots" / f"reconstruction_epoch{epoch:04d}.png"
    best_effort(path, lambda: save_reconstruction_png(columns, names, path, title))
    if writer is not None:
        writer.add_image("reconstruction", grid_image(columns), epoch)


def knn_evaluate(mae: models_mae.CrossScaleMAE, memory, queries, num_classes: int, run: Run, epoch: int,
                 writer: SummaryWriter | None) -> dict[str, float]:
    """Multi-scale kNN top-1 (%) of the encoder as it is now (resize mode, cls token); logged and returned."""
    results = knn.multiscale_accuracies(mae.encoder, mae.encoder_norm, memory, queries, num_classes, run.device, run.amp_dtype)
    mae.train()
    stats = {f"knn_{classifier}_{scale:g}": value for (classifier, scale), value in results.items()}
    main_print(f"epoch {epoch} kNN top-1: " + ", ".join(f"{k[4:]} {v:.1f}%" for k, v in stats.items()))
    if writer is not None:
        for name, value in stats.items():
            writer.add_scalar(f"knn/{name}", value, epoch)
    return stats
