"""util/run/loop.py: the accumulate / update / stop / log mechanics of one epoch, on a linear model."""

from pathlib import Path

import pytest
import torch

from util.config import Schedule
from util.run import process
from util.run.loop import NonFiniteLossError, StepLoop, epochs
from util.run.process import Preempted, Run
from util.run.schedule import lr_scheduler

FEATURES, BATCH = 3, 2


def cpu_run() -> Run:
    return Run(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), amp_dtype=None, output_dir=Path("."))


def train_epoch(model, batches, accum_iter, clip_grad=None, lr=0.1, log_every=100):
    """One epoch of plain SGD on squared error, through StepLoop as the engines use it; returns its means."""
    plan = Schedule(
        epochs=1,
        batch_size=BATCH,
        accum_iter=accum_iter,
        lr=lr,
        min_lr=lr,
        warmup_epochs=0,
        clip_grad=clip_grad,
        log_every=log_every,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    steps = StepLoop(
        model, optimizer, lr_scheduler(optimizer, plan, len(batches)), None, cpu_run(), plan, 0, len(batches), ("loss",)
    )
    for step, (x, y) in enumerate(batches):
        with steps.accumulate(step):
            loss = ((model(x) - y) ** 2).mean()
            steps.backward(loss)
        steps.end_step(step, {"loss": loss}, len(x))
    return steps.epoch_means()


def data(count: int):
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(BATCH, FEATURES, generator=generator), torch.randn(BATCH, 1, generator=generator))
        for _ in range(count)
    ]


def linear() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(FEATURES, 1)


def reference_sgd(batches, groups, lr=0.1):
    """SGD on the mean loss of each group of batches (what accumulation must compute)."""
    model = linear()
    for group in groups:
        model.zero_grad()
        sum(((model(x) - y) ** 2).mean() for x, y in (batches[i] for i in group)).div(len(group)).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
    return model


def test_accumulated_updates_follow_the_mean_gradient_of_each_group_including_a_shorter_last_one():
    batches = data(5)
    model = linear()
    train_epoch(model, batches, accum_iter=2)
    expected = reference_sgd(batches, [[0, 1], [2, 3], [4]])  # 5 steps, accum 2: the last group has one step
    for got, want in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(got, want)


def test_clipping_bounds_the_gradient_norm():
    batches = [(x * 1000, y) for x, y in data(1)]
    model = linear()
    before = [p.detach().clone() for p in model.parameters()]
    train_epoch(model, batches, accum_iter=1, clip_grad=0.5, lr=1.0)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert step.norm().item() == pytest.approx(0.5, rel=1e-5)


def test_a_stop_request_ends_the_epoch_after_the_update(monkeypatch):
    monkeypatch.setattr(process._STOP, "is_set", lambda: True)
    with pytest.raises(Preempted) as stop:
        train_epoch(linear(), data(4), accum_iter=2)
    assert (stop.value.epoch, stop.value.step) == (0, 2)  # the first update (2 steps) completed


def test_a_nan_loss_names_the_steps():
    batches = data(3)
    batches[1] = (batches[1][0] * float("nan"), batches[1][1])
    with pytest.raises(NonFiniteLossError, match=r"epoch 0, steps 0-1: loss term\(s\) loss became nan"):
        train_epoch(linear(), batches, accum_iter=1, log_every=2)


def test_a_nan_loss_names_its_cause_and_advises_only_what_this_run_can_change():
    """Before, every NaN read "lower --blr, try --amp none or --clip_grad", --amp none and --clip_grad given or not;
    NaN inputs (statistics that cannot normalise, NaN pixels) were blamed on the learning rate."""
    plan = Schedule(epochs=1, batch_size=BATCH, accum_iter=1, lr=0.1, min_lr=0.1, warmup_epochs=0, clip_grad=1.0)
    model = linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def advice(amp_dtype, inputs):
        run = Run(0, 1, 0, torch.device("cpu"), amp_dtype, Path("."))
        steps = StepLoop(model, optimizer, lr_scheduler(optimizer, plan, 1), None, run, plan, 0, 1, ("loss",))
        x, y = data(1)[0]
        with pytest.raises(NonFiniteLossError) as info:
            with steps.accumulate(0):
                loss = ((model(inputs(x)) - y) ** 2).mean()
                steps.backward(loss)
            steps.end_step(0, {"loss": loss}, len(x), inputs(x))
        return str(info.value)

    fp32 = advice(None, lambda x: x * float("inf"))
    assert "the input batches held NaN/inf values (about 6 per process): check the normalisation" in fp32
    assert "lower --blr" not in fp32
    model.weight.data.fill_(float("nan"))  # finite inputs, NaN weights: the optimisation's advice
    fp32 = advice(None, lambda x: x)
    assert fp32.endswith("(lower --blr, a smaller --clip_grad than 1, or resume from the last checkpoint)")
    assert "try --amp none, " in advice(torch.bfloat16, lambda x: x)


def test_epoch_means_average_every_step():
    batches = data(4)
    model = linear()
    with torch.no_grad():
        expected = [((model(x) - y) ** 2).mean().item() for x, y in batches]
    means = train_epoch(model, batches, accum_iter=4, lr=0.0)  # lr 0: the model never changes
    assert means["loss"] == pytest.approx(sum(expected) / len(expected), rel=1e-6)


