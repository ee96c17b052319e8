"""util/run/distributed.py and the gathered contrastive loss: cross-rank negatives, SyncBatchNorm1d, collectives on the
training device.

One 2-process gloo job (module fixture) runs every distributed case and saves each rank's results; the
tests compare them with one process on the union batch A ∪ B (rank 0 holds A, rank 1 holds B).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from strict_collectives import WrongDeviceError, run_allowing_meta_readback, strict_collectives

from models_cross_scale_mae import cross_scale_contrastive_loss
from util.run import distributed as ops
from util.run import threads

WORLD = 2
B, D_IN, D = 6, 5, 4  # contrastive: per-rank batch, input width, feature width
N_BN, TOKENS, HIDDEN = 4, 7, 6  # SyncBatchNorm: per-rank batch, channels (= tokens), length (= hidden)
SGD_STEPS = 2


# ---------------------------------------------------------------- the data (same on every process)


def contrastive_data():
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(WORLD * B, D_IN, generator=g), torch.randn(WORLD * B, D_IN, generator=g)
    return x1, x2


def feature_layer() -> nn.Linear:
    torch.manual_seed(2)
    return nn.Linear(D_IN, D)


def bn_data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(WORLD * N_BN, TOKENS, HIDDEN, generator=g) * 3 + 5  # a large mean: cancellation-prone
    weights = torch.randn(WORLD * N_BN, TOKENS, HIDDEN, generator=g)
    x2d = torch.randn(WORLD * N_BN, TOKENS, generator=g) * 2 - 1
    return x, weights, x2d


def predictor(bn: type[nn.Module] = nn.BatchNorm1d, momentum: float | None = 0.1) -> nn.Sequential:
    """The model's token predictor (Linear -> BatchNorm1d(num_tokens) -> ReLU -> Linear) at toy size."""
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Linear(HIDDEN, 16), bn(TOKENS, momentum=momentum), nn.ReLU(inplace=True), nn.Linear(16, HIDDEN)
    )


N_SEG, C_SEG = 3, 4  # segmentation head: per-rank batch, channels


def seg_head() -> nn.Sequential:
    """A segmentation head's BatchNorms at toy size: one over a feature map, one over a pooled 1 x 1 map (UperNet's
    pyramid pooling), as ``models_segmentation`` builds them (``BatchNorm2dOfAnyBatch``)."""
    from models_segmentation import any_batch_norms

    torch.manual_seed(7)
    return any_batch_norms(
        nn.Sequential(
            nn.Conv2d(3, C_SEG, 3, padding=1),
            nn.BatchNorm2d(C_SEG),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.BatchNorm2d(C_SEG),
            nn.Conv2d(C_SEG, 2, 1),
        )
    )


def seg_data():
    g = torch.Generator().manual_seed(8)
    images = torch.randn(SGD_STEPS, WORLD * N_SEG, 3, 6, 6, generator=g) * 2 + 1
    return images, torch.randint(0, 2, (SGD_STEPS, WORLD * N_SEG, 1, 1), generator=g)


