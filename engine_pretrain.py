"""One pretraining epoch: forward both scales, backward, optimiser step, logging."""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Iterable

import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

from util import misc


class NonFiniteLossError(misc.ReportableError):
    """A loss term became NaN or infinite."""


def reduce_means(logger: misc.MetricLogger) -> dict[str, float]:
    """Interval means averaged over ranks: one collective per log line, and every rank sees a bad value."""
    names = sorted(logger.sums)
    values = torch.tensor([float(logger.sums[n]) / logger.counts[n] for n in names], dtype=torch.float64)
    if misc.is_distributed():
        dist.all_reduce(values)
        values /= misc.world_size()
    return dict(zip(names, values.tolist()))


def train_one_epoch(
    model: torch.nn.Module,
    loss_names: Iterable[str],
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    epoch: int,
    steps_per_epoch: int,
    args,
    writer: SummaryWriter | None = None,
    start_step: int = 0,
) -> dict[str, float]:
    """Train for one epoch (from ``start_step`` when resuming inside it) and return the epoch's mean terms.

    The learning rate is set per optimiser update (warm-up + cosine over all updates of the run). Loss values
    stay on the device between log lines, so the loop does not wait for the GPU at every step.

    Raises:
        NonFiniteLossError: naming the term and the steps where the loss became NaN/inf.
    """
    model.train()
    accum_iter = args.accum_iter
    interval, whole_epoch = misc.MetricLogger(), misc.MetricLogger()
    throughput = misc.Throughput(steps_per_epoch - start_step)
    interval_images, first_step = 0, start_step
    grad_norm = torch.zeros(())
    for step, (samples, _) in enumerate(loader, start=start_step):
        if step % accum_iter == 0:
            scheduler.step_update((epoch * steps_per_epoch + step) // accum_iter)
        samples = samples.to(device, non_blocking=True)
        update = (step + 1) % accum_iter == 0 or step + 1 == steps_per_epoch
        sync = model.no_sync() if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not update else nullcontext()
        with sync:
            with misc.autocast(device, amp_dtype):
                out = model(samples, mask_ratio=args.mask_ratio)
            loss = out["loss"] / accum_iter
            (scaler.scale(loss) if scaler else loss).backward()
        if update:
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad or math.inf)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        terms = {name: out[name] for name in ("loss", *loss_names)}
        interval.update(**terms, grad_norm=grad_norm)
        whole_epoch.update(**terms)
        interval_images += samples.shape[0] * misc.world_size()
        if (step + 1) % args.log_every == 0 or step + 1 == steps_per_epoch:
            means = reduce_means(interval)
            bad = [name for name in ("loss", *loss_names) if not math.isfinite(means[name])]
            if bad:
                raise NonFiniteLossError(
                    f"epoch {epoch}, steps {first_step}-{step}: loss term(s) {', '.join(bad)} became "
                    f"{means[bad[-1]]} (lower --blr, try --amp none or --clip_grad, or resume from the last checkpoint)"
                )
            lr = optimizer.param_groups[0]["lr"]
            images_per_s, eta = throughput.tick(step + 1 - start_step, interval_images)
            misc.main_print(
                f"epoch {epoch} [{step + 1}/{steps_per_epoch}] "
                + " ".join(f"{name} {means[name]:.4f}" for name in ("loss", *loss_names))
                + f" lr {lr:.3e} grad_norm {means['grad_norm']:.3f} {images_per_s:.1f} img/s eta {eta}"
            )
            if writer is not None:
                x = int((epoch + (step + 1) / steps_per_epoch) * 1000)  # epoch_1000x: comparable across batch sizes
                for name, value in means.items():
                    writer.add_scalar(f"train/{name}", value, x)
                writer.add_scalar("train/lr", lr, x)
                writer.add_scalar("train/images_per_s", images_per_s, x)
            interval.reset()
            interval_images, first_step = 0, step + 1
    return reduce_means(whole_epoch)
