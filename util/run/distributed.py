"""Process group membership and the collectives the training and evaluation loops use, on gloo (CPU) and
NCCL (CUDA) alike: every tensor a collective sees lives on the training device (NCCL takes CUDA tensors only).

Every function works unchanged in a single process (no process group): collectives become identities.

The autograd collectives of ``torch.distributed.nn.functional`` refuse to be traced by ``torch.compile``; the
functions that use them are excluded from compilation (``torch.compiler.disable``: a compiled model
graph-breaks around them and they run eagerly).
"""

from __future__ import annotations

import datetime
import os
import re
import warnings
from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from util.errors import ReportableError
from util.run.rng import rng_state


def init_distributed(timeout_minutes: float = 30.0) -> tuple[int, int, int]:
    """Join the process group that torchrun or SLURM describes; returns (rank, world_size, local_rank).

    Single-process runs (no ``RANK``/``WORLD_SIZE``, no multi-task SLURM job) return (0, 1, 0). A multi-task SLURM step
    without ``MASTER_ADDR`` rendezvous on the first node of its node list (``first_host``).

    Raises:
        ReportableError: a multi-task SLURM step without ``MASTER_ADDR`` whose node list cannot be read.
    Collectives time out after ``timeout_minutes``, so a dead rank ends the job instead of hanging it.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 and os.environ.get("SLURM_STEP_ID", "batch") not in (
        "batch",
        "extern",
    ):
        if "MASTER_ADDR" not in os.environ:  # otherwise every task would train alone as rank 0 into one folder
            nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
            first = first_host(nodes)
            if first is None:
                raise ReportableError(
                    f"SLURM step with {os.environ['SLURM_NTASKS']} tasks but no MASTER_ADDR, and the first node of "
                    f"its node list {nodes!r} cannot be told: export MASTER_ADDR (the first node's host name) or "
                    "launch one task per node with train_distributed.sh, which runs torchrun"
                )
            os.environ["MASTER_ADDR"] = first  # task 0 runs on the step's first node
        rank, world_size = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        local_rank = int(os.environ.get("SLURM_LOCALID", 0))
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
        # what torchrun sets, and what the CPU share of a process (threads, default --num_workers) divides by: tasks
        # left unbound see the node's CPUs, which each counted as its own (8 tasks x 15 data workers on 16 cores);
        # tasks bound to their own CPUs (--cpus-per-task with task affinity) see only theirs: no division there
        on_node = tasks_on_node(os.environ.get("SLURM_STEP_TASKS_PER_NODE", ""), os.environ.get("SLURM_NODEID", "0"))
        node_cpus = os.environ.get("SLURM_CPUS_ON_NODE", "")
        if on_node is not None and node_cpus.isdigit() and len(os.sched_getaffinity(0)) >= int(node_cpus):
            os.environ.setdefault("LOCAL_WORLD_SIZE", str(on_node))
        os.environ.setdefault("MASTER_PORT", str(slurm_port(os.environ.get("SLURM_JOB_ID"))))
    else:
        return 0, 1, 0
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    note = gloo_interface_from_nccl(os.environ)
    if note and local_rank == 0:  # one line per node: each node has its own interfaces
        print(note, flush=True)
    if backend == "nccl":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return rank, world_size, local_rank


def gloo_interface(nccl_ifname: str, interfaces: list[str]) -> str | None:
    """The first of this host's ``interfaces`` (``socket.if_nameindex`` order) that ``NCCL_SOCKET_IFNAME`` selects,
    by NCCL's rules: ``eth,ib`` prefixes, ``=eth0`` exact names, ``^docker,lo`` every other interface (then never the
    loopback ``lo``, which other nodes cannot reach); None when none matches. Gloo takes exact names only."""
    spec = nccl_ifname.strip()
    exclude = spec.startswith("^")
    spec = spec.removeprefix("^")
    exact = spec.startswith("=")
    names = [name for name in spec.removeprefix("=").split(",") if name]
    for interface in interfaces:
        selected = interface in names if exact else any(interface.startswith(name) for name in names)
        if selected != exclude and not (exclude and interface == "lo"):
            return interface
    return None


SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address
IF_INET6 = "/proc/net/if_inet6"  # Linux: one line per IPv6 address (address, index, prefix, scope, flags, name)


def addressed_interfaces() -> list[str]:
    """This host's network interfaces that have an IPv4 or a non-link-local IPv6 address, in ``socket.if_nameindex``
    order: those NCCL and gloo can use. Without it the first name an ``NCCL_SOCKET_IFNAME`` exclusion left was taken,
    e.g. ``eth0`` enslaved to ``bond0`` (no address), and gloo failed to bind where NCCL used ``bond0``. Every
    interface where this cannot be read (not Linux)."""
    import socket

    names = [name for _, name in socket.if_nameindex()]
    try:
        import fcntl
        import struct

        with open(IF_INET6) as table:  # scope 20: link-local
            ipv6 = {fields[5] for fields in map(str.split, table) if len(fields) == 6 and fields[3] != "20"}
    except (ImportError, OSError):
        return names
    addressed = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for name in names:
            try:
                fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address (EADDRNOTAVAIL)
                if name not in ipv6:
                    continue
            addressed.append(name)
    return addressed


def gloo_interface_from_nccl(environ: dict) -> str | None:
    """Bind gloo (the CPU process group, and the stop-agreement group of NCCL runs: ``util.run.process``) to the
    network interface NCCL was told to use. Gloo binds to the address the host name resolves to, which on several nodes
    can be unreachable from the others (127.0.1.1 under Debian / Ubuntu's default ``/etc/hosts``, or a management
    NIC), so ``new_group(backend="gloo")`` fails or hangs where NCCL works. Where ``NCCL_SOCKET_IFNAME`` is set and
    ``GLOO_SOCKET_IFNAME`` is not, sets ``GLOO_SOCKET_IFNAME`` in ``environ`` to the interface it selects
    (``gloo_interface``) among those with an address (``addressed_interfaces``). Returns the start-up note, or None
    when nothing was set."""
    nccl = environ.get("NCCL_SOCKET_IFNAME")
    if not nccl or environ.get("GLOO_SOCKET_IFNAME"):
        return None
    interface = gloo_interface(nccl, addressed_interfaces())
    if interface is None:
        return (
            f"warning: NCCL_SOCKET_IFNAME={nccl} selects no interface with an IP address on this host; gloo binds to "
            "the address of the host name (set GLOO_SOCKET_IFNAME if the nodes cannot reach it)"
        )
    environ["GLOO_SOCKET_IFNAME"] = interface
    return f"gloo: GLOO_SOCKET_IFNAME={interface} (from NCCL_SOCKET_IFNAME={nccl})"


def tasks_on_node(tasks_per_node: str, node_id: str) -> int | None:
    """Tasks of a SLURM step on node ``node_id`` (``SLURM_NODEID``) from ``SLURM_STEP_TASKS_PER_NODE``, whose format
    is SLURM's compressed list: ``8(x2)`` (8 on each of 2 nodes), ``3,2``, ``2(x3),1``; None where it cannot be read."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        found = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if found is None:
            return None
        counts += [int(found[1])] * int(found[2] or 1)
    node = int(node_id) if node_id.isdigit() else -1
    return counts[node] if 0 <= node < len(counts) and counts[node] > 0 else None


