"""The training machinery every entry point shares: process set-up, loaders, optimiser schedule,
the accumulate / step / log loop, resuming and checkpointing."""
from __future__ import annotations

import argparse
import json
import math
import signal
import threading
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from timm.scheduler import CosineLRScheduler
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.tensorboard import SummaryWriter

import models_vit
from util import checkpoint, config, datasets, misc

# (samples, targets) -> {"loss": total, other reported terms...}
LossFn = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


class NonFiniteLossError(misc.ReportableError):
    """A loss term became NaN or infinite."""


class Preempted(Exception):
    """SIGTERM arrived: training stopped after the optimiser update that completed ``step`` steps of ``epoch``."""

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(f"stopped at epoch {epoch} step {step}")
        self.epoch, self.step = epoch, step


_STOP = threading.Event()


def _request_stop(signum, frame) -> None:
    _STOP.set()


@dataclass
class Run:
    """Where and how this process trains."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    amp_dtype: torch.dtype | None
    output_dir: Path
    stop_group: object = None  # gloo group on which ranks agree to stop (host-side: no GPU synchronisation)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_run(args: argparse.Namespace) -> Run:
    """Join the process group (if any), choose device and autocast dtype, seed, create the output folder, and
    make SIGTERM (what SLURM and Kubernetes send before pre-emption) stop training at the next update."""
    rank, world_size, local_rank = misc.init_distributed(args.dist_timeout)
    device = misc.resolve_device(args.device, local_rank)
    amp_dtype = misc.resolve_amp(args.amp, device)
    misc.seed_everything(args.seed + rank)
    output_dir = Path(args.output_dir)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _request_stop)
    stop_group = dist.new_group(backend="gloo") if misc.is_distributed() else None
    return Run(rank, world_size, local_rank, device, amp_dtype, output_dir, stop_group)


def stop_requested(run: Run) -> bool:
    """Whether any rank received SIGTERM; every rank gets the same answer (one tiny host-side collective)."""
    if run.stop_group is None:
        return _STOP.is_set()
    flag = torch.tensor([float(_STOP.is_set())])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=run.stop_group)
    return bool(flag.item())


def train_loader(dataset: Dataset, args: argparse.Namespace, run: Run) -> tuple[DataLoader, datasets.SeededSampler]:
    """Shuffled, seeded, sharded across ranks; incomplete last batches are dropped."""
    if len(dataset) < args.batch_size * run.world_size:
        raise misc.UsageError(
            f"--batch_size {args.batch_size} x {run.world_size} process(es) is more than the {len(dataset)} training images"
        )
    sampler = datasets.SeededSampler(dataset, num_replicas=run.world_size, rank=run.rank, shuffle=True, seed=args.seed)
    loader = DataLoader(  # its own generator: worker seeds must not draw from the RNG that masks use
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
        pin_memory=args.pin_mem and run.device.type == "cuda", drop_last=True,
        persistent_workers=args.num_workers > 0, generator=torch.Generator().manual_seed(args.seed),
    )
    return loader, sampler


def eval_loader(dataset: Dataset, args: argparse.Namespace, run: Run) -> DataLoader:
    """In order; each rank takes every world_size-th sample (no padding, so no sample counts twice)."""
    indices = list(range(run.rank, len(dataset), run.world_size))
    return DataLoader(  # a generator of its own, so evaluating leaves the training RNG untouched
        torch.utils.data.Subset(dataset, indices), batch_size=args.batch_size, shuffle=False,
        num_workers=args.num_workers, pin_memory=args.pin_mem and run.device.type == "cuda", generator=torch.Generator(),
    )


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (ranks hold every world_size-th sample, as ``eval_loader`` shards; the order is restored)."""
    if not misc.is_distributed():
        return tensor
    parts: list = [None] * misc.world_size()
    dist.all_gather_object(parts, tensor.cpu())
    out = torch.empty((sum(len(p) for p in parts), *tensor.shape[1:]), dtype=tensor.dtype)
    for rank, part in enumerate(parts):
        out[rank::misc.world_size()] = part
    return out


@torch.no_grad()
def infer(
    fn: Callable[[torch.Tensor], dict], loader, device: torch.device, amp_dtype: torch.dtype | None
) -> tuple[dict, torch.Tensor]:
    """Run ``fn(images) -> {name: [B, ...]}`` on every batch under ``no_grad`` and autocast.

    Returns:
        ({name: outputs of every sample as float32 on the CPU}, labels), gathered over ranks in dataset order.
    """
    outputs: dict = {}
    labels = []
    for images, targets in loader:
        with misc.autocast(device, amp_dtype):
            for name, value in fn(images.to(device, non_blocking=True)).items():
                outputs.setdefault(name, []).append(value.float().cpu())
        labels.append(targets)
    return {name: gather(torch.cat(parts)) for name, parts in outputs.items()}, gather(torch.cat(labels))


