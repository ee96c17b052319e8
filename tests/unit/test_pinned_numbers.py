"""Today's numbers, pinned: every loss term and a checksum of every gradient of the paper model and of plain
MAE, the features of a classifier built from a checkpoint, and the LR of every update of a short schedule.

The expected values live in ``tests/pinned_numbers.json`` and were computed before the code was reorganised;
a refactor that changes any of them changes behaviour. Regenerate only for a deliberate change of numerics:
``python tests/test_pinned_numbers.py --write``.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import pytest
import torch

PINNED = Path(__file__).with_name("pinned_numbers.json")
MODELS = ("cross_scale_mae_vit_tiny", "mae_vit_tiny", "mae_vit_tiny_MsLdCe", "mae_vit_tiny_MsLdLeCd")
BATCH, SIDE, PATCH = 4, 32, 8
CROP_BOX = (4, 6, 20, 18)  # top, left, height, width of the second view
# Tolerances, from what other CPUs measured (AVX2-only vs AVX-512, 1 vs 2 threads: the reduction order changes the
# float32 rounding): loss terms agreed to 1.4e-7 (relative), gradient energies to 3.3e-7 (relative), and a gradient
# differed by at most 7.9e-7 of its own L2 norm. 1e-5 leaves a margin of 12x and still catches any change of numerics.
RELATIVE_TOLERANCE = 1e-5


def fixed_images() -> torch.Tensor:
    return torch.randn(BATCH, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(7))


def fixed_noise(views: int) -> torch.Tensor:
    return torch.rand(views, BATCH, (SIDE // PATCH) ** 2, generator=torch.Generator().manual_seed(11))


def projection(name: str, shape: torch.Size) -> torch.Tensor:
    """A fixed random unit vector per parameter (float64, seeded by the parameter's name)."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    direction = torch.randn(shape.numel(), generator=generator, dtype=torch.float64)
    return direction / direction.norm()


def pretraining_numbers(name: str) -> dict[str, float]:
    """Loss terms and, per parameter, two statistics of its gradient g (fp32, CPU) that do not cancel: its energy
    ``sum(g**2)`` and its component along a fixed random direction ``<g, r>`` (|r| = 1).

    A plain ``sum(g)`` is not pinned: for many parameters it cancels to about 0 analytically (a block feeding a
    LayerNorm), so what remains is float32 rounding noise that depends on the reduction order (threads, SIMD width).
    The projection's rounding noise is bounded by that of g, a fraction of |g| (``assert_close``)."""
    import models_cross_scale_mae as models_mae

    torch.manual_seed(0)
    model = models_mae.create_model(name, input_size=SIDE, patch_size=PATCH)
    out = model(fixed_images(), noise=fixed_noise(2 if model.multi_scale else 1), crop_params=CROP_BOX)
    out["loss"].backward()
    numbers = {f"loss/{term}": out[term].item() for term in ("loss", *model.loss_names)}
    for param_name, param in model.named_parameters():
        if param.grad is not None:
            grad = param.grad.double().flatten()
            numbers[f"grad_sq/{param_name}"] = grad.square().sum().item()
            numbers[f"grad_proj/{param_name}"] = (grad @ projection(param_name, param.shape)).item()
    return numbers


def classifier_feature_numbers(tmp_path: Path) -> dict[str, float]:
    """Pooled features of a classifier whose encoder comes from a saved pretraining checkpoint."""
    import models_cross_scale_mae as models_mae
    from model_loading import build_classifier
    from util.config import Bands

    torch.manual_seed(0)
    model = models_mae.create_model("cross_scale_mae_vit_tiny", input_size=SIDE, patch_size=PATCH)
    path = tmp_path / "pretrained.pth"
    torch.save({"model": model.state_dict(), "model_config": model.model_config, "epoch": 0}, path)
    torch.manual_seed(0)
    classifier, _ = build_classifier(
        4,
        finetune=str(path),
        model=None,
        input_size=SIDE,
        patch_size=None,
        bands=Bands(),
        global_pool=True,
        head_init_std=2e-5,
        drop_path=0.1,
    )  # main_finetune.py's defaults
    classifier.eval()
    with torch.no_grad():
        tokens = classifier.forward_features(fixed_images()).double()  # [B, 1+L, D], before pooling
    projection = torch.randn(tokens.shape[-1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return {
        "features/projected": (tokens @ projection).sum().item(),
        "features/sq": tokens.square().sum().item(),
        "features/first": tokens[0, 0, 0].item(),
    }


def schedule_numbers() -> dict[str, float]:
    """LR of every optimiser update: 3 epochs of 5 steps, 1 warm-up epoch, lr 1, min_lr 0.1, accum_iter 1."""
    from util.config import Schedule
    from util.run.schedule import lr_scheduler

    plan = Schedule(epochs=3, batch_size=1, accum_iter=1, lr=1.0, min_lr=0.1, warmup_epochs=1.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = lr_scheduler(optimizer, plan, 5)
    numbers = {}
    for update in range(15):
        scheduler.step_update(update)
        numbers[f"lr/{update}"] = optimizer.param_groups[0]["lr"]
    return numbers


def all_numbers(tmp_path: Path) -> dict[str, dict[str, float]]:
    return {
        **{name: pretraining_numbers(name) for name in MODELS},
        "classifier": classifier_feature_numbers(tmp_path),
        "schedule": schedule_numbers(),
    }


@pytest.fixture(scope="module")
def pinned() -> dict:
    return json.loads(PINNED.read_text())


def assert_close(got: dict[str, float], expected: dict[str, float]) -> None:
    """Relative tolerance for every number, except a gradient's projection: its tolerance is relative to the
    gradient's norm (sqrt of the pinned energy), since the projection itself may be near 0."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if key.startswith("grad_proj/"):
            norm = expected["grad_sq/" + key.removeprefix("grad_proj/")] ** 0.5
            assert got[key] == pytest.approx(value, rel=0, abs=RELATIVE_TOLERANCE * norm), key
        else:
            assert got[key] == pytest.approx(value, rel=RELATIVE_TOLERANCE, abs=0), key


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """Run with 1 and with 2 intra-op threads: the reduction order, and so the rounding, differs."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", MODELS)
def test_loss_terms_and_gradients_are_unchanged(name, pinned, threads):
    assert_close(pretraining_numbers(name), pinned[name])


def test_classifier_features_from_a_checkpoint_are_unchanged(tmp_path, pinned, threads):
    assert_close(classifier_feature_numbers(tmp_path), pinned["classifier"])


def test_schedule_is_unchanged(pinned):
    assert_close(schedule_numbers(), pinned["schedule"])


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
    with tempfile.TemporaryDirectory() as tmp:
        PINNED.write_text(json.dumps(all_numbers(Path(tmp)), indent=1, sort_keys=True) + "\n")
    print(f"wrote {PINNED}")
