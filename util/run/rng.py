"""Random generators: seeding, and saving / restoring every stream the training loop draws from."""

from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def seeded(seed: int):
    """Seed torch, Python and NumPy (timm's transforms draw from all three), then restore their states."""
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.random.default_generator.manual_seed(
        seed
    )  # the CPU generator only: torch.manual_seed would reseed CUDA's too
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


def rng_state() -> dict:
    """Every random generator the training loop draws from, as tensors and plain types."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), position, has_gauss, cached),
    }
    if (
        torch.cuda.is_available() and torch.cuda.is_initialized()
    ):  # this process's own GPU (see util.run.process.cuda_index)
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned (also after a checkpoint round trip turned tuples into lists)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    cuda = state.get("cuda")
    if (
        torch.is_tensor(cuda) and torch.cuda.is_available()
    ):  # a list: an older checkpoint's every-GPU states, not restored
        torch.cuda.set_rng_state(cuda, torch.cuda.current_device())