def sgd_steps(model: nn.Module, data, loss_fn, rows: slice = slice(None)) -> tuple[torch.Tensor, dict]:
    """``SGD_STEPS`` steps of SGD (lr 0.1) on ``rows`` of ``data`` (inputs, targets: [SGD_STEPS, N, ...]): the
    losses [SGD_STEPS] and a copy of the weights (of the module inside DDP)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, targets = data
    losses = []
    for step in range(SGD_STEPS):
        loss = loss_fn(model(inputs[step, rows]), targets[step, rows])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    state = (model.module if hasattr(model, "module") else model).state_dict()
    return torch.stack(losses), {k: v.clone() for k, v in state.items()}


def train_seg_head(model: nn.Module, rows: slice) -> tuple[torch.Tensor, dict]:
    return sgd_steps(model, seg_data(), nn.functional.cross_entropy, rows)


def predictor_data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(SGD_STEPS, WORLD * N_BN, TOKENS, HIDDEN, generator=g), torch.randn(
        SGD_STEPS, WORLD * N_BN, TOKENS, HIDDEN, generator=g
    )


def bn_params(module: nn.Module):
    torch.manual_seed(6)
    with torch.no_grad():
        module.weight.copy_(torch.rand(TOKENS) + 0.5)
        module.bias.copy_(torch.randn(TOKENS))
    return module


# ---------------------------------------------------------------- the 2-process job


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.save(_distributed_cases(rank), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _distributed_cases(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    mine = slice(rank * B, (rank + 1) * B)
    results: dict = {}
    x1, x2 = contrastive_data()
    for form in ("upstream", "ntxent"):
        for gather in (True, False):
            layer = DDP(feature_layer())
            loss = cross_scale_contrastive_loss(layer(x1[mine]), layer(x2[mine]), 0.5, form, gather_negatives=gather)
            loss.backward()  # DDP averages the gradients over ranks
            results[f"contrastive/{form}/{gather}"] = (
                loss.detach(),
                layer.module.weight.grad.clone(),
                layer.module.bias.grad.clone(),
            )

    gathered = ops.gather_with_grad(torch.full((2, 3), float(rank), requires_grad=True))
    results["gather/value"] = gathered.detach()
    leaf = torch.full((2, 3), float(rank), requires_grad=True)
    (ops.gather_with_grad(leaf) * torch.arange(WORLD * 2.0).view(-1, 1)).sum().backward()
    results["gather/grad"] = leaf.grad

    x, weights, x2d = bn_data()
    rows = slice(rank * N_BN, (rank + 1) * N_BN)
    for name, data, momentum in (("3d", x, 0.1), ("2d", x2d, None)):
        bn = bn_params(ops.SyncBatchNorm1d(TOKENS, momentum=momentum))
        local = data[rows].clone().requires_grad_(True)
        for _ in range(2):  # two updates of the running statistics
            y = bn(local)
        w = weights[rows] if data.dim() == 3 else weights[rows, :, 0]
        (y * w).mean().backward()
        grads = [p.grad.clone() for p in (bn.weight, bn.bias)]
        for grad in grads:  # what DDP does
            dist.all_reduce(grad)
            grad /= WORLD
        results[f"bn/{name}"] = (
            y.detach(),
            local.grad,
            *grads,
            bn.running_mean.clone(),
            bn.running_var.clone(),
            bn.num_batches_tracked.clone(),
        )
        bn.eval()
        results[f"bn/{name}/eval"] = bn(data[rows]).detach()

    model = DDP(ops.convert_sync_batchnorm(predictor()))
    results["predictor"] = sgd_steps(model, predictor_data(), nn.functional.mse_loss, rows)

    from models_segmentation import SyncBatchNorm2dOfAnyBatch, sync_batch_norms

    for name, per_rank in (("seg", N_SEG), ("seg/one value per rank", 1)):
        head = sync_batch_norms(seg_head())
        assert type(head[4]) is SyncBatchNorm2dOfAnyBatch
        results[name] = train_seg_head(DDP(head), slice(rank * per_rank, (rank + 1) * per_rank))

    results["reduce_mean"] = ops.all_reduce_mean({"a": float(rank), "b": torch.tensor(10.0 * rank + 1), "c": 2}, "cpu")
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_close(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-6) -> None:
    """Relative error of the whole tensor (norm of the difference over the norm of the reference)."""
    got, expected = got.double(), expected.double()
    assert got.shape == expected.shape
    error = (got - expected).norm() / max(expected.norm().item(), 1e-12)
    assert error <= rtol, f"relative error {error:.2e} > {rtol:.0e}"


# ---------------------------------------------------------------- contrastive loss


def reference_loss(f1: torch.Tensor, f2: torch.Tensor, temperature: float, form: str) -> torch.Tensor:
    """The formula written out, one anchor at a time, in float64."""
    z = nn.functional.normalize(torch.cat([f1, f2]).double(), dim=1)
    n = f1.shape[0]
    s = (z @ z.T / temperature).exp()
    losses = []
    for i in range(2 * n):
        p = (i + n) % (2 * n)
        others = [k for k in range(2 * n) if k != i and (form == "ntxent" or k != p)]
        denominator = s[i, others].sum() + (1e-8 if form == "upstream" else 0.0)
        losses.append(-torch.log(s[i, p] / denominator))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("form", ["upstream", "ntxent"])
def test_single_process_loss_matches_the_formula(form):
    g = torch.Generator().manual_seed(0)
    for b, d, t in ((2, 3, 0.5), (5, 8, 0.1), (9, 4, 1.0)):
        f1, f2 = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
        got = cross_scale_contrastive_loss(f1, f2, t, form)
        assert got.dtype == torch.float32
        assert_close(got, reference_loss(f1, f2, t, form))
        assert torch.equal(
            cross_scale_contrastive_loss(f1, f2, t, form, gather_negatives=True), got
        )  # one process: no gathering


def test_bad_form_is_refused():
    with pytest.raises(ValueError, match="upstream"):
        cross_scale_contrastive_loss(torch.randn(2, 3), torch.randn(2, 3), form="simclr")


@pytest.mark.parametrize("form", ["upstream", "ntxent"])
def test_gathered_negatives_on_two_processes_equal_one_process_on_the_union(ranks, form):
    x1, x2 = contrastive_data()
    layer = feature_layer()
    loss = cross_scale_contrastive_loss(layer(x1), layer(x2), 0.5, form)  # one process, batch A ∪ B
    loss.backward()
    assert_close(torch.stack([r[f"contrastive/{form}/True"][0] for r in ranks]).mean(), loss.detach())
    for r in ranks:  # after DDP's averaging every rank holds the union batch's gradient
        _, weight_grad, bias_grad = r[f"contrastive/{form}/True"]
        assert_close(weight_grad, layer.weight.grad)
        assert_close(bias_grad, layer.bias.grad)
    # and the gathered loss really differs from the per-device one
    assert not torch.allclose(ranks[0][f"contrastive/{form}/True"][0], ranks[0][f"contrastive/{form}/False"][0])


@pytest.mark.parametrize("form", ["upstream", "ntxent"])
def test_per_device_negatives_on_two_processes_are_the_mean_of_local_losses(ranks, form):
    x1, x2 = contrastive_data()
    layer = feature_layer()
    local = [
        cross_scale_contrastive_loss(layer(x1[r * B : (r + 1) * B]), layer(x2[r * B : (r + 1) * B]), 0.5, form)
        for r in range(WORLD)
    ]
    for r in range(WORLD):
        assert_close(ranks[r][f"contrastive/{form}/False"][0], local[r].detach())
    torch.stack(local).mean().backward()
    for r in ranks:
        assert_close(r[f"contrastive/{form}/False"][1], layer.weight.grad)
        assert_close(r[f"contrastive/{form}/False"][2], layer.bias.grad)


def test_gather_with_grad_concatenates_in_rank_order_and_returns_each_slice_its_gradient(ranks):
    expected = torch.cat([torch.full((2, 3), float(r)) for r in range(WORLD)])
    weight = torch.arange(WORLD * 2.0).view(-1, 1)
    for r, result in enumerate(ranks):
        assert torch.equal(result["gather/value"], expected)
        # every rank's loss is sum(gathered * weight): rank r's slice receives WORLD x its weights
        assert torch.equal(result["gather/grad"], (WORLD * weight[2 * r : 2 * r + 2]).expand(2, 3))
    x = torch.randn(3, 2)
    assert ops.gather_with_grad(x) is x  # not distributed


# ---------------------------------------------------------------- SyncBatchNorm1d


@pytest.mark.parametrize("name", ["3d", "2d"])
def test_sync_batchnorm_on_two_processes_equals_batchnorm_on_the_union(ranks, name):
    x, weights, x2d = bn_data()
    data, momentum = (x, 0.1) if name == "3d" else (x2d, None)
    w = weights if name == "3d" else weights[:, :, 0]
    bn = bn_params(nn.BatchNorm1d(TOKENS, momentum=momentum))
    union = data.clone().requires_grad_(True)
    for _ in range(2):
        y = bn(union)
    loss = (y * w).mean()  # = the mean of the two ranks' losses
    loss.backward()
    for r, result in enumerate(ranks):
        out, x_grad, weight_grad, bias_grad, running_mean, running_var, tracked = result[f"bn/{name}"]
        rows = slice(r * N_BN, (r + 1) * N_BN)
        assert_close(out, y[rows].detach())
        assert_close(
            x_grad, WORLD * union.grad[rows]
        )  # the sum over ranks of d(rank loss)/d(input), as nn.SyncBatchNorm
        assert_close(weight_grad, bn.weight.grad)
        assert_close(bias_grad, bn.bias.grad)
        assert_close(running_mean, bn.running_mean)
        assert_close(running_var, bn.running_var)
        assert torch.equal(tracked, bn.num_batches_tracked)
        bn.eval()
        assert_close(result[f"bn/{name}/eval"], bn(data[rows]).detach())
        bn.train()


def test_synced_predictor_trains_like_one_process_on_the_union(ranks):
    # one process on the union of the ranks' rows: its loss is the mean of the ranks' losses
    union_losses, expected = sgd_steps(predictor(), predictor_data(), nn.functional.mse_loss)
    for result in ranks:
        losses, state = result["predictor"]
        assert_close(torch.stack([r["predictor"][0] for r in ranks]).mean(0), union_losses)
        assert state.keys() == expected.keys()  # nn.BatchNorm1d's keys
        for key, value in expected.items():
            if value.is_floating_point():
                assert_close(state[key], value, rtol=2e-6)
            else:
                assert torch.equal(state[key], value), key


@pytest.mark.parametrize("name, per_rank", [("seg", N_SEG), ("seg/one value per rank", 1)])
def test_synced_segmentation_batchnorms_train_like_one_process_on_the_union(ranks, name, per_rank):
    """engine_segment under DDP (gloo here, NCCL on GPUs): both ranks' BatchNorm statistics, also where each rank's
    pooled map holds one value per channel (the union holds 2: plain BatchNorm statistics)."""
    union_losses, expected = train_seg_head(seg_head(), slice(0, WORLD * per_rank))
    assert_close(torch.stack([r[name][0] for r in ranks]).mean(0), union_losses, rtol=2e-6)
    for result in ranks:
        state = result[name][1]
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            # float32 sums in another order (per rank, then merged); the first BatchNorm's bias gradient is a
            # near-cancelling sum (a batch statistic follows it), so its tiny update is compared in absolute terms
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.cuda
@pytest.mark.parametrize("bn_class, shape", [(ops.SyncBatchNorm2d, (6, 4, 5, 5)), (ops.SyncBatchNorm1d, (6, 4, 7))])
def test_synced_batchnorm_under_bf16_autocast_on_the_device(cuda_device, tmp_path, bn_class, shape):
    """The synced path (statistics gathered with autograd) on the device's backend (NCCL on a GPU; one process, so
    the gathered statistics are this process's): bf16 activations in, bf16 out, fp32 statistics equal to
    BatchNorm's on the same values, gradients back to the input."""
    backend = "nccl" if cuda_device.type == "cuda" else "gloo"
    if cuda_device.type == "cuda":
        torch.cuda.set_device(cuda_device)
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(9)
        x = (torch.randn(shape) * 3 + 2).to(cuda_device, torch.bfloat16).requires_grad_(True)
        synced = bn_class(4).to(cuda_device)
        plain = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(4).to(cuda_device)
        with torch.autocast(cuda_device.type, dtype=torch.bfloat16):
            y = synced._sync_forward(x)  # forward() takes the plain path on one process
        y.float().square().mean().backward()
        expected = plain(x.detach().float())
    finally:
        dist.destroy_process_group()
    assert y.dtype == torch.bfloat16 and x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(y.float(), expected, atol=3e-2, rtol=1e-2)  # bf16: 8 mantissa bits
    torch.testing.assert_close(synced.running_mean, plain.running_mean, rtol=1e-5, atol=1e-6)  # fp32 statistics
    torch.testing.assert_close(synced.running_var, plain.running_var, rtol=1e-5, atol=1e-6)