def lr_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, steps_per_epoch: int) -> CosineLRScheduler:
    """Per-update linear warm-up from 0, then half-cycle cosine to ``--min_lr`` (timm's, honouring ``lr_scale``)."""
    updates_per_epoch = -(-steps_per_epoch // args.accum_iter)
    warmup = int(args.warmup_epochs * updates_per_epoch)
    return CosineLRScheduler(
        optimizer, t_initial=max(args.epochs * updates_per_epoch - warmup, 1), lr_min=args.min_lr,
        warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False,
    )


def resolve_lr(args: argparse.Namespace, run: Run) -> float:
    """``--lr``, or ``--blr`` x effective batch / 256."""
    if args.lr is None:
        args.lr = args.blr * args.batch_size * args.accum_iter * run.world_size / 256
    return args.lr


def grad_scaler(run: Run) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 autocast only; bf16 and fp32 need none."""
    return torch.amp.GradScaler(run.device.type) if run.amp_dtype == torch.float16 else None


def distribute(model: torch.nn.Module, run: Run, args: argparse.Namespace, find_unused: bool = False) -> torch.nn.Module:
    """Choose the attention path (``--attention``), DDP-wrap (under torchrun) and ``torch.compile`` (with
    ``--compile``) the model that trains."""
    models_vit.set_fused_attention(model, use_sdpa(args.attention, run.device))
    if misc.is_distributed():
        model = DistributedDataParallel(
            model, device_ids=[run.local_rank] if run.device.type == "cuda" else None, find_unused_parameters=find_unused
        )
    return torch.compile(model) if args.compile else model


def use_sdpa(attention: str, device: torch.device) -> bool:
    return attention == "sdpa" or (attention == "auto" and device.type != "cpu")


def resume(args: argparse.Namespace, run: Run, model: torch.nn.Module, optimizer, scaler) -> tuple[int, int, dict]:
    """Restore model, optimiser, scaler and RNG states from ``--resume``.

    Returns:
        (first epoch, steps of it already done, the checkpoint); a pre-empted run continues mid-epoch.

    Raises:
        CheckpointError: the checkpoint belongs to another model or size.
    """
    if not args.resume:
        return args.start_epoch, 0, {}
    found = checkpoint.find_resume_checkpoint(args.resume, run.output_dir)
    if found is None:
        misc.main_print(f"resume auto: no checkpoint in {run.output_dir}, starting from scratch")
        return args.start_epoch, 0, {}
    path, state = found
    try:
        model.load_state_dict(checkpoint.model_state(state))
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise checkpoint.CheckpointError(
            f"{path}: cannot resume this run from it (another model, size or optimiser?): {str(e).strip().splitlines()[0]}"
        ) from None
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    rng_states = state.get("rng_per_rank", [])
    if len(rng_states) == run.world_size:
        misc.set_rng_state(rng_states[run.rank])
    else:
        misc.main_print(f"note: {path} was written by {len(rng_states)} process(es), this run has {run.world_size}: "
                        "random streams start afresh")
    epoch, step = state["epoch"] + 1, state.get("next_step", 0)
    misc.main_print(f"resumed from {path}, continuing at epoch {epoch}" + (f" step {step}" if step else ""))
    return epoch, step, state


def save_epoch(run: Run, name: str, model: torch.nn.Module, optimizer, scaler, epoch: int, args, **extra) -> bool:
    """Write ``output_dir/name`` atomically with everything a resume needs (collective: call on every rank).

    A failed write (disk full, permissions) is reported with the path and the reason and training goes on;
    the previous file stays intact. Returns whether the file was written.
    """
    rng_states = misc.gather_rng_states()
    if not run.is_main:
        return True
    state = checkpoint.training_state(model, optimizer, scaler, epoch, args, rng_per_rank=rng_states, **extra)
    try:
        checkpoint.save_checkpoint(state, run.output_dir / name)
    except checkpoint.CheckpointError as e:
        print(f"warning: {e}", flush=True)
        return False
    return True


def save_preempted(run: Run, stop: Preempted, model: torch.nn.Module, optimizer, scaler, args, **extra) -> None:
    """Checkpoint a run stopped by SIGTERM so that ``--resume auto`` continues at the very next step."""
    saved = save_epoch(run, "checkpoint-last.pth", model, optimizer, scaler, stop.epoch - 1, args, next_step=stop.step, **extra)
    if run.is_main and not saved:
        raise checkpoint.CheckpointError(f"SIGTERM at epoch {stop.epoch} step {stop.step}, and the checkpoint could not be written")
    misc.main_print(f"SIGTERM: stopped at epoch {stop.epoch} step {stop.step}, saved {run.output_dir / 'checkpoint-last.pth'}; "
                    "continue with --resume auto")


def append_log(run: Run, record: dict) -> None:
    if run.is_main:
        with open(run.output_dir / "log.txt", "a") as f:
            f.write(json.dumps(record) + "\n")


def summary_writer(run: Run, args: argparse.Namespace) -> SummaryWriter | None:
    if not run.is_main:
        return None
    config.save_config(args, run.output_dir / "config.yaml")
    return SummaryWriter(args.log_dir or str(run.output_dir))


def reduce_means(logger: misc.MetricLogger) -> dict[str, float]:
    """Means averaged over ranks: one collective per log line, and every rank sees a bad value."""
    names = sorted(logger.sums)
    values = torch.tensor([float(logger.sums[n]) / logger.counts[n] for n in names], dtype=torch.float64)
    if misc.is_distributed():
        dist.all_reduce(values)
        values /= misc.world_size()
    return dict(zip(names, values.tolist()))


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """Step (through the fp16 loss scaler, if any) and clear the gradients."""
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_one_epoch(
    model: torch.nn.Module,
    loss_fn: LossFn,
    loss_names: Iterable[str],
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: CosineLRScheduler,
    scaler: torch.amp.GradScaler | None,
    run: Run,
    epoch: int,
    steps_per_epoch: int,
    args: argparse.Namespace,
    writer: SummaryWriter | None = None,
    start_step: int = 0,
    device_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Train for one epoch (from ``start_step`` when resuming inside it); returns the epoch's mean terms.

    ``device_transform`` augments each batch after it reached the device (packed uint8 datasets).

    ``loss_fn(samples, targets)`` runs the model under autocast and returns ``loss`` plus the terms named in
    ``loss_names``. The learning rate is set per optimiser update. Loss values stay on the device between
    log lines, so the loop does not wait for the GPU at every step.

    Raises:
        NonFiniteLossError: naming the term and the steps where the loss became NaN/inf.
    """
    model.train()
    names = ("loss", *loss_names)
    interval, whole_epoch = misc.MetricLogger(), misc.MetricLogger()
    throughput = misc.Throughput(steps_per_epoch - start_step)
    interval_images, first_step = 0, start_step
    grad_norm = torch.zeros(())
    is_ddp = isinstance(model, DistributedDataParallel)
    for step, (samples, targets) in enumerate(loader, start=start_step):
        if step % args.accum_iter == 0:
            scheduler.step_update((epoch * steps_per_epoch + step) // args.accum_iter)
        samples = samples.to(run.device, non_blocking=True)
        targets = targets.to(run.device, non_blocking=True)
        if device_transform is not None:
            samples = device_transform(samples)
        update = (step + 1) % args.accum_iter == 0 or step + 1 == steps_per_epoch
        with model.no_sync() if is_ddp and not update else nullcontext():
            with misc.autocast(run.device, run.amp_dtype):
                out = loss_fn(samples, targets)
            loss = out["loss"] / args.accum_iter
            (scaler.scale(loss) if scaler else loss).backward()
        if update:
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad or math.inf)
            optimizer_step(optimizer, scaler)
            if stop_requested(run):
                raise Preempted(epoch, step + 1)

        terms = {name: out[name] for name in names}
        interval.update(**terms, grad_norm=grad_norm)
        whole_epoch.update(**terms)
        interval_images += samples.shape[0] * run.world_size
        if (step + 1) % args.log_every == 0 or step + 1 == steps_per_epoch:
            means = reduce_means(interval)
            bad = [name for name in names if not math.isfinite(means[name])]
            if bad:
                raise NonFiniteLossError(
                    f"epoch {epoch}, steps {first_step}-{step}: loss term(s) {', '.join(bad)} became "
                    f"{means[bad[-1]]} (lower --blr, try --amp none or --clip_grad, or resume from the last checkpoint)"
                )
            lr = max(group["lr"] for group in optimizer.param_groups)
            images_per_s, eta = throughput.tick(step + 1 - start_step, interval_images)
            misc.main_print(
                f"epoch {epoch} [{step + 1}/{steps_per_epoch}] "
                + " ".join(f"{name} {means[name]:.4f}" for name in names)
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
