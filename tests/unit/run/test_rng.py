"""util/run/rng.py: seeding per sample leaves every other generator alone; states round-trip."""

import random

import numpy as np
import pytest
import torch
from conftest import needs_cuda_api

from util.run.rng import rng_state, seeded, set_rng_state


def test_per_sample_seeding_restores_the_cpu_streams_and_never_reseeds_cuda(monkeypatch):
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    before = rng_state()
    with seeded(1234):
        inside = torch.rand(1).item(), random.random(), np.random.rand()
    with seeded(1234):
        assert (torch.rand(1).item(), random.random(), np.random.rand()) == inside
    after = rng_state()
    assert torch.equal(after["torch"], before["torch"]) and after["python"] == before["python"]
    assert reseeded == []  # CUDA generators (mask noise on the GPU) are untouched


def test_reconstruction_figures_do_not_reseed_cuda(monkeypatch):
    from models_cross_scale_mae import create_model
    from util.eval.figures import reconstruction_columns

    torch.manual_seed(0)
    model = create_model("cross_scale_mae_vit_tiny", input_size=32, patch_size=8)
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    images = torch.randn(2, 3, 32, 32)
    cpu_state = torch.get_rng_state()
    reconstruction_columns(model, images, (0.5,) * 3, (0.25,) * 3)
    assert reseeded == [] and torch.equal(torch.get_rng_state(), cpu_state)


def test_states_round_trip_through_plain_types():
    state = rng_state()
    expected = torch.rand(3), random.random(), np.random.rand()
    state["python"] = [state["python"][0], list(state["python"][1]), state["python"][2]]  # as a checkpoint returns it
    set_rng_state(state)
    assert (
        torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]
    )


@pytest.mark.cuda
def test_only_this_processs_gpu_generator_is_saved_and_restored(cuda_device):
    needs_cuda_api(cuda_device)
    torch.cuda.init()
    state = rng_state()
    assert torch.is_tensor(state["cuda"])  # one generator: this rank's device, not every visible GPU
    expected = torch.rand(4, device="cuda")
    set_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), expected)
