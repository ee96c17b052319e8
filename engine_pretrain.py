"""Pretraining epochs and figures; the step loop itself is ``util.engine.train_one_epoch``."""
from __future__ import annotations

import torch

from util import engine
from util.visualize import reconstruction_grid, save_png


def train_one_epoch(model: torch.nn.Module, mae: torch.nn.Module, loader, optimizer, scheduler, scaler,
                    run: engine.Run, epoch: int, steps_per_epoch: int, args, writer=None, start_step: int = 0,
                    device_transform=None) -> dict[str, float]:
    """One epoch of Cross-Scale MAE pretraining.

    Args:
        model: What trains (the ``CrossScaleMAE``, possibly DDP-wrapped or compiled).
        mae: The unwrapped ``CrossScaleMAE`` (for its loss names).
        loader: Yields (images, labels); labels are ignored.
        device_transform: Augmentation of each batch on the device (packed uint8 datasets).
    """
    def loss_fn(samples: torch.Tensor, _labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return model(samples, mask_ratio=args.mask_ratio)

    return engine.train_one_epoch(model, loss_fn, mae.loss_names, loader, optimizer, scheduler, scaler, run,
                                  epoch, steps_per_epoch, args, writer, start_step, device_transform)


def save_reconstruction(mae, images: torch.Tensor, args, run: engine.Run, epoch: int, writer=None) -> None:
    """Write ``plots/reconstruction_epochNNNN.png`` (and the same figure to TensorBoard)."""
    figure = reconstruction_grid(mae, images, args.mean, args.std)
    save_png(figure, run.output_dir / "plots" / f"reconstruction_epoch{epoch:04d}.png")
    if writer is not None:
        writer.add_image("reconstruction", figure, epoch)
