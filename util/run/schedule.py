"""Learning-rate schedule: per-update linear warm-up, then half-cycle cosine (MAE's ``util/lr_sched.py``,
computed by timm's ``CosineLRScheduler``), and the linear scaling rule for the base learning rate."""
from __future__ import annotations

import argparse
import logging

import torch
from timm.scheduler import CosineLRScheduler


# timm warns that a cosine of one update "will have no effect"; our warm-up + cosine says what it does itself
logging.getLogger("timm.scheduler.cosine_lr").setLevel(logging.ERROR)


def lr_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, steps_per_epoch: int) -> CosineLRScheduler:
    """Per-update linear warm-up from 0 over ``--warmup_epochs``, then half-cycle cosine to ``--min_lr``
    (timm's, honouring each parameter group's ``lr_scale``). Call ``step_update(u)`` before update u
    (``util.run.loop.update_index``).

    With U = epochs x ceil(steps_per_epoch / accum_iter) updates and W = int(warmup_epochs x updates per epoch),
    update u gets ``lr * u / W`` for u < W, else ``min_lr + (lr - min_lr) * (1 + cos(pi * (u - W) / (U - W))) / 2``
    (MAE's ``util/lr_sched.py``, counted in updates).
    """
    updates_per_epoch = -(-steps_per_epoch // args.accum_iter)
    warmup = int(args.warmup_epochs * updates_per_epoch)
    return CosineLRScheduler(
        optimizer, t_initial=max(args.epochs * updates_per_epoch - warmup, 1), lr_min=args.min_lr,
        warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False,
    )


def resolve_lr(args: argparse.Namespace, world_size: int) -> float:
    """``--lr``, or the linear scaling rule ``--blr`` x effective batch / 256 (MAE, Goyal et al. 2017)."""
    if not hasattr(args, "lr_given"):  # what the user gave (None: derived), for config.yaml and resume checks
        args.lr_given = args.lr
    if args.lr is None:
        args.lr = args.blr * args.batch_size * args.accum_iter * world_size / 256
    return args.lr
