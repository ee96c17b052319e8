"""Test helper: make NCCL's "CUDA tensors only" rule visible on a CPU-only machine.

NCCL refuses tensors that are not on the GPU; gloo takes CPU tensors. A collective fed a CPU tensor while
training on CUDA therefore passes every CPU test and kills the first multi-GPU run. On a CPU machine the
tensor and the training device are both "cpu", so no check of the *values* can notice.

``strict_collectives(expected_device)`` wraps torch.distributed's tensor collectives (all_reduce, all_gather,
all_gather_into_tensor, broadcast, reduce, reduce_scatter, scatter, all_to_all, ...; the host-side
``*_object`` collectives are exempt) and raises ``WrongDeviceError`` at the first tensor argument that is
not on ``expected_device``. The unit under test is then run with a training device that is *not* the CPU:
``torch.device("meta")`` exists on every machine, so code that builds its collective tensors on the
device it was given passes, and code that builds them on the CPU (``torch.tensor([...])``) fails, exactly
as it would on NCCL.

Meta tensors carry no data, so for a non-CPU ``expected_device`` (or a fake ``world_size`` > 1) the
collectives only check and return (no communication; outputs keep whatever they held). Reading a meta
value back (``.item()``, ``.tolist()``) raises afterwards; ``run_allowing_meta_readback`` tolerates exactly
that error, once at least one collective was checked. Numbers are checked separately, in real gloo runs.

If no process group exists, a single-rank gloo group on an in-memory store is created for the duration
(so ``dist.is_initialized()`` is genuinely true), and ``dist.get_world_size`` reports ``world_size``.
Code that imported a collective by name (``from torch.distributed import all_reduce``) before the patch
escapes it; call collectives through the module (``dist.all_reduce``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "scatter",
    "gather",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
)


class WrongDeviceError(AssertionError):
    """A collective got a tensor on another device than the one training runs on."""


@dataclass
class CollectiveLog:
    expected: torch.device
    calls: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)  # (collective, devices of its tensors)


def _tensors(value) -> Iterator[torch.Tensor]:
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _same_device(tensor: torch.Tensor, expected: torch.device) -> bool:
    if tensor.device.type != expected.type:
        return False
    return expected.index is None or tensor.device.index == expected.index


@contextmanager
def strict_collectives(expected_device: torch.device | str, world_size: int = 1) -> Iterator[CollectiveLog]:
    """Within the block, every tensor collective raises ``WrongDeviceError`` unless all its tensors are on
    ``expected_device``; yields the log of checked calls. See the module docstring."""
    expected = torch.device(expected_device)
    log = CollectiveLog(expected)
    created_group = False
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        created_group = True
    fake = expected.type != "cpu" or world_size > 1
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
    original_world_size = dist.get_world_size

    def wrap(name: str, original: Callable) -> Callable:
        def checked(*args, **kwargs):
            tensors = [t for value in (*args, *kwargs.values()) for t in _tensors(value)]
            log.calls.append((name, tuple(str(t.device) for t in tensors)))
            wrong = [t for t in tensors if not _same_device(t, expected)]
            if wrong:
                raise WrongDeviceError(
                    f"dist.{name} got a tensor on {wrong[0].device} while training runs on {expected}: "
                    f"NCCL would refuse it (create the tensor on the training device)"
                )
            if fake:
                return None
            return original(*args, **kwargs)

        return checked

    try:
        for name, original in originals.items():
            setattr(dist, name, wrap(name, original))
        if world_size != 1:
            dist.get_world_size = lambda group=None: world_size
        yield log
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
        dist.get_world_size = original_world_size
        if created_group:
            dist.destroy_process_group()


def is_meta_readback_error(error: BaseException) -> bool:
    return isinstance(error, (NotImplementedError, RuntimeError)) and "meta" in str(error)


def run_allowing_meta_readback(fn: Callable, log: CollectiveLog):
    """Call ``fn()``; a failure to read a meta tensor's value is accepted once a collective was checked
    (the device placement, the point of the test, was then already verified). Returns fn's result or None."""
    try:
        return fn()
    except WrongDeviceError:
        raise
    except Exception as error:
        if is_meta_readback_error(error) and log.calls:
            return None
        raise
