"""Fake datasets generated per test: a few small RGB images with an easy, learnable label."""

from __future__ import annotations

import csv
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]  # the repository root
# The one wall-clock bound of the suite: a guard against a hung subprocess (a deadlock would otherwise stall the run
# until CI's own limit), never a speed requirement. Generous enough that a machine slowed 50x by other jobs does not
# trip it: the slowest subprocess of the suite takes about 60 s on a quiet 2-core machine.
HANG_GUARD_S = 3000
if "PYTEST_XDIST_WORKER" in os.environ:  # `pytest -n 2`: two workers of 2 threads each would oversubscribe 2 cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Plain MAE pretraining runs of a few seconds (a 32 px ViT-tiny, fp32): one epoch, for tests of inputs and flags;
# two, for the kill / resume tests of the data formats, which compare weights.
TINY_ONE_EPOCH = (
    "--model mae_vit_tiny --input_size 32 --patch_size 8 --batch_size 4 --epochs 1 --num_workers 0 --amp none"
).split()
TINY_PRETRAIN = (
    "--model mae_vit_tiny --input_size 32 --patch_size 8 --batch_size 4 --epochs 2 --warmup_epochs 1 --blr 1e-3 "
    "--log_every 1 --amp none"
).split()
SHARED_SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "fmow_samples"