class Positions:
    def __init__(self):
        self.epoch, self.start = None, None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def set_start(self, start):
        self.start = start


def test_a_resumed_run_starts_mid_epoch_once():
    sampler = Positions()
    seen = []
    for epoch, first_step in epochs(plan_of(4), sampler, start_epoch=2, start_step=3, run=cpu_run(), steps_per_epoch=5):
        seen.append((epoch, first_step, sampler.epoch, sampler.start))
    assert seen == [(2, 3, 2, 24), (3, 0, 3, 0)]


def plan_of(epochs: int) -> Schedule:
    return Schedule(epochs=epochs, batch_size=8, accum_iter=1, lr=0.1, min_lr=0.0, warmup_epochs=0)


def _clock_lines(capsys, monkeypatch, plan, start_epoch, start_step, steps_per_epoch, seconds_per_step=2.0):
    """Run ``epochs`` with a fake clock advancing ``seconds_per_step`` per trained step; the printed lines."""
    now = [0.0]
    monkeypatch.setattr("util.run.logger.time.perf_counter", lambda: now[0])
    for _epoch, first_step in epochs(plan, Positions(), start_epoch, start_step, cpu_run(), steps_per_epoch):
        now[0] += seconds_per_step * (steps_per_epoch - first_step)
    return capsys.readouterr().out.splitlines()


def test_each_epoch_prints_its_time_and_the_whole_runs_eta_and_the_end_the_total(capsys, monkeypatch):
    lines = _clock_lines(capsys, monkeypatch, plan_of(2), 0, 0, steps_per_epoch=5)
    assert lines[0] == "epoch 0 done in 0:00:10.0 (2.000 s/step over 5 steps); run eta 0:00:10.0 (1 of 2 epochs left)"
    assert lines[1].startswith("epoch 1 done in 0:00:10.0") and "run eta 0:00:00.0 (0 of 2 epochs left)" in lines[1]
    assert lines[2] == "training time 0:00:20.0 (2 epoch(s) in this run)"


def test_a_resumed_run_measures_only_the_steps_it_trained(capsys, monkeypatch):
    lines = _clock_lines(capsys, monkeypatch, plan_of(5), 2, 3, steps_per_epoch=4)
    # epoch 2 trains 1 step (from step 3): too few to extrapolate the run from (the "18:59:48 left")
    assert lines[0] == "epoch 2 done in 0:00:02.0 (2.000 s/step over 1 steps); run eta estimating (2 of 5 epochs left)"
    # epoch 3: 5 steps timed in 10 s: 2 s/step, 1 epoch x 4 steps left -> 8 s
    assert lines[1] == "epoch 3 done in 0:00:08.0 (2.000 s/step over 5 steps); run eta 0:00:08.0 (1 of 5 epochs left)"
    assert lines[-1] == "training time 0:00:18.0 (3 epoch(s) in this run)"


def test_the_eta_waits_for_enough_timed_steps(monkeypatch):
    from util.run import logger

    assert logger.eta_text(2.0, logger.ETA_MIN_STEPS - 1, 100) == "estimating"
    assert logger.eta_text(2.0, logger.ETA_MIN_STEPS, 100) == "0:03:20.0"
    now = [0.0]
    monkeypatch.setattr("util.run.logger.time.perf_counter", lambda: now[0])
    throughput = logger.Throughput(total_steps=10)
    now[0] = 30.0  # one slow step: no extrapolation from it
    assert throughput.tick(1, 8) == (8 / 30.0, "estimating") and throughput.eta(1000) == "estimating"
    now[0] = 38.0
    rate, eta = throughput.tick(5, 32)  # 5 steps in 38 s: 7.6 s/step, 5 steps left
    assert rate == pytest.approx(4.0) and eta == "0:00:38.0" and throughput.eta(100) == "0:12:40.0"


def test_a_step_log_line_of_a_run_resumed_at_an_epochs_last_step_says_estimating(capsys, monkeypatch):
    now = [0.0]
    monkeypatch.setattr("util.run.logger.time.perf_counter", lambda: now[0])
    model = linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = Schedule(epochs=60, batch_size=2, accum_iter=1, lr=0.1, min_lr=0.0, warmup_epochs=0, log_every=20)
    scheduler = lr_scheduler(optimizer, plan, 5)
    steps = StepLoop(model, optimizer, scheduler, None, cpu_run(), plan, 2, 5, ["loss"], start_step=4)
    x, y = data(1)[0]
    with steps.accumulate(4):
        loss = ((model(x) - y) ** 2).mean()
        steps.backward(loss)
    now[0] = 230.0  # one step under load
    steps.end_step(4, {"loss": loss.detach()}, len(x))
    line = capsys.readouterr().out.strip()
    assert line.startswith("epoch 2 [5/5] loss ") and line.endswith("img/s eta 0:00:00.0 (run estimating)")


def test_non_training_work_reports_plain_progress_lines_without_a_terminal(capsys, monkeypatch):
    from util.run import logger

    monkeypatch.setattr(logger, "PLAIN_PROGRESS_EVERY_S", 0.0)
    assert list(logger.progress(range(3), "evaluation")) == [0, 1, 2]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "evaluation: 0/3 batches" and lines[1].startswith("evaluation: 1/3 (")
    assert lines[-1].startswith("evaluation: 3/3 done in ")
    assert list(logger.progress(range(3), "evaluation", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().out == ""
