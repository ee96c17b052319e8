"""What every training task shares around its own step: the epochs of a (possibly resumed) run and what ends each
(``epochs``, ``end_epoch``: stop check, checkpoints, log record, ETA), per step the accumulate / optimiser-update /
SIGTERM / log mechanics (``StepLoop``), the supervised epoch of classification and segmentation, and DDP / compile
wrapping.

A task's epoch stays a loop a reader can hold in their head (``engine_pretrain.train_one_epoch``)::

    steps = StepLoop(...)
    for step, (samples, targets) in enumerate(loader, start=start_step):
        with steps.accumulate(step):
            with run.autocast():
                out = model(samples)
            steps.backward(out["loss"])
        steps.end_step(step, out, len(samples))
    return steps.epoch_means()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from timm.layers import Attention
from timm.scheduler import CosineLRScheduler
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from util.config import Schedule
from util.errors import ReportableError
from util.run import checkpoint, distributed, logger
from util.run.logger import MetricLogger, Throughput
from util.run.process import Preempted, Run, stop_requested


class NonFiniteLossError(ReportableError):
    """A loss term became NaN or infinite."""


def epochs(
    schedule: Schedule, sampler, start_epoch: int, start_step: int, run: Run, steps_per_epoch: int
) -> Iterator[tuple[int, int]]:
    """(epoch, first step) of every epoch still to train; a resumed run starts mid-epoch at ``start_step``.

    A stop (SIGTERM) that arrived during an epoch's last step lets that epoch complete (its evaluation,
    checkpoint and ``log.txt`` record: ``end_epoch``) and raises ``Preempted(next epoch, 0)`` here, before the
    next one.

    Positions ``sampler`` (a ``util.data.loaders.SeededSampler``) so that the epoch's batches are the ones an
    uninterrupted run would see. Prints after each epoch (its body included: evaluation, checkpoints, figures) its
    time and the whole run's ETA, and the total time at the end (``logger.RunClock``).
    """
    clock = logger.RunClock(steps_per_epoch, schedule.epochs, start_epoch, start_step)
    epoch = start_epoch - 1
    for epoch in range(start_epoch, schedule.epochs):
        if epoch > start_epoch and stop_requested(run):
            raise Preempted(epoch, 0)
        first_step = start_step if epoch == start_epoch else 0
        sampler.set_epoch(epoch)
        sampler.set_start(first_step * schedule.batch_size)
        yield epoch, first_step
        distributed.main_print(clock.end_epoch(epoch))
    if epoch >= start_epoch:
        distributed.main_print(clock.total(epoch))


def end_epoch(
    run: Run,
    epoch: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    record: dict[str, Any],
    log: dict[str, Any],
    *,
    writer: SummaryWriter | None = None,
    improved: bool = False,
    save_every: int = 0,
    last: bool = False,
    **extra: Any,
) -> None:
    """What ends every epoch of every task, in one place: ``checkpoint-last.pth``; ``checkpoint-best.pth`` when the
    evaluation ``improved``; ``checkpoint-{epoch}.pth`` every ``save_every`` epochs (and at the ``last`` epoch when
    ``save_every`` is given: the run's final numbered checkpoint); the epoch's ``log.txt`` record ``log``; and its
    ``test_*`` values as TensorBoard scalars. (The stop check between epochs and the ETA line are ``epochs``'s.)
    Collective: call on every rank.

    Args:
        record: The run's flags and derived values (``util.config.run_record``), saved in the checkpoints.
        extra: Further checkpoint fields (best accuracy, class names, palette).
    """
    save = lambda name: checkpoint.save_epoch(run, name, model, optimizer, scaler, epoch, record, **extra)
    save("checkpoint-last.pth")
    if improved:
        save("checkpoint-best.pth")
    if save_every and ((epoch + 1) % save_every == 0 or last):
        save(f"checkpoint-{epoch}.pth")
    logger.append_log(run, {"epoch": epoch, **log})
    if writer is not None:
        for name, value in log.items():
            if name.startswith("test_"):
                writer.add_scalar(f"test/{name.removeprefix('test_')}", value, epoch)


def update_index(epoch: int, step: int, steps_per_epoch: int, accum_iter: int) -> int:
    """Index of the optimiser update that ``step`` of ``epoch`` belongs to, counting every epoch's
    ceil(steps_per_epoch / accum_iter) updates (the last group of an epoch may be shorter)."""
    return epoch * -(-steps_per_epoch // accum_iter) + step // accum_iter


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """Step (through the fp16 loss scaler, if any) and clear the gradients."""
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _ddp_module(model: torch.nn.Module) -> DistributedDataParallel | None:
    """The DDP wrapper of ``model``, also when ``torch.compile`` wrapped it (``_orig_mod``)."""
    model = getattr(model, "_orig_mod", model)
    return model if isinstance(model, DistributedDataParallel) else None


class StepLoop:
    """Gradient accumulation, optimiser updates, the SIGTERM check and log lines of one epoch.

    Args:
        model: What trains (possibly DDP-wrapped or compiled).
        optimizer: Its optimiser.
        scheduler: Sets the LR before each optimiser update (``util.run.schedule.lr_scheduler``).
        scaler: fp16 loss scaler, or None.
        run: This process's ``Run``.
        schedule: ``accum_iter``, ``clip_grad``, ``log_every`` and ``epochs`` (the run's ETA).
        epoch: Epoch index.
        steps_per_epoch: Steps of a whole epoch.
        names: Terms of each step's output to log; ``loss`` first.
        writer: TensorBoard writer (rank 0) or None.
        start_step: First step (a resumed run continues mid-epoch).

    The LR is set per optimiser update. Loss values stay on the device between log lines, so the loop does not
    wait for the GPU at every step.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: CosineLRScheduler,
        scaler: torch.amp.GradScaler | None,
        run: Run,
        schedule: Schedule,
        epoch: int,
        steps_per_epoch: int,
        names: Iterable[str],
        writer: SummaryWriter | None = None,
        start_step: int = 0,
    ) -> None:
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.run, self.schedule, self.epoch, self.steps_per_epoch = run, schedule, epoch, steps_per_epoch
        self.names, self.writer = tuple(names), writer
        self.interval, self.whole_epoch = MetricLogger(), MetricLogger()
        self.throughput = Throughput(steps_per_epoch - start_step)
        self.start_step = self.first_logged_step = start_step
        self.interval_images = 0
        self.grad_norm = torch.zeros(())
        self.ddp = _ddp_module(model)
        self.updates_now = False
        self.group_size = schedule.accum_iter
        self.bad_inputs = torch.zeros((), dtype=torch.long, device=run.device)  # NaN / inf input values, on the device

    @contextmanager
    def accumulate(self, step: int):
        """Around the forward and backward pass of ``step``: sets the LR at the start of an accumulation group,
        and skips DDP's gradient all-reduce on steps that end no group."""
        accum = self.schedule.accum_iter
        group_start = step - step % accum
        if step == group_start:
            self.scheduler.step_update(update_index(self.epoch, step, self.steps_per_epoch, accum))
        self.group_size = min(accum, self.steps_per_epoch - group_start)  # the epoch's last group may be shorter
        self.updates_now = step + 1 == group_start + self.group_size
        with self.ddp.no_sync() if self.ddp is not None and not self.updates_now else nullcontext():
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` / the size of this accumulation group (scaled for fp16), so that every update
        follows the mean gradient of its steps."""
        loss = loss / self.group_size
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def end_step(
        self, step: int, terms: dict[str, torch.Tensor], batch_size: int, inputs: torch.Tensor | None = None
    ) -> None:
        """Update the weights at the end of an accumulation group (clipping with ``--clip_grad``), then record
        ``terms`` and print a log line every ``--log_every`` steps. ``inputs`` (the step's batch) are counted for
        NaN / inf values on the device (no synchronisation), so that a NaN loss names them as its cause.

        Raises:
            Preempted: a rank received SIGTERM; the update of this step is done.
            NonFiniteLossError: naming the term and the steps where the loss became NaN/inf.
        """
        if self.updates_now:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), self.schedule.clip_grad or math.inf
            )
            optimizer_step(self.optimizer, self.scaler)
            # the epoch's last step: the epoch completes (log record with its losses) and training.epochs stops
            if step + 1 < self.steps_per_epoch and stop_requested(self.run):
                raise Preempted(self.epoch, step + 1)
        if inputs is not None and inputs.is_floating_point():
            self.bad_inputs += (~torch.isfinite(inputs)).sum()
        logged = {name: terms[name] for name in self.names}
        self.interval.update(**logged, grad_norm=self.grad_norm)
        self.whole_epoch.update(**logged)
        self.interval_images += batch_size * self.run.world_size
        if (step + 1) % self.schedule.log_every == 0 or step + 1 == self.steps_per_epoch:
            self._log(step)

    def _log(self, step: int) -> None:
        means = distributed.all_reduce_mean(self.interval.local_means(), self.run.device)
        bad = [name for name in self.names if not math.isfinite(means[name])]
        if bad:
            raise NonFiniteLossError(
                f"epoch {self.epoch}, steps {self.first_logged_step}-{step}: loss term(s) {', '.join(bad)} became "
                f"{means[bad[-1]]} ({self.non_finite_advice()})"
            )
        lr = max(group["lr"] for group in self.optimizer.param_groups)
        images_per_s, eta = self.throughput.tick(step + 1 - self.start_step, self.interval_images)
        steps_left = self.steps_per_epoch - step - 1 + (self.schedule.epochs - self.epoch - 1) * self.steps_per_epoch
        run_eta = self.throughput.eta(steps_left)  # this epoch's pace x the whole run's steps left
        distributed.main_print(
            f"epoch {self.epoch} [{step + 1}/{self.steps_per_epoch}] "
            + " ".join(f"{name} {means[name]:.4f}" for name in self.names)
            + f" lr {lr:.3e} grad_norm {means['grad_norm']:.3f} {images_per_s:.1f} img/s eta {eta} (run {run_eta})"
        )
        if self.writer is not None:
            x = int(
                (self.epoch + (step + 1) / self.steps_per_epoch) * 1000
            )  # epoch_1000x: comparable across batch sizes
            for name, value in means.items():
                self.writer.add_scalar(f"train/{name}", value, x)
            self.writer.add_scalar("train/lr", lr, x)
            self.writer.add_scalar("train/images_per_s", images_per_s, x)
        self.interval.reset()
        self.interval_images, self.first_logged_step = 0, step + 1

    def non_finite_advice(self) -> str:
        """What a NaN / inf loss points to: non-finite inputs where the batches held any (a cause the learning rate
        cannot fix), else the advice that fits this run's flags."""
        bad_inputs = int(distributed.all_reduce_mean({"n": self.bad_inputs.float()}, self.run.device)["n"])
        if bad_inputs:
            return (
                f"the input batches held NaN/inf values (about {bad_inputs} per process): check the normalisation "
                "(--mean / --std / --band_stats) and the files' no-data (--nodata)"
            )
        advice = ["lower --blr"]
        if self.run.amp_dtype is not None:
            advice.append("try --amp none")
        clip = self.schedule.clip_grad
        advice.append(f"a smaller --clip_grad than {clip:g}" if clip else "--clip_grad")
        return ", ".join(advice) + ", or resume from the last checkpoint"

    def epoch_means(self) -> dict[str, float]:
        """Mean of each logged term over the epoch's steps (of this run), averaged over ranks."""
        return distributed.all_reduce_mean(self.whole_epoch.local_means(), self.run.device)


def set_fused_attention(model: torch.nn.Module, fused: bool) -> None:
    """Choose timm's attention path: ``scaled_dot_product_attention`` (fused) or explicit matmul + softmax.

    On CPUs the explicit path trains faster for ViT sequence lengths (SDPA's CPU flash backward is slow for
    short sequences); on GPUs SDPA's flash / memory-efficient kernels win.
    """
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = fused


def use_sdpa(attention: str, device: torch.device) -> bool:
    """``--attention``: ``sdpa``, ``math``, or ``auto`` (SDPA everywhere but on the CPU)."""
    return attention == "sdpa" or (attention == "auto" and device.type != "cpu")


def grad_scaler(run: Run) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 autocast only; bf16 and fp32 need none."""
    return torch.amp.GradScaler(run.device.type) if run.amp_dtype == torch.float16 else None


def distribute(
    model: torch.nn.Module, run: Run, attention: str = "auto", compile: bool = False, unused: Iterable[str] = ()
) -> torch.nn.Module:
    """Choose the attention path (``--attention``), DDP-wrap (under torchrun) and ``torch.compile`` (with
    ``--compile``) the model that trains.

    ``unused`` names parameters that never get a gradient; DDP ignores them (no ``find_unused_parameters``
    graph search every step, which also breaks ``torch.compile``'s DDP optimiser).
    """
    set_fused_attention(model, use_sdpa(attention, run.device))
    if distributed.is_distributed():
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(unused))
        model = DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return torch.compile(model) if compile else model


def train_supervised_epoch(
    model: torch.nn.Module,
    criterion: Callable,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler | None,
    run: Run,
    schedule: Schedule,
    epoch: int,
    steps_per_epoch: int,
    writer: SummaryWriter | None = None,
    start_step: int = 0,
    mixup: Callable | None = None,
) -> dict[str, float]:
    """One epoch of supervised training (classification, and per-pixel for segmentation); returns the mean loss.

    Args:
        model: What trains (a classifier, only its head on cached features, or a segmenter), possibly DDP-wrapped.
        criterion: Loss on (logits [B, K], targets [B] or soft [B, K]); for segmentation (logits [B, K, H, W],
            masks [B, H, W]).
        loader: Yields (images [B, C, H, W] or features [B, D], labels [B] or masks [B, H, W]).
        mixup: timm ``Mixup`` applied to each batch, or None.

    Raises:
        Preempted: SIGTERM arrived; the update of the current step is done.
        NonFiniteLossError: the loss became NaN or infinite.
    """
    model.train()
    steps = StepLoop(
        model, optimizer, scheduler, scaler, run, schedule, epoch, steps_per_epoch, ("loss",), writer, start_step
    )
    for step, (samples, targets) in enumerate(loader, start=start_step):
        samples = samples.to(run.device, non_blocking=True)
        targets = targets.to(run.device, non_blocking=True)
        with steps.accumulate(step):
            with run.autocast():
                if mixup is not None:
                    samples, targets = mixup(samples, targets)  # targets become soft [B, K]
                loss = criterion(model(samples), targets)
            steps.backward(loss)
        steps.end_step(step, {"loss": loss}, samples.shape[0], samples)
    return steps.epoch_means()
