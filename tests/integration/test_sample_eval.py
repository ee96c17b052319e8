"""tools/sample_eval.py: the quick start's evaluation (spatial folds over location blocks, a bootstrap over blocks and
seeds, a random baseline of the encoder's own architecture, float64 features, complete runs only)."""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import HANG_GUARD_S, REPO

sys.path.insert(0, str(REPO / "tools"))
import sample_eval

from util import config
from util.config import DEFAULT_TRAIN_CSV
from util.data.datasets import build_dataset
from util.errors import UsageError

BLOCKS, FOLDS = 25, 5  # 15 x 15 tiles in blocks of 3 x 3; tools/make_sample_data.py's split


def test_every_tile_is_in_one_fold_and_fold_0_is_the_shipped_validation_split():
    splits = {
        name: [p for p, _ in build_dataset(DEFAULT_TRAIN_CSV.parent / f"{name}.csv").samples]
        for name in ("train", "val")
    }
    blocks = sample_eval.tile_blocks(splits["train"] + splits["val"])
    assert len(np.unique(blocks)) == BLOCKS
    folds = np.array([sample_eval.fold_of(b) for b in blocks])
    assert sorted(np.unique(folds)) == list(range(FOLDS))
    assert (folds[len(splits["train"]) :] == 0).all() and (folds[: len(splits["train"])] != 0).all()


def test_the_bootstrap_resamples_blocks_not_tiles():
    blocks = np.repeat(np.arange(BLOCKS), 9)
    constant = {"constant": np.ones((1, len(blocks)), dtype=bool)}
    assert sample_eval.hierarchical_bootstrap(constant, blocks, 200, [])["constant"] == (100.0, 100.0, 100.0)
    one_block_wrong = {"one": (blocks != 0)[None]}  # 9 correlated tiles: the interval is as wide as one block's weight
    mean, low, high = sample_eval.hierarchical_bootstrap(one_block_wrong, blocks, 2000, [])["one"]
    assert mean == 96.0 and low <= 88.0 and high == 100.0


def test_seed_variance_widens_the_interval_and_gains_are_paired_over_blocks():
    blocks = np.repeat(np.arange(BLOCKS), 9)
    rng = np.random.default_rng(0)
    base = rng.random(len(blocks)) < 0.7
    one_seed = {"a": base[None], "b": base[None]}
    two_seeds = {"a": np.stack([base, rng.random(len(blocks)) < 0.9]), "b": base[None]}
    narrow = sample_eval.hierarchical_bootstrap(one_seed, blocks, 1000, [("a", "b")])
    wide = sample_eval.hierarchical_bootstrap(two_seeds, blocks, 1000, [("a", "b")])
    assert narrow["a - b"] == (0.0, 0.0, 0.0)  # the same tiles right and wrong: paired, so no spread at all
    assert wide["a"][0] == pytest.approx(100 * (base.mean() + two_seeds["a"][1].mean()) / 2)
    assert wide["a"][2] - wide["a"][1] > narrow["a"][2] - narrow["a"][1]  # the second seed adds its variance


def test_a_small_sample_with_empty_folds_is_scored_and_one_it_cannot_score_is_refused():
    """A --sample of 6 tiles in 3 of the 5 folds ended in "torch.cat(): expected a non-empty list of Tensors" (the kNN
    of an empty fold); tiles all in one fold, of one class, or labelled -1 in raw errors (bincount, sklearn)."""
    import torch

    from util.errors import DataError

    labels, folds = np.array([0, 1, 0, 1, 0, 1]), np.array([0, 0, 1, 1, 3, 3])
    features = torch.randn(6, 8, dtype=torch.float64)
    sample_eval.check_folds(labels, folds, "s")
    assert sample_eval.predictions(features, features, labels, folds, 2).shape == (6,)
    assert set(sample_eval.probe_predictions(features, labels, folds)) <= {0, 1}
    for bad_labels, bad_folds, expected in (
        (labels, np.zeros(6, int), r"fold 0 \(6 tile\(s\)\) would be scored by 0 tile\(s\) of 0 class\(es\)"),
        (np.zeros(6, int), folds, r"fold 0 \(2 tile\(s\)\) would be scored by 4 tile\(s\) of 1 class\(es\)"),
        (np.array([0, 1, 0, 1, 0, -1]), folds, r"1 tile\(s\) labelled -1 \(unlabelled\)"),
    ):
        with pytest.raises(DataError, match=f"^--sample s: {expected}"):
            sample_eval.check_folds(bad_labels, bad_folds, "s")


