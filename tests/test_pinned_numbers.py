"""Today's numbers, pinned: every loss term and a checksum of every gradient of the paper model and of plain
MAE, the features of a classifier built from a checkpoint, and the LR of every update of a short schedule.

The expected values live in ``tests/pinned_numbers.json`` and were computed before the code was reorganised;
a refactor that changes any of them changes behaviour. Regenerate only for a deliberate change of numerics:
``python tests/test_pinned_numbers.py --write``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

PINNED = Path(__file__).with_name("pinned_numbers.json")
MODELS = ("cross_scale_mae_vit_tiny", "mae_vit_tiny", "mae_vit_tiny_MsLdCe", "mae_vit_tiny_MsLdLeCd")
BATCH, SIDE, PATCH = 4, 32, 8
CROP_BOX = (4, 6, 20, 18)  # top, left, height, width of the second view
RELATIVE_TOLERANCE = 1e-5  # float32 sums on another CPU may differ in the last bits


def fixed_images() -> torch.Tensor:
    return torch.randn(BATCH, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(7))


def fixed_noise(views: int) -> torch.Tensor:
    return torch.rand(views, BATCH, (SIDE // PATCH) ** 2, generator=torch.Generator().manual_seed(11))


def pretraining_numbers(name: str) -> dict[str, float]:
    """Loss terms and, per parameter, the sum and the sum of squares of its gradient (fp32, CPU)."""
    import models_cross_scale_mae as models_mae

    torch.manual_seed(0)
    model = models_mae.create_model(name, input_size=SIDE, patch_size=PATCH)
    out = model(fixed_images(), noise=fixed_noise(2 if model.multi_scale else 1), crop_params=CROP_BOX)
    out["loss"].backward()
    numbers = {f"loss/{term}": out[term].item() for term in ("loss", *model.loss_names)}
    for param_name, param in model.named_parameters():
        if param.grad is not None:
            numbers[f"grad_sum/{param_name}"] = param.grad.double().sum().item()
            numbers[f"grad_sq/{param_name}"] = param.grad.double().square().sum().item()
    return numbers


def classifier_feature_numbers(tmp_path: Path) -> dict[str, float]:
    """Pooled features of a classifier whose encoder comes from a saved pretraining checkpoint."""
    import main_finetune
    import models_cross_scale_mae as models_mae
    from util import config

    torch.manual_seed(0)
    model = models_mae.create_model("cross_scale_mae_vit_tiny", input_size=SIDE, patch_size=PATCH)
    path = tmp_path / "pretrained.pth"
    torch.save({"model": model.state_dict(), "model_config": model.model_config, "epoch": 0}, path)
    args = config.parse_args(main_finetune.get_args_parser(), ["--finetune", str(path), "--input_size", str(SIDE)])
    torch.manual_seed(0)
    classifier = build_classifier(args)
    classifier.eval()
    with torch.no_grad():
        tokens = classifier.forward_features(fixed_images()).double()  # [B, 1+L, D], before pooling
    projection = torch.randn(tokens.shape[-1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return {"features/projected": (tokens @ projection).sum().item(), "features/sq": tokens.square().sum().item(),
            "features/first": tokens[0, 0, 0].item()}


def build_classifier(args):
    """The fine-tuning classifier for ``args`` (4 classes)."""
    from model_loading import build_classifier as build

    return build(args, 4)[0]


def schedule_numbers() -> dict[str, float]:
    """LR of every optimiser update: 3 epochs of 5 steps, 1 warm-up epoch, lr 1, min_lr 0.1, accum_iter 1."""
    import argparse

    from util.schedule import lr_scheduler

    args = argparse.Namespace(epochs=3, warmup_epochs=1.0, min_lr=0.1, accum_iter=1, lr=1.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = lr_scheduler(optimizer, args, 5)
    numbers = {}
    for update in range(15):
        scheduler.step_update(update)
        numbers[f"lr/{update}"] = optimizer.param_groups[0]["lr"]
    return numbers


def all_numbers(tmp_path: Path) -> dict[str, dict[str, float]]:
    return {**{name: pretraining_numbers(name) for name in MODELS},
            "classifier": classifier_feature_numbers(tmp_path), "schedule": schedule_numbers()}


@pytest.fixture(scope="module")
def pinned() -> dict:
    return json.loads(PINNED.read_text())


def assert_close(got: dict[str, float], expected: dict[str, float]) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=RELATIVE_TOLERANCE, abs=1e-7), key


@pytest.mark.parametrize("name", MODELS)
def test_loss_terms_and_gradients_are_unchanged(name, pinned):
    assert_close(pretraining_numbers(name), pinned[name])


def test_classifier_features_from_a_checkpoint_are_unchanged(tmp_path, pinned):
    assert_close(classifier_feature_numbers(tmp_path), pinned["classifier"])


def test_schedule_is_unchanged(pinned):
    assert_close(schedule_numbers(), pinned["schedule"])


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory() as tmp:
        PINNED.write_text(json.dumps(all_numbers(Path(tmp)), indent=1, sort_keys=True) + "\n")
    print(f"wrote {PINNED}")