def test_convert_sync_batchnorm_keeps_the_state_dict_and_single_process_behaviour():
    plain = predictor()
    plain[1].running_mean.uniform_()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    weight = plain[1].weight
    converted = ops.convert_sync_batchnorm(plain)
    assert converted is plain and type(plain[1]) is ops.SyncBatchNorm1d and plain[1].weight is weight
    assert plain.state_dict().keys() == before.keys()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in before.items())
    reference = predictor()
    reference.load_state_dict(before)
    x = torch.randn(3, TOKENS, HIDDEN)
    for mode in (True, False):
        plain.train(mode), reference.train(mode)
        assert torch.equal(plain(x), reference(x))
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in reference.state_dict().items())
    bn = nn.BatchNorm1d(3)
    assert type(ops.convert_sync_batchnorm(bn)) is ops.SyncBatchNorm1d
    with pytest.raises(ValueError, match="expected 2D or 3D"):
        bn(torch.randn(2, 3, 4, 5))


# ---------------------------------------------------------------- collectives on the right device


def test_all_reduce_mean_averages_over_ranks_in_one_collective(ranks):
    expected = {"a": 0.5, "b": 6.0, "c": 2.0}
    for result in ranks:
        assert result["reduce_mean"] == expected and list(result["reduce_mean"]) == ["a", "b", "c"]
    assert ops.all_reduce_mean({"x": torch.tensor(1.5), "y": 3}, "cpu") == {"x": 1.5, "y": 3.0}
    assert ops.all_reduce_mean({}, "cpu") == {}