def tiny_checkpoint(
    path: Path,
    name: str = "cross_scale_mae_vit_tiny",
    seed: int = 0,
    epoch: int = 0,
    epochs: int = 1,
    next_step: int | None = None,
    args: dict | None = None,
) -> Path:
    """A pretraining checkpoint of ``name`` (32 px, patch 8) whose run planned ``epochs`` and saw ``epoch + 1``;
    ``args``: more of its recorded flags, or {} for none (upstream's checkpoints)."""
    import torch

    from models_cross_scale_mae import create_model
    from util.run import checkpoint

    torch.manual_seed(seed)
    mae = create_model(name, input_size=32, patch_size=8)
    state = {"model": mae.state_dict(), "model_config": mae.model_config, "epoch": epoch}
    if args != {}:
        state["args"] = {"epochs": epochs, "seed": seed, "batch_size": 4, **(args or {})}
    if next_step is not None:
        state["next_step"] = next_step
    checkpoint.save_checkpoint(state, path)
    return path


QUICK = ["--init_seeds", "2", "--bootstrap", "50", "--scales", "0.5", "1"]
ONE_SCALE = [
    "--init_seeds",
    "1",
    "--scales",
    "1",
]  # the last occurrence wins: less work where the protocol is not the point


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory) -> Path:
    """81 three-band tiles of 32 px in 9 blocks (every fold used): the protocol of the embedded sample, in seconds."""
    return write_raster_sample(tmp_path_factory.mktemp("sample"), bands=3, side=9, size=32)


def run_sample_eval(argv: list[str], out: Path, sample: Path) -> dict:
    argv = [*QUICK, "--sample", str(sample), "--output_dir", str(out), *argv]  # the test's own flags win
    sample_eval.main(config.parse_args(sample_eval.get_args_parser(), argv))
    return json.loads((out / "sample_eval.json").read_text())


def test_models_with_seeds_the_random_baseline_and_paired_gains(tmp_path, small_sample):
    paths = [tiny_checkpoint(tmp_path / f"x{seed}.pth", seed=seed) for seed in (0, 1)]
    plain = tiny_checkpoint(tmp_path / "plain.pth", "mae_vit_tiny", seed=5)
    results = run_sample_eval([*map(str, paths), str(plain)], tmp_path / "out", small_sample)
    random_label = next(label for label in results["models"] if label.startswith("random init"))
    assert list(results["models"]) == ["cross_scale_mae_vit_tiny", "mae_vit_tiny", random_label]
    assert results["models"]["cross_scale_mae_vit_tiny"]["seeds"] == 2 and results["models"][random_label]["seeds"] == 2
    assert len(results["per_seed_accuracy"]["cross_scale_mae_vit_tiny | kNN"]) == 2
    for pair in (
        "cross_scale_mae_vit_tiny | kNN - mae_vit_tiny | kNN",
        f"mae_vit_tiny | linear probe - {random_label} | linear probe",
        f"cross_scale_mae_vit_tiny | multi-scale kNN mean - {random_label} | multi-scale kNN mean",
    ):
        gain, low, high = results["accuracy"][pair]
        assert low <= gain <= high
    table = (tmp_path / "out" / "sample_eval.md").read_text()
    assert (
        "| cross_scale_mae_vit_tiny | 2 (1/1 epochs) |" in table
        and "| cross_scale_mae_vit_tiny − mae_vit_tiny |" in table
    )
    assert (tmp_path / "out" / "sample_eval_scales.png").stat().st_size > 0
    assert set(results["reconstruction"]) == {"cross_scale_mae_vit_tiny", "mae_vit_tiny"}


def test_the_random_baseline_does_not_depend_on_which_checkpoint_is_listed_first(tmp_path, small_sample):
    """Issue 22: after torch.manual_seed(0), the paper model and plain MAE draw different encoders; the baseline is
    the encoder architecture's own, so the listing order cannot move it."""
    paper = tiny_checkpoint(tmp_path / "paper.pth")
    plain = tiny_checkpoint(tmp_path / "plain.pth", "mae_vit_tiny")
    first = run_sample_eval([str(paper), str(plain)], tmp_path / "a", small_sample)
    second = run_sample_eval([str(plain), str(paper)], tmp_path / "b", small_sample)
    random_rows = lambda r: {k: v for k, v in r["per_seed_accuracy"].items() if k.startswith("random init")}
    assert random_rows(first) == random_rows(second) and random_rows(first)