def first_host(nodes: str) -> str | None:
    """The first host of a SLURM node list (``SLURM_JOB_NODELIST``), as ``scontrol show hostnames`` would list it,
    without scontrol (absent inside Apptainer / enroot containers): ``gpu[01-02]`` -> gpu01, ``alpha,beta`` -> alpha,
    ``node[001,003-004]`` -> node001 (zero padding kept), ``rack[2-3]-n[07-08]`` -> rack2-n07; None for a list it
    cannot read. (``train_distributed.sh`` reads it by the same rule.)"""
    depth, end = 0, len(nodes)
    for i, c in enumerate(nodes):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    entry = nodes[:end]
    while (found := re.match(r"^([^\[]*)\[([^\],-]+)[^\]]*\](.*)$", entry)) is not None:
        entry = found[1] + found[2] + found[3]
    return entry if re.fullmatch(r"[A-Za-z0-9._-]+", entry) else None


def slurm_port(job_id: str | None) -> int:
    """Rendezvous port of a SLURM job: 20000 + job id mod 20000 (jobs sharing a node do not collide; the same
    rule as train_distributed.sh); 29500 (torchrun's) without a job id."""
    return 20000 + int(job_id) % 20000 if job_id and job_id.isdigit() else 29500


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def main_print(*args, **kwargs) -> None:
    """``print`` on rank 0 only, flushed (so SLURM logs show lines as they happen)."""
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def gather_rows(tensor: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Concatenate every rank's rows on the CPU; rank r holds rows r, r + W, r + 2W, ... (as
    ``util.data.loaders.eval_loader`` shards), and that order is restored.

    The collective runs on ``device`` (default: the tensor's; the training device under NCCL), each rank's rows
    padded to the longest rank's count; only the result comes back to host memory.
    """
    if not is_distributed():
        return tensor.cpu()
    device = tensor.device if device is None else torch.device(device)
    local = tensor.to(device)
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([len(local)], device=device))
    counts = [int(c.item()) for c in counts]
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    out = torch.empty((sum(counts), *local.shape[1:]), dtype=local.dtype)
    for index, (part, count) in enumerate(zip(parts, counts)):
        out[index :: world_size()] = part[:count].cpu()
    return out


def gather_rng_states() -> list[dict]:
    """The RNG states of every rank, index = rank (collective: every rank must call it)."""
    if not is_distributed():
        return [rng_state()]
    states: list = [None] * world_size()
    dist.all_gather_object(states, rng_state())
    return states


def check_replicas_in_sync(model: torch.nn.Module) -> str:
    """Compare per-tensor checksums of the weights across ranks (collective); a one-line verdict, or an error."""
    checksums = torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()
    gathered = [torch.zeros_like(checksums) for _ in range(world_size())]
    dist.all_gather_object(gathered, checksums)
    differing = [r for r, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
    if differing:
        raise ReportableError(f"weights of rank(s) {differing} differ from rank 0 after training")
    return f"weights identical on all {world_size()} processes"


def _autograd_all_gather(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    from torch.distributed.nn import functional as dist_nn

    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", FutureWarning
        )  # "deprecated, use _functional_collectives" (no autograd on gloo)
        return dist_nn.all_gather(x)


@torch.compiler.disable
def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0: [W * B, ...] in rank order (rank r's rows at r*B:(r+1)*B).

    The gradient of the result flows back to each rank's own slice: rank r receives the sum over all ranks
    of d(their loss)/d(rows of r) (the backward pass is a reduce-scatter). With DDP averaging the parameter
    gradients over ranks afterwards, the gradient equals that of the rank-averaged loss.

    Every rank must pass a tensor of the same shape and dtype (the collective does not pad). Identity when
    not distributed (or a single process).
    """
    if world_size() == 1:
        return x
    return torch.cat(_autograd_all_gather(x), dim=0)


class SyncedBatchNorm:
    """Mixin for a BatchNorm class (``SyncBatchNorm1d``, ``SyncBatchNorm2d``, or a project's own BatchNorm subclass):
    training-mode statistics over every rank's batch, on any backend (gloo as NCCL: ``nn.SyncBatchNorm`` runs on CUDA
    only, so its synced path could never run in a CPU test).

    Inputs are [N, C, *]; statistics are per channel C over N and every further dimension, of all ranks together.
    Each rank computes its count, mean and centred sum of squares (M2) per channel in fp32, all ranks' triples are
    gathered with autograd (one collective) and combined with Chan's parallel formula (no E[x^2] - E[x]^2
    cancellation). The output uses the global mean and biased variance; ``running_mean`` / ``running_var`` are
    updated with the global mean and the *unbiased* global variance (x n / (n - 1), n = global count) and the
    momentum (or cumulative average when ``momentum`` is None, counted by ``num_batches_tracked``) exactly as
    ``nn.BatchNorm*d`` does. The output has the input's dtype (bf16 under autocast); the statistics are fp32.

    Gradients: rank r's input receives the sum over ranks of d(their loss)/d(its input), as with
    ``nn.SyncBatchNorm``; parameter gradients after DDP's averaging equal those of the rank-averaged loss
    computed on the union batch by the plain BatchNorm.

    In eval mode, or when not distributed (or on one process), it is the class it is mixed into (whose ``forward``
    then runs). The state dict (weight, bias, running_mean, running_var, num_batches_tracked) is unchanged.
    """

    process_group = None  # None: the default group

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training or not is_distributed() or dist.get_world_size(self.process_group) == 1:
            return super().forward(input)
        return self._sync_forward(input)

    @torch.compiler.disable
    def _sync_forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn import functional as dist_nn

        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = xf.numel() // xf.shape[1]
        local_mean = xf.mean(dim=dims)
        local_m2 = ((xf - _channel_view(local_mean, x.dim())) ** 2).sum(dim=dims)
        counts = torch.full_like(local_mean, float(count))
        stats = torch.stack([counts, local_mean, local_m2])  # [3, C]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            gathered = torch.stack(dist_nn.all_gather(stats, group=self.process_group or dist.group.WORLD))  # [W, 3, C]
        n_r, mean_r, m2_r = gathered.unbind(1)  # each [W, C]
        n = n_r.sum(0)
        mean = (n_r * mean_r).sum(0) / n
        m2 = (m2_r + n_r * (mean_r - mean) ** 2).sum(0)
        var = m2 / n  # biased, for normalising

        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    factor = 1.0 / float(self.num_batches_tracked)
                else:
                    factor = self.momentum
                unbiased = m2 / (n - 1).clamp(min=1)  # on the device: no host synchronisation
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)

        scale = torch.rsqrt(var + self.eps)
        y = (xf - _channel_view(mean, x.dim())) * _channel_view(scale, x.dim())
        if self.affine:
            y = y * _channel_view(self.weight.float(), x.dim()) + _channel_view(self.bias.float(), x.dim())
        return y.to(x.dtype)


class SyncBatchNorm1d(SyncedBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` synced over ranks (``SyncedBatchNorm``): inputs [N, C] or [N, C, L]. The token predictor's
    ``BatchNorm1d(num_tokens)`` on [B, num_tokens, hidden] normalises each token position over every rank's
    batch x hidden."""


class SyncBatchNorm2d(SyncedBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` synced over ranks (``SyncedBatchNorm``): inputs [N, C, H, W], statistics over N, H, W."""


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.view(1, -1, *([1] * (ndim - 2)))


SYNCED = {nn.BatchNorm1d: SyncBatchNorm1d, nn.BatchNorm2d: SyncBatchNorm2d}


def convert_sync_batchnorm(
    module: nn.Module, process_group=None, synced: Mapping[type, type] | None = None
) -> nn.Module:
    """Turn every BatchNorm in ``module`` (itself included) whose exact class is a key of ``synced`` (default
    ``SYNCED``: ``nn.BatchNorm1d`` and ``nn.BatchNorm2d``) into its synced class, in place.

    The objects keep their parameters and buffers (only their class changes), so state-dict keys and
    values, optimiser references and checkpoints are unaffected. Other BatchNorm types are left alone.
    Returns ``module``.
    """
    synced = SYNCED if synced is None else synced
    for child in module.modules():
        if type(child) in synced:
            child.__class__ = synced[type(child)]
            if process_group is not None:
                child.process_group = process_group
    return module


def all_reduce_mean(values: Mapping[str, float | torch.Tensor], device: torch.device | str) -> dict[str, float]:
    """Average scalars over ranks with one collective; returns {name: float} in the order given.

    The values (Python numbers or scalar tensors, on any device) are stacked into one float64 tensor
    created **on** ``device`` (NCCL accepts only CUDA tensors; gloo takes CPU ones), all-reduced once,
    divided by the world size and read back with a single host synchronisation. ``device`` should be the
    training device (``run.device``); float32 is used only where float64 does not exist (MPS).
    """
    device = torch.device(device)
    dtype = torch.float32 if device.type == "mps" else torch.float64
    names = list(values)
    if not names:
        return {}
    stacked = torch.stack(
        [
            v.detach().to(device=device, dtype=dtype).reshape(())
            if torch.is_tensor(v)
            else torch.tensor(float(v), dtype=dtype, device=device)
            for v in values.values()
        ]
    )
    if world_size() > 1:
        dist.all_reduce(stacked)
        stacked = stacked / world_size()
    return dict(zip(names, stacked.tolist()))