def todays_reduce_means(values: dict[str, float]) -> dict[str, float]:
    """The former reduce_means (the NCCL bug): the collective's tensor is created on the CPU whatever the device."""
    names = sorted(values)
    tensor = torch.tensor([float(values[n]) for n in names], dtype=torch.float64)
    if ops.is_distributed():
        dist.all_reduce(tensor)
        tensor /= ops.world_size()
    return dict(zip(names, tensor.tolist()))


def test_strict_collectives_catch_a_cpu_tensor_where_training_runs_elsewhere():
    with strict_collectives("meta", world_size=2):
        with pytest.raises(WrongDeviceError, match="got a tensor on cpu while training runs on meta"):
            todays_reduce_means({"loss": 1.0})
    with strict_collectives("cuda:0", world_size=2):  # no GPU needed: only the device is compared
        with pytest.raises(WrongDeviceError, match="on cpu while training runs on cuda:0"):
            dist.all_reduce(torch.zeros(2))
    with strict_collectives("cpu") as log:  # on the CPU the same code is right (and really communicates)
        assert todays_reduce_means({"loss": 1.0}) == {"loss": 1.0}
    assert log.calls == [("all_reduce", ("cpu",))]
    assert not dist.is_initialized()


def test_every_collective_of_the_module_runs_on_the_training_device():
    device = torch.device("meta")
    with strict_collectives(device, world_size=2) as log:
        run_allowing_meta_readback(
            lambda: ops.all_reduce_mean({"loss": torch.ones((), device=device), "n": 3}, device), log
        )
        assert log.calls[-1] == ("all_reduce", ("meta",))
        f1 = torch.randn(4, 8, device=device, requires_grad=True)
        loss = cross_scale_contrastive_loss(f1, f1 * 2, gather_negatives=True)
        assert loss.device == device and log.calls[-1][0] == "all_gather"
        bn = ops.SyncBatchNorm1d(TOKENS, device=device)
        assert bn(torch.randn(3, TOKENS, HIDDEN, device=device)).device == device
        assert log.calls[-1][0] == "all_gather"
        assert all(set(devices) == {"meta"} for _, devices in log.calls)