def make_image(label: int, seed: int, size: int = 40) -> Image.Image:
    """Class 0: bright noisy image, class 1: dark noisy image (separable by mean brightness)."""
    rng = np.random.default_rng(seed)
    base = 190 if label == 0 else 60
    pixels = np.clip(rng.normal(base, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def write_csv_dataset(root: Path, count: int = 8, name: str = "train.csv", size: int = 40) -> Path:
    """fMoW-style CSV (label, image_path) with relative paths, alternating labels 0/1."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        label = i % 2
        path = f"images/{name[:-4]}_{i}.jpg"
        make_image(label, seed=hash(name) % 1000 + i, size=size).save(root / path, quality=95)
        rows.append((label, path))
    csv_path = root / name
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["category", "image_path"])
        writer.writerows(rows)
    return csv_path


# benchmarks/gpu_check.sh --dry-run sets it: the tests marked ``cuda`` then run on the CPU (``cuda_device``), which
# proves the tests themselves before a GPU meets them
CUDA_TESTS_ON_CPU = os.environ.get("CUDA_TESTS_ON_CPU") == "1"


# What the suite needs free in the temporary folder's disk. Each test's folder goes when it passes (pyproject.toml's
# tmp_path_retention_policy), so the suite holds at most the pair of tests running together, not the 8 GB a whole run
# writes: /tmp peaked at 0.74 GB during `pytest -n 2` (2026-12-05, sampled every 3 s); twice that, rounded up.
DISK_NEEDED_GB = 2.0


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Refuse to start, in one line, where the temporary folder's disk cannot hold the suite: full disks otherwise
    show up as hundreds of setup errors (``could not create numbered dir``) far from their cause. Checked before
    ``pytest_configure`` makes the run's folder (which a full disk refuses) and moves TMPDIR into it, and before
    pytest starts its session (``pytest.exit`` there prints the line twice, prefixed)."""
    if "PYTEST_XDIST_WORKER" in os.environ or config.option.help or config.option.version:  # the controller checks
        return None
    where = Path(config.option.basetemp or tempfile.gettempdir())
    while not where.exists():
        where = where.parent
    free_gb = shutil.disk_usage(where).free / 1e9
    if free_gb < DISK_NEEDED_GB:
        sys.stderr.write(
            f"error: {where.absolute()} has {free_gb:.1f} GB free; the suite needs about {DISK_NEEDED_GB:.0f} GB "
            "there (free some space, or point --basetemp at a disk that has it)\n"
        )
        return 1
    return None


def pytest_configure(config):
    """Temporary files of the suite's processes (torchrun's ``torchelastic_*`` folders, multiprocessing's ``pymp-*``,
    ``tempfile``) go to one folder of this run, removed at its end, instead of piling up in /tmp. Set here, before
    test modules build their subprocess environments; xdist workers inherit it and make their own folder in it."""
    # pytest's own base folder (tmp_path, kept for failing tests) stays where it was: its root follows TMPDIR otherwise
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    config.suite_tmpdir = tempfile.mkdtemp(prefix="suite-tmp-")
    os.environ["TMPDIR"] = config.suite_tmpdir
    tempfile.tempdir = None  # gettempdir() caches its answer; None makes it read TMPDIR again


def pytest_unconfigure(config):
    shutil.rmtree(config.suite_tmpdir, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip where there is no GPU (unless ``CUDA_TESTS_ON_CPU``)."""
    import torch

    if not torch.cuda.is_available() and not CUDA_TESTS_ON_CPU:
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture
def cuda_device():
    """The device of a test marked ``cuda``: GPU 0, or the CPU in ``gpu_check.sh``'s dry run (``CUDA_TESTS_ON_CPU``
    without CUDA). A test that needs CUDA's own API (its generators, pinned memory) calls ``needs_cuda_api``."""
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def needs_cuda_api(device) -> None:
    """Skip a ``cuda`` test on the CPU of the dry run where it exercises what only CUDA has."""
    if device.type != "cuda":
        pytest.skip("needs CUDA itself (the dry run runs the cuda tests on the CPU)")


@pytest.fixture
def csv_dataset(tmp_path: Path) -> Path:
    return write_csv_dataset(tmp_path / "data")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    for label, name in enumerate(["bright", "dark"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            make_image(label, seed=i).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def fmow_samples() -> Path:
    if not SHARED_SAMPLES.is_dir():
        pytest.skip("../shared/data/fmow_samples is not present")
    return SHARED_SAMPLES


@pytest.fixture
def tiny_mae():
    """The tiny paper model at 32 px, patch 8, seeded: the pretraining model the downstream tests start from."""
    import torch

    from models_cross_scale_mae import create_model

    torch.manual_seed(0)
    return create_model("cross_scale_mae_vit_tiny", input_size=32, patch_size=8)


@pytest.fixture
def pretrained(tiny_mae, tmp_path) -> Path:
    """``tiny_mae`` saved as a pretraining checkpoint (epoch 0)."""
    from util.run import checkpoint

    path = tmp_path / "pretrain.pth"
    checkpoint.save_checkpoint(
        {"model": tiny_mae.state_dict(), "model_config": tiny_mae.model_config, "epoch": 0}, path
    )
    return path


def run_expecting_error(argv: list[str]) -> str:
    """Run main_pretrain.py's entry point with ``argv`` and return its error, asserted to be one ``error:`` line."""
    import main_pretrain
    from util import config
    from util.run.process import run_entry_point

    with pytest.raises(SystemExit) as info:
        run_entry_point(main_pretrain.main, config.parse_args(main_pretrain.get_args_parser(), argv))
    message = str(info.value)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message
    return message


def make_tree(root, classes, per_class=3):
    """An ImageFolder tree ``root/<class>/<i>.png`` of 32 px images, ``per_class`` per class."""
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            make_image(label % 2, seed=10 * label + i, size=32).save(root / name / f"{i}.png")
    return root


def band_flags(**values):
    """The band flags every image-reading entry point has (``config.add_band_args``, at their defaults), with
    ``values`` changed: what ``config.resolve_bands`` takes."""
    from util import config

    parser = config.new_parser("band flags")
    config.add_band_args(parser.add_argument_group("bands"))
    return config.flags(**{**vars(parser.parse_args([])), **values})


def bands_of(**values):
    """``config.resolve_bands`` of ``band_flags(**values)``."""
    from util import config

    return config.resolve_bands(band_flags(**values))