def test_a_run_that_did_not_finish_its_schedule_is_refused_or_marked(tmp_path, small_sample):
    from util.run.process import run_entry_point

    stopped = tiny_checkpoint(tmp_path / "stopped.pth", epoch=1, epochs=60, next_step=3)
    with pytest.raises(
        SystemExit,
        match=r"^error: .*stopped\.pth: saw 2/60 epochs \+ 3 steps of its schedule: not a "
        r"finished run; continue it \(--resume auto\)",
    ):
        run_entry_point(
            sample_eval.main,
            config.parse_args(sample_eval.get_args_parser(), [str(stopped), "--sample", str(small_sample)]),
        )
    assert not (tmp_path / "sample_eval.md").exists()
    run_sample_eval([str(stopped), "--allow_partial"], tmp_path / "out", small_sample)
    assert (
        "| cross_scale_mae_vit_tiny **PARTIAL** | 1 (2/60 epochs + 3 steps) |"
        in (tmp_path / "out" / "sample_eval.md").read_text()
    )


def test_the_table_is_the_same_under_bf16_autocast_and_with_other_cpu_kernels(tmp_path, small_sample):
    """Features are float64 with autocast off: an AVX-512-BF16 machine (bf16 autocast in the training loop) and an
    AVX2-only one give the same table. Other kernels are simulated with ATEN_CPU_CAPABILITY=default (no SIMD)."""
    import subprocess

    import torch

    path = tiny_checkpoint(tmp_path / "c.pth")
    plain = run_sample_eval([str(path), *ONE_SCALE], tmp_path / "plain", small_sample)["accuracy"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert run_sample_eval([str(path), *ONE_SCALE], tmp_path / "bf16", small_sample)["accuracy"] == plain
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "tools/sample_eval.py",
            str(path),
            *QUICK,
            *ONE_SCALE,
            "--sample",
            str(small_sample),
            "--output_dir",
            str(tmp_path / "k"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    other = json.loads((tmp_path / "k" / "sample_eval.json").read_text())["accuracy"]
    assert other == plain


def write_raster_sample(folder: Path, bands: int = 4, side: int = 9, size: int = 32) -> Path:
    """A labelled sample of ``side`` x ``side`` uint16 tiles rRR_cCC.tif (3 x 3-tile blocks, all five folds) with
    train.csv / val.csv split as tools/make_sample_data.py splits and a band_stats.json."""
    import tifffile

    from tools.band_stats import band_stats

    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = {"train": [], "val": []}
    for row in range(side):
        for col in range(side):
            label = (row + col) % 3
            tile = rng.integers(1000, 1500, (bands, size, size)) + 500 * label * np.arange(1, bands + 1)[:, None, None]
            name = f"images/r{row:02d}_c{col:02d}.tif"
            tifffile.imwrite(folder / name, tile.astype(np.uint16), photometric="minisblack", planarconfig="separate")
            rows["val" if sample_eval.fold_of((row // 3) * 100 + col // 3) == 0 else "train"].append(f"{label},{name}")
    for split, lines in rows.items():
        (folder / f"{split}.csv").write_text("label,image_path\n" + "\n".join(lines) + "\n")
    paths = [folder / line.split(",")[1] for line in rows["train"]]
    (folder / "band_stats.json").write_text(json.dumps(band_stats(paths)))
    return folder


def raster_checkpoint(path: Path, in_chans: int) -> Path:
    import torch

    from models_cross_scale_mae import create_model
    from util.run import checkpoint

    torch.manual_seed(0)
    mae = create_model("cross_scale_mae_vit_tiny", input_size=32, patch_size=8, in_chans=in_chans)
    checkpoint.save_checkpoint({"model": mae.state_dict(), "model_config": mae.model_config, "epoch": 0}, path)
    return path


def test_multispectral_checkpoints_on_a_raster_sample(tmp_path):
    sample = write_raster_sample(tmp_path / "ms")
    four = raster_checkpoint(tmp_path / "four.pth", 4)
    sample_eval.main(
        sample_eval.get_args_parser().parse_args(
            [str(four), "--sample", str(sample), *QUICK, "--output_dir", str(tmp_path / "a")]
        )
    )
    results = json.loads((tmp_path / "a" / "sample_eval.json").read_text())
    assert results["sample"] == str(sample) and set(results["reconstruction"]) == {"cross_scale_mae_vit_tiny"}
    table = (tmp_path / "a" / "sample_eval.md").read_text()
    assert "81 tiles in 9 location blocks" in table
    assert table.startswith(f"# Pretraining checkpoints vs random init on {sample}\n")  # outside the repository
    three = raster_checkpoint(tmp_path / "three.pth", 3)  # an RGB-only model on three of the bands
    sample_eval.main(
        sample_eval.get_args_parser().parse_args(
            [str(three), "--sample", str(sample), "--bands", "2", "1", "0", *QUICK, "--output_dir", str(tmp_path / "b")]
        )
    )
    assert json.loads((tmp_path / "b" / "sample_eval.json").read_text())["bands"] == [2, 1, 0]


def test_raster_tiles_are_normalised_by_the_sample_band_statistics(tmp_path):
    import tifffile

    stats = {"bands": [0, 1, 2, 3], "mean": [100.0, 200.0, 300.0, 400.0], "std": [10.0, 20.0, 30.0, 40.0]}
    (tmp_path / "band_stats.json").write_text(json.dumps(stats))
    tile = np.array([130, 180, 300, 480], np.uint16)[:, None, None] * np.ones((4, 40, 40), np.uint16)
    tifffile.imwrite(tmp_path / "r00_c00.tif", tile, photometric="minisblack", planarconfig="separate")
    (tmp_path / "train.csv").write_text("label,image_path\n0,r00_c00.tif\n")
    args = sample_eval.get_args_parser().parse_args(["x.pth", "--sample", str(tmp_path), "--bands", "3", "1", "0"])
    image = build_dataset(tmp_path / "train.csv", "auto", **sample_eval.sample_reading(args, 32, 3))[0][0]
    assert image.shape == (3, 32, 32)
    np.testing.assert_allclose(
        image.mean((1, 2)).numpy(), [2.0, -1.0, 3.0], rtol=1e-6
    )  # (value - mean) / std, bands 3 1 0


def test_band_mismatches_are_one_line_errors(tmp_path):
    from util.run.process import run_entry_point

    sample = write_raster_sample(tmp_path / "ms", side=6)
    four = raster_checkpoint(tmp_path / "four.pth", 4)
    for argv, expected in (
        ([str(four), "--sample", str(sample), "--bands", "2", "1", "0"], "--bands names 3 band(s) but --in_chans is 4"),
        ([str(four)], "has no band_stats.json: 8-bit RGB only, but the checkpoints take 4 band(s)"),
    ):
        with pytest.raises(SystemExit) as info:
            run_entry_point(
                sample_eval.main, sample_eval.get_args_parser().parse_args(argv + ["--output_dir", str(tmp_path)])
            )
        assert str(info.value).startswith("error: ") and expected in str(info.value) and "\n" not in str(info.value)


def test_the_sample_band_statistics_no_data_value_is_applied(tmp_path):
    import tifffile

    stats = {"bands": [0, 1], "mean": [100.0, 200.0], "std": [10.0, 20.0], "dtype": "uint16", "nodata": 0}
    (tmp_path / "band_stats.json").write_text(json.dumps(stats))
    tile = np.array([130, 180], np.uint16)[:, None, None] * np.ones((2, 40, 40), np.uint16)
    tile[:, :20] = 0  # no-data: filled with the band mean, 0 after normalisation
    tifffile.imwrite(tmp_path / "r00_c00.tif", tile, photometric="minisblack", planarconfig="separate")
    (tmp_path / "train.csv").write_text("label,image_path\n0,r00_c00.tif\n")
    args = sample_eval.get_args_parser().parse_args(["x.pth", "--sample", str(tmp_path)])
    image = build_dataset(tmp_path / "train.csv", "auto", **sample_eval.sample_reading(args, 40, 2))[0][0]
    np.testing.assert_allclose(image[:, :15].abs().max().item(), 0.0, atol=1e-6)
    np.testing.assert_allclose(image[:, 25:].mean((1, 2)).numpy(), [3.0, -1.0], rtol=1e-6)


def test_checkpoints_of_one_model_are_its_seeds_only_with_other_seeds_and_the_same_recipe(tmp_path):
    """benchmarks/ms_evidence.sh gave the all-band run and the RGB-adapted run (one model name, both seed 0, 60 vs 30
    epochs and --init) unlabelled: they were averaged as two seeds of one model, exit 0."""
    first = tiny_checkpoint(tmp_path / "a" / "checkpoint.pth", epoch=1, epochs=2)
    again = tiny_checkpoint(tmp_path / "b" / "checkpoint.pth", epoch=1, epochs=2)
    longer = tiny_checkpoint(tmp_path / "c" / "checkpoint.pth", seed=1, epoch=3, epochs=4)
    load = lambda *specs: sample_eval.load_models(sample_eval.get_args_parser().parse_args(list(map(str, specs))))
    with pytest.raises(UsageError) as same_seed:
        load(first, again)
    assert str(same_seed.value) == (
        f"{first} and {again} are both cross_scale_mae_vit_tiny with --seed 0: not two seeds of one model; label each "
        f"(LABEL=PATH, e.g. b={again}) to compare them as models"
    )
    with pytest.raises(UsageError, match=r"pretrained differently \(epochs 2 / 4\): not seeds of one model"):
        load(first, longer)
    assert [m.label for m in load(f"a={first}", f"b={again}", f"c={longer}")] == ["a", "b", "c"]
    seeds = tiny_checkpoint(tmp_path / "d" / "checkpoint.pth", seed=1, epoch=1, epochs=2)
    assert [len(m.encoders) for m in load(first, seeds)] == [2]  # the same recipe, another seed: two seeds


def test_seeds_differ_in_the_learning_rate_used_and_the_input_statistics_only_as_recipes_do(tmp_path):
    """--lr (not --blr) and --band_stats's mean / std make another recipe; a flag an older run did not record, or
    --bands left out against its default, does not."""
    load = lambda *specs: sample_eval.load_models(sample_eval.get_args_parser().parse_args(list(map(str, specs))))
    first = tiny_checkpoint(tmp_path / "a" / "c.pth", args={"lr": 1e-3, "mean": [0.4] * 3, "bands": None})
    with pytest.raises(UsageError, match=r"pretrained differently \(lr 0.001 / 0.0001\)"):
        load(first, tiny_checkpoint(tmp_path / "b" / "c.pth", seed=1, args={"lr": 1e-4, "mean": [0.4] * 3}))
    with pytest.raises(UsageError, match=r"pretrained differently \(mean \[0.4, 0.4, 0.4\] / \[0.5, 0.5, 0.5\]\)"):
        load(first, tiny_checkpoint(tmp_path / "c" / "c.pth", seed=1, args={"lr": 1e-3, "mean": [0.5] * 3}))
    newer = {"lr": 1e-3, "mean": [0.4] * 3, "in_chans": 3, "bands": [0, 1, 2], "norm_style": "pre"}
    assert [len(m.encoders) for m in load(first, tiny_checkpoint(tmp_path / "d" / "c.pth", seed=1, args=newer))] == [2]


def test_one_checkpoint_given_twice_is_refused_also_without_recorded_flags(tmp_path):
    """Upstream's checkpoints record no flags: the same file (or a copy) twice was averaged as two seeds, exit 0."""
    load = lambda *specs: sample_eval.load_models(sample_eval.get_args_parser().parse_args(list(map(str, specs))))
    upstream = tiny_checkpoint(tmp_path / "a" / "c.pth", args={})
    copy = tmp_path / "b" / "c.pth"
    copy.parent.mkdir()
    shutil.copy(upstream, copy)
    for twice in (upstream, copy):
        with pytest.raises(UsageError) as stop:
            load(upstream, twice)
        assert str(stop.value) == (
            f"{upstream} and {twice} hold the same weights: not two seeds of cross_scale_mae_vit_tiny (one checkpoint "
            "given twice, or a copy of it)"
        )
    other = tiny_checkpoint(tmp_path / "c" / "c.pth", seed=1, args={})
    assert [len(m.encoders) for m in load(upstream, other)] == [2]


def test_the_suggested_label_reads_back_as_the_checkpoint_also_where_its_folder_has_an_equals_sign(tmp_path):
    first = tiny_checkpoint(tmp_path / "lr=1e-3" / "c.pth")
    second = tiny_checkpoint(tmp_path / "lr=1e-4" / "c.pth")
    with pytest.raises(UsageError) as stop:
        sample_eval.load_models(sample_eval.get_args_parser().parse_args([str(first), str(second)]))
    suggested = str(stop.value).split("e.g. ")[1].split(") to compare")[0]
    assert sample_eval.split_spec(suggested) == ("lr-1e-4", str(second))


def test_one_label_given_to_two_models_is_refused(tmp_path):
    """A cross-scale MAE labelled as the plain MAE's model name was averaged with its checkpoints as seeds, exit 0:
    the recipe flags of the two can agree."""
    cross_scale = tiny_checkpoint(tmp_path / "a" / "c.pth")
    plain = tiny_checkpoint(tmp_path / "b" / "c.pth", name="mae_vit_tiny", seed=1)
    with pytest.raises(UsageError) as stop:
        sample_eval.load_models(sample_eval.get_args_parser().parse_args([f"mae_vit_tiny={cross_scale}", str(plain)]))
    assert str(stop.value) == (
        f"{cross_scale} (cross_scale_mae_vit_tiny) and {plain} (mae_vit_tiny) are both labelled mae_vit_tiny: not "
        "seeds of one model; give each model its own label"
    )
