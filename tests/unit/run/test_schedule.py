"""util/run/schedule.py: the LR of every optimiser update against the closed form, for any steps / accum / warm-up."""

import math

import pytest
import torch

from util import config
from util.config import Schedule
from util.run.loop import update_index
from util.run.schedule import lr_scheduler


def closed_form(update: int, updates: int, warmup: int, lr: float, min_lr: float) -> float:
    if update < warmup:
        return lr * update / warmup
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * (update - warmup) / (updates - warmup))) / 2


def lrs_of_every_update(steps_per_epoch: int, accum_iter: int, epochs: int, warmup_epochs: float, lr=1.0, min_lr=0.0):
    """The LR each update gets when the schedule is driven as the training loop drives it."""
    plan = Schedule(
        epochs=epochs, batch_size=8, accum_iter=accum_iter, lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = lr_scheduler(optimizer, plan, steps_per_epoch)
    lrs = []
    for epoch in range(epochs):
        for step in range(steps_per_epoch):
            if step % accum_iter == 0:
                scheduler.step_update(update_index(epoch, step, steps_per_epoch, accum_iter))
                lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_the_reported_accumulation_case_gets_the_cosine():
    """24 images, batch 8 (3 steps/epoch), accum 2, 3 epochs, no warm-up, lr 1 -> six updates on the cosine."""
    assert lrs_of_every_update(3, 2, 3, 0) == pytest.approx([1.0, 0.9330, 0.75, 0.5, 0.25, 0.0670], abs=1e-4)


@pytest.mark.parametrize(
    "steps_per_epoch, accum_iter, epochs, warmup_epochs",
    [(5, 1, 3, 1), (3, 2, 3, 0), (7, 3, 4, 1.5), (4, 4, 2, 0), (10, 3, 5, 2), (1, 1, 6, 2)],
)
def test_every_update_follows_the_closed_form(steps_per_epoch, accum_iter, epochs, warmup_epochs):
    updates_per_epoch = math.ceil(steps_per_epoch / accum_iter)
    updates = epochs * updates_per_epoch
    warmup = int(warmup_epochs * updates_per_epoch)
    got = lrs_of_every_update(steps_per_epoch, accum_iter, epochs, warmup_epochs, lr=2.0, min_lr=0.1)
    assert len(got) == updates
    assert got == pytest.approx([closed_form(u, updates, warmup, 2.0, 0.1) for u in range(updates)], abs=1e-9)


def test_linear_scaling_rule_uses_the_effective_batch():
    flags = dict(
        lr=None,
        blr=1e-3,
        batch_size=64,
        accum_iter=2,
        epochs=1,
        min_lr=0.0,
        warmup_epochs=0.0,
        clip_grad=None,
        log_every=1,
    )
    assert config.training_schedule(config.flags(**flags), world_size=4).lr == pytest.approx(1e-3 * 64 * 2 * 4 / 256)
    assert config.training_schedule(config.flags(**{**flags, "lr": 0.5}), world_size=4).lr == 0.5
