"""Learning-rate schedule: per-update linear warm-up, then half-cycle cosine (MAE's ``util/lr_sched.py``, computed by
timm's ``CosineLRScheduler``). The peak learning rate (``--lr``, or the linear scaling rule of ``--blr``) is
``util.config.training_schedule``'s."""

from __future__ import annotations

import logging

import torch
from timm.scheduler import CosineLRScheduler

from util.config import Schedule

# timm warns that a cosine of one update "will have no effect"; our warm-up + cosine says what it does itself
logging.getLogger("timm.scheduler.cosine_lr").setLevel(logging.ERROR)


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule, steps_per_epoch: int) -> CosineLRScheduler:
    """Per-update linear warm-up from 0 over ``schedule.warmup_epochs``, then half-cycle cosine to ``schedule.min_lr``
    (timm's, honouring each parameter group's ``lr_scale``). Call ``step_update(u)`` before update u
    (``util.run.loop.update_index``).

    With U = epochs x ceil(steps_per_epoch / accum_iter) updates and W = int(warmup_epochs x updates per epoch),
    update u gets ``lr * u / W`` for u < W, else ``min_lr + (lr - min_lr) * (1 + cos(pi * (u - W) / (U - W))) / 2``
    (MAE's ``util/lr_sched.py``, counted in updates). The peak ``lr`` is the optimiser's: set it to ``schedule.lr``.
    """
    updates_per_epoch = -(-steps_per_epoch // schedule.accum_iter)
    warmup = int(schedule.warmup_epochs * updates_per_epoch)
    return CosineLRScheduler(
        optimizer,
        t_initial=max(schedule.epochs * updates_per_epoch - warmup, 1),
        lr_min=schedule.min_lr,
        warmup_t=warmup,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )
