"""Collectives for training on several processes that work on gloo (CPU) and NCCL (CUDA) alike.

* ``gather_with_grad``: every rank's rows, with gradients flowing back to each rank's own slice.
* ``contrastive_loss``: the cross-scale consistency loss, optionally with negatives from every rank, so that
  the rank-averaged loss (and every gradient after DDP's averaging) equals one process on the union batch.
* ``SyncBatchNorm1d`` / ``convert_sync_batchnorm``: batch statistics over every rank's batch; unlike
  ``nn.SyncBatchNorm`` it also runs on CPU tensors (gloo), and it keeps ``nn.BatchNorm1d``'s state-dict keys.
* ``all_reduce_mean``: one collective for a whole log line, on the device the backend needs.

Nothing here imports the model modules (``util`` never imports top-level files).

The autograd collectives of ``torch.distributed.nn.functional`` refuse to be traced by ``torch.compile`` (and
warn that they are deprecated); the functions that use them are therefore excluded from compilation
(``torch.compiler.disable``: a compiled model graph-breaks around them and they run eagerly).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "is_distributed", "world_size", "rank", "gather_with_grad", "contrastive_loss", "SyncBatchNorm1d",
    "convert_sync_batchnorm", "all_reduce_mean",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _autograd_all_gather(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    from torch.distributed.nn import functional as dist_nn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "deprecated, use _functional_collectives" (no autograd on gloo)
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


def contrastive_loss(
    f1: torch.Tensor,
    f2: torch.Tensor,
    temperature: float = 0.5,
    form: Literal["upstream", "ntxent"] = "upstream",
    gather_negatives: bool = False,
) -> torch.Tensor:
    """Contrastive loss between two views; row i of ``f1`` and of ``f2`` are the positive pair.

    ``upstream``: l_i = -log(s_ip / (sum_{k not in {i, p}} s_ik + 1e-8)), s = exp(cos / T), i.e. the positive
    is left out of the denominator, as upstream's ``NTXentLoss`` computes. ``ntxent``: SimCLR's NT-Xent
    (positive in the denominator). Both average over this rank's 2B anchors.

    ``gather_negatives=True`` (on W processes): each rank's 2B anchors are contrasted against all 2WB
    features (gathered with gradient, ``gather_with_grad``). The similarity matrix is [2B, 2WB] with
    columns in **per-rank blocks**: columns r*2B : (r+1)*2B hold rank r's ``[f1_r; f2_r]``. Local anchor j
    (row j of ``[f1; f2]``) is therefore column ``rank*2B + j`` (itself, excluded) and its partner is
    column ``rank*2B + (j + B) % 2B``. The loss is a mean over anchors of a sum over all other columns,
    which does not depend on the column order, so the mean of the W ranks' losses equals the loss of one
    process on the union batch (whose layout is [f1 of all; f2 of all]), and so does every gradient once
    DDP averaged it over ranks. All ranks must pass the same B.

    Without gathering (or on one process) the result is bit-identical to the former
    ``models_cross_scale_mae.cross_scale_contrastive_loss``: the per-device loss, whose rank average is
    the mean of each rank's local loss.

    Args:
        f1: [B, D] features of view 1.
        f2: [B, D] features of view 2.
        temperature: Softmax temperature.
        form: ``upstream`` or ``ntxent``.
        gather_negatives: Contrast against the features of every rank.
    """
    if form not in ("upstream", "ntxent"):
        raise ValueError(f"contrastive form must be 'upstream' or 'ntxent', got {form!r}")
    n = f1.shape[0]
    z = F.normalize(torch.cat([f1, f2]).float(), dim=1)  # [2B, D]
    anchors = torch.arange(2 * n, device=z.device)
    partner = (anchors + n) % (2 * n)
    if not gather_negatives or world_size() == 1:
        sim = z @ z.T / temperature  # [2B, 2B]
        is_self = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    else:
        offset = rank() * 2 * n
        sim = z @ gather_with_grad(z).T / temperature  # [2B, 2WB], columns in per-rank blocks
        is_self = torch.zeros_like(sim, dtype=torch.bool)
        is_self[anchors, anchors + offset] = True
        partner = partner + offset
    if form == "ntxent":
        return F.cross_entropy(sim.masked_fill(is_self, float("-inf")), partner)
    is_negative = ~is_self
    is_negative[anchors, partner] = False
    denominator = (sim.exp() * is_negative).sum(dim=1)
    return (torch.log(denominator + 1e-8) - sim[anchors, partner]).mean()


class SyncBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training-mode statistics cover every rank's batch, on any backend.

    Inputs are [N, C] or [N, C, L]; statistics are per channel C over (N, L) of all ranks together (the
    token predictor's ``BatchNorm1d(num_tokens)`` on [B, num_tokens, hidden] normalises each token position
    over every rank's batch x hidden). Each rank computes its count, mean and centred sum of squares (M2) per
    channel in fp32, all ranks' triples are gathered with autograd (one collective) and combined with Chan's
    parallel formula (no E[x^2] - E[x]^2 cancellation). The output uses the global mean and biased
    variance; ``running_mean`` / ``running_var`` are updated with the global mean and the *unbiased* global
    variance (x n / (n - 1), n = global count) and the momentum (or cumulative average when ``momentum`` is
    None, counted by ``num_batches_tracked``) exactly as ``nn.BatchNorm1d`` does.

    Gradients: rank r's input receives the sum over ranks of d(their loss)/d(its input), as with
    ``nn.SyncBatchNorm``; parameter gradients after DDP's averaging equal those of the rank-averaged loss
    computed on the union batch by ``nn.BatchNorm1d``.

    In eval mode, or when not distributed (or on one process), it is ``nn.BatchNorm1d``. The state dict
    (weight, bias, running_mean, running_var, num_batches_tracked) is that of ``nn.BatchNorm1d``.
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

        dims = [0, 2] if x.dim() == 3 else [0]
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


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.view(1, -1, 1) if ndim == 3 else v.view(1, -1)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Turn every ``nn.BatchNorm1d`` in ``module`` (itself included) into a ``SyncBatchNorm1d`` in place.

    The objects keep their parameters and buffers (only their class changes), so state-dict keys and
    values, optimiser references and checkpoints are unaffected. Other BatchNorm types are left alone.
    Returns ``module``.
    """
    for child in module.modules():
        if type(child) is nn.BatchNorm1d:
            child.__class__ = SyncBatchNorm1d
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
    stacked = torch.stack([
        v.detach().to(device=device, dtype=dtype).reshape(()) if torch.is_tensor(v)
        else torch.tensor(float(v), dtype=dtype, device=device)
        for v in values.values()
    ])
    if world_size() > 1:
        dist.all_reduce(stacked)
        stacked = stacked / world_size()
    return dict(zip(names, stacked.tolist()))