def test_gathers_for_evaluation_and_knn_run_on_the_training_device():
    from util.eval.knn import knn_accuracies

    device = torch.device("meta")
    with strict_collectives(device, world_size=2) as log:
        run_allowing_meta_readback(lambda: ops.gather_rows(torch.zeros(3, 4, device=device), device), log)
        assert {name for name, _ in log.calls} == {"all_gather"}
        queries, memory = torch.zeros(5, 4), torch.zeros(7, 4)  # features arrive on the CPU from inference
        run_allowing_meta_readback(
            lambda: knn_accuracies(
                memory,
                torch.zeros(7, dtype=torch.long),
                queries,
                torch.zeros(5, dtype=torch.long),
                2,
                k=3,
                majority_k=3,
                device=device,
            ),
            log,
        )
        assert all(set(devices) == {"meta"} for _, devices in log.calls)


def test_a_multi_task_slurm_step_without_rendezvous_address_is_refused(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_PROCID", "2")
    with pytest.raises(ops.ReportableError, match="SLURM step with 4 tasks but no MASTER_ADDR"):
        ops.init_distributed()
    monkeypatch.setenv("SLURM_STEP_ID", "batch")  # the batch script itself is one process
    assert ops.init_distributed() == (0, 1, 0)


@pytest.mark.parametrize(
    "spec, node, expected",
    [("8(x2)", "1", 8), ("3,2", "1", 2), ("2(x3),1", "3", 1), ("4", "0", 4), ("4", "1", None), ("x", "0", None)],
)
def test_slurm_tasks_on_this_node_from_the_compressed_list(spec, node, expected):
    assert ops.tasks_on_node(spec, node) == expected


def test_srun_tasks_share_their_nodes_cpus(monkeypatch):
    """Under srun (no torchrun) each task must know how many share its node: its threads and default data workers
    are its share (``util.run.threads``), not the whole node's."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):  # what init_distributed sets
        monkeypatch.setenv(name, "")  # recorded, so that the value it sets is removed after the test
        monkeypatch.delenv(name)
    env = {"SLURM_NTASKS": "16", "SLURM_STEP_ID": "0", "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}
    env.update(MASTER_ADDR="127.0.0.1", SLURM_STEP_TASKS_PER_NODE="8(x2)", SLURM_NODEID="1", SLURM_CPUS_ON_NODE="16")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(ops.dist, "init_process_group", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))  # unbound: the node's 16 CPUs
    assert ops.init_distributed() == (9, 16, 1)
    assert os.environ["LOCAL_WORLD_SIZE"] == "8"
    assert "8 processes on this node" in threads.default_workers(load=lambda cpus: None)[1]
    del os.environ["LOCAL_WORLD_SIZE"]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 3})  # bound to its own 2 CPUs: those are its share
    ops.init_distributed()
    assert "LOCAL_WORLD_SIZE" not in os.environ


@pytest.mark.parametrize(
    "nodes, first",
    [
        ("gpu[01-02]", "gpu01"),
        ("alpha,beta", "alpha"),
        ("node[001,003-004]", "node001"),
        ("rack[2-3]-n[07-08],login1", "rack2-n07"),
        ("solo", "solo"),
        ("bad[", None),
        ("", None),
    ],
)
def test_the_first_host_of_a_slurm_node_list_without_scontrol(nodes, first):
    """Inside Apptainer / enroot there is no scontrol (pytorch-lightning#14896): the node list is read here."""
    assert ops.first_host(nodes) == first


def test_a_multi_task_slurm_step_rendezvous_on_its_first_node(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NODELIST"):
        monkeypatch.setenv(name, "")  # recorded, so that what init_distributed sets is undone after the test
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    monkeypatch.setattr(ops.dist, "init_process_group", lambda *a, **k: None)
    monkeypatch.setattr(ops.torch.cuda, "is_available", lambda: False)
    assert ops.init_distributed() == (1, 2, 0)
    assert ops.os.environ["MASTER_ADDR"] == "gpu07" and ops.os.environ["RANK"] == "1"


def test_slurm_jobs_get_their_own_port():
    assert ops.slurm_port("123456") == 20000 + 123456 % 20000
    assert ops.slurm_port("7") != ops.slurm_port("8")
    assert ops.slurm_port(None) == 29500


@pytest.mark.parametrize(
    "nccl, expected",
    [
        ("eth", "eth1"),  # a prefix: the first interface it selects
        ("ib,eth", "eth1"),
        ("=eth2", "eth2"),  # an exact name
        ("=eth", None),
        ("^docker,eth", "ib0"),  # every other interface, never the loopback
        ("^eth1,ib", "docker0"),  # what the exclusion leaves, as NCCL reads it
        ("wlan", None),
    ],
)
def test_gloo_takes_the_interface_nccl_was_told_to_use(nccl, expected):
    assert ops.gloo_interface(nccl, ["lo", "docker0", "eth1", "eth2", "ib0"]) == expected


def test_gloo_socket_ifname_is_set_from_nccls_unless_given(monkeypatch):
    monkeypatch.setattr(ops, "addressed_interfaces", lambda: ["lo", "enp1s0", "ens5"])
    environ = {"NCCL_SOCKET_IFNAME": "ens"}
    assert ops.gloo_interface_from_nccl(environ) == "gloo: GLOO_SOCKET_IFNAME=ens5 (from NCCL_SOCKET_IFNAME=ens)"
    assert environ["GLOO_SOCKET_IFNAME"] == "ens5"
    given = {"NCCL_SOCKET_IFNAME": "ens", "GLOO_SOCKET_IFNAME": "enp1s0"}
    assert ops.gloo_interface_from_nccl(given) is None and given["GLOO_SOCKET_IFNAME"] == "enp1s0"
    assert ops.gloo_interface_from_nccl({}) is None
    unmatched = {"NCCL_SOCKET_IFNAME": "ib"}
    assert "selects no interface with an IP address on this host" in ops.gloo_interface_from_nccl(unmatched)
    assert "GLOO_SOCKET_IFNAME" not in unmatched


def test_gloo_skips_interfaces_without_an_address(monkeypatch, tmp_path):
    """A bonded NIC's slaves (eth0, eth1) have no address: NCCL uses bond0, and so must gloo."""
    monkeypatch.setattr(socket, "if_nameindex", lambda: [(1, "lo"), (2, "eth0"), (3, "eth1"), (4, "bond0")])
    real_ioctl = fcntl.ioctl

    def ioctl(fd, request, arg):
        if request != ops.SIOCGIFADDR:
            return real_ioctl(fd, request, arg)
        if arg.rstrip(b"\0") not in (b"lo", b"bond0"):
            raise OSError(99, "Cannot assign requested address")
        return arg

    monkeypatch.setattr(fcntl, "ioctl", ioctl)
    if_inet6 = tmp_path / "if_inet6"  # eth1: a link-local IPv6 address only (no use to other nodes); bond0's global
    if_inet6.write_text(
        "fe800000000000000000000000000001 03 40 20 80     eth1\nfd000000000000000000000000000002 04 40 00 80    bond0\n"
    )
    monkeypatch.setattr(ops, "IF_INET6", str(if_inet6))
    assert ops.addressed_interfaces() == ["lo", "bond0"]
    environ = {"NCCL_SOCKET_IFNAME": "^docker,lo"}
    assert (
        ops.gloo_interface_from_nccl(environ) == "gloo: GLOO_SOCKET_IFNAME=bond0 (from NCCL_SOCKET_IFNAME=^docker,lo)"
    )
    assert "no interface with an IP address" in ops.gloo_interface_from_nccl({"NCCL_SOCKET_IFNAME": "=eth0"})
