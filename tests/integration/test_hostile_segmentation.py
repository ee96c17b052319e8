"""Hostile segmentation inputs (issue 24): labels that would silently leave the loss or the metrics, batches and sets
without a labelled pixel, batch 1, flags and checkpoints that cannot work. Each gives the right result or one
``error:`` line naming the file / flag / value (exit status 1)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import engine_segment
import main_segment
from util import config
from util.data import segmentation
from util.run import checkpoint
from util.run.process import run_entry_point

WATER, VEGETATION = (0, 0, 255), (0, 255, 0)
FAST = [
    "--input_size",
    "32",
    "--batch_size",
    "2",
    "--num_workers",
    "0",
    "--epochs",
    "1",
    "--warmup_epochs",
    "0",
    "--decoder_channels",
    "16",
    "--drop_path",
    "0",
    "--amp",
    "none",
    "--bootstrap",
    "0",
    "--examples",
    "0",
    "--log_every",
    "1",
]


def write_pairs(root, count, colours=(WATER, VEGETATION), labelled=None, seed=0):
    """``count`` RGB image / RGB mask pairs of 32 px (left: colours[0], right: colours[1]); ``labelled(i, mask)``
    may blank masks (ignore = black, a colour outside the palette only where the test says so)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        column = int(rng.integers(8, 25))
        mask = np.zeros((32, 32, 3), np.uint8)
        mask[:, :column], mask[:, column:] = colours[0], colours[1]
        if labelled is not None:
            mask = labelled(i, mask)
        image = np.where(mask[..., 2:3] > 0, [40, 60, 200], [60, 200, 60]) + rng.normal(0, 10, (32, 32, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"r00_c{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"r00_c{i:02d}.png")
    return root


def palette_file(tmp_path, vegetation=VEGETATION):
    path = tmp_path / "palette.json"
    path.write_text(json.dumps([{"name": "water", "color": list(WATER)}, {"name": "vegetation", "color": vegetation}]))
    return path


def argv(train, val, palette, out, pretrained, *more):
    return [
        *FAST,
        "--train_path",
        str(train),
        "--test_path",
        str(val),
        "--palette",
        str(palette),
        "--finetune",
        str(pretrained),
        "--output_dir",
        str(out),
        *more,
    ]


def expect_error(args) -> str:
    with pytest.raises(SystemExit) as info:
        run_entry_point(main_segment.main, config.parse_args(main_segment.get_args_parser(), args))
    message = str(info.value)
    assert isinstance(info.value.code, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def run(args) -> None:
    main_segment.main(config.parse_args(main_segment.get_args_parser(), args))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_mae_module):
    """A one-epoch segmenter of the two-class palette, its data, and the pretrained checkpoint it started from."""
    root = tmp_path_factory.mktemp("seg")
    pretrained = root / "pretrain.pth"
    checkpoint.save_checkpoint(
        {"model": tiny_mae_module.state_dict(), "model_config": tiny_mae_module.model_config, "epoch": 0}, pretrained
    )
    train, val = write_pairs(root / "train", 4), write_pairs(root / "val", 2, seed=1)
    palette = palette_file(root)
    out = root / "run"
    run(argv(train, val, palette, out, pretrained))
    return {"train": train, "val": val, "palette": palette, "pretrained": pretrained, "run": out, "root": root}


@pytest.fixture(scope="module")
def tiny_mae_module():
    from models_cross_scale_mae import create_model

    torch.manual_seed(0)
    return create_model("cross_scale_mae_vit_tiny", input_size=32, patch_size=8)


def test_off_palette_colours_are_refused_naming_files_colours_and_counts(trained, tmp_path, capsys):
    """A one-unit typo in the palette's vegetation colour: before, every vegetation pixel became ignore and the run
    exited 0 with ``IoU_vegetation n/a``. Now the masks are refused, naming files, colour and count; with
    --off_palette_tolerance 1 they are accepted as ignore and the evaluation output reports the count."""
    typo = palette_file(tmp_path, vegetation=[0, 254, 0])
    message = expect_error(argv(trained["train"], trained["val"], typo, tmp_path / "o", trained["pretrained"]))
    assert "evaluation mask(s) hold colours not in the palette beyond --off_palette_tolerance 0.001" in message
    assert "r00_c00.png: " in message and "(0, 255, 0) x " in message and "--off_palette_tolerance 1" in message
    assert not (tmp_path / "o" / "checkpoint-last.pth").exists()
    out = tmp_path / "accepted"
    magenta = write_pairs(
        tmp_path / "magenta",
        2,
        labelled=lambda i, m: np.where(np.arange(32)[:, None, None] < 4, [255, 0, 255], m).astype(np.uint8),
    )
    run(argv(trained["train"], magenta, trained["palette"], out, trained["pretrained"], "--off_palette_tolerance", "1"))
    assert "256 pixel(s) of colours not in the palette counted as ignore (in 2 mask(s))" in capsys.readouterr().out
    assert json.loads((out / "seg_confusion.json").read_text())["off_palette_pixels"] == 256
    assert "colours not in the palette counted as ignore" in (out / "seg_results.md").read_text()


def test_resampled_rgb_masks_are_refused_not_silently_ignored(tmp_path):
    """torchgeo#1727's kind: an RGB label resampled (bilinear) or colour-managed gets colours between the palette's;
    decoding maps them to ignore. Counted per file while reading, refused above the tolerance."""
    root = write_pairs(tmp_path / "d", 2)
    for path in (root / "masks").iterdir():
        with Image.open(path) as mask:
            mask.resize((16, 16), Image.BILINEAR).resize((32, 32), Image.BILINEAR).save(path)
    pairs = segmentation.find_pairs(root)
    palette = segmentation.Palette(("water", "vegetation"), (WATER, VEGETATION))
    dataset = segmentation.SegDataset(pairs, None, 2, palette)
    with pytest.raises(segmentation.DataError, match=r"2 training mask\(s\) hold colours not in the palette"):
        dataset.check_masks("training")
    summary = segmentation.SegDataset(pairs, None, 2, palette, off_palette_tolerance=1.0).check_masks("training")
    assert summary.off_palette > 0 and summary.off_palette_masks == 2
    assert summary.labelled + summary.off_palette == 2 * 32 * 32


def test_a_mask_of_another_size_than_its_image_is_refused_before_training(trained, tmp_path):
    """Was found at the pair's first training or evaluation step (after a whole training epoch, for the evaluation
    set)."""
    val = write_pairs(tmp_path / "val", 2, seed=1)
    mask = val / "masks" / "r00_c01.png"
    with Image.open(mask) as img:
        img.resize((16, 16), Image.NEAREST).save(mask)
    message = expect_error(argv(trained["train"], val, trained["palette"], tmp_path / "o", trained["pretrained"]))
    assert message == f"error: {mask}: mask is 16x16 px, its image 32x32"
    assert not (tmp_path / "o" / "log.txt").exists()


def test_a_batch_without_a_labelled_pixel_gives_zero_loss_and_no_gradient():
    """mmsegmentation#1409 / pytorch#116349: the mean cross-entropy over 0 labelled pixels is 0 / 0 = NaN, and the NaN
    guard stopped valid runs. Such a batch now contributes 0 and a zero gradient; a labelled batch the usual mean."""
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    ignored = torch.full((2, 4, 4), 255)
    assert F.cross_entropy(logits, ignored, ignore_index=255).isnan()  # what PyTorch's mean gives
    for weight in (None, torch.tensor([1.0, 2.0, 0.5])):
        loss = engine_segment.segmentation_loss(logits, ignored, weight, 255)
        loss.backward()
        assert loss.item() == 0.0 and logits.grad is not None and not logits.grad.any()
        logits.grad = None
        masks = torch.randint(0, 3, (2, 4, 4))
        masks[0] = 255
        expected = F.cross_entropy(logits, masks, weight=weight, ignore_index=255)
        assert torch.allclose(engine_segment.segmentation_loss(logits, masks, weight, 255), expected)


def test_sparse_labels_and_batch_1_train(trained, tmp_path, capsys):
    """Only one tile of four labelled, --batch_size 1 (UperNet's pyramid pooling BatchNorm on a 1 x 1 map:
    mmsegmentation#272, segmentation_models_pytorch#342): three batches have no labelled pixel; the run trains and
    evaluates with finite losses."""
    sparse = write_pairs(tmp_path / "sparse", 4, labelled=lambda i, m: m if i == 0 else np.zeros_like(m))
    out = tmp_path / "o"
    run(
        argv(
            sparse,
            trained["val"],
            trained["palette"],
            out,
            trained["pretrained"],
            "--batch_size",
            "1",
            "--off_palette_tolerance",
            "1",  # black: unlabelled
        )
    )
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert np.isfinite(record["train_loss"]) and (out / "seg_results.csv").exists()
    assert "nan" not in capsys.readouterr().out.lower()


def test_class_weights_beyond_float32_train_as_their_ratios(trained, tmp_path):
    """--class_weights 1e39 3e39 (finite for the flags, inf in float32) made the loss inf / inf = NaN and the NaN
    guard advised a lower --blr; the weights are their ratios (the weighted mean is the same)."""
    out = tmp_path / "o"
    run(
        argv(
            trained["train"],
            trained["val"],
            trained["palette"],
            out,
            trained["pretrained"],
            "--class_weights",
            "1e39",
            "3e39",
        )
    )
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert np.isfinite(record["train_loss"]) and record["train_loss"] > 0


def test_class_weights_of_0_for_every_labelled_class_are_refused(trained, tmp_path):
    """Only water labelled, --class_weights 0 1: every step's loss was 0 with no gradient; nothing trained, exit 0."""
    water = write_pairs(tmp_path / "water", 2, colours=(WATER, WATER))
    args = argv(water, trained["val"], trained["palette"], tmp_path / "o", trained["pretrained"], "--class_weights")
    message = expect_error([*args, "0", "1"])
    assert message == f"error: --class_weights 0 1: every labelled pixel of {water} (water 2048) is of a class of " + (
        "weight 0: nothing to learn from"
    )
    assert not (tmp_path / "o" / "log.txt").exists()


def test_sets_without_a_labelled_pixel_are_refused_up_front(trained, tmp_path):
    blank = lambda i, m: np.zeros_like(m)  # black: not in the palette, ignore
    empty = write_pairs(tmp_path / "empty", 2, labelled=blank)
    for train, val, what in ((empty, trained["val"], "training"), (trained["train"], empty, "evaluation")):
        message = expect_error(
            argv(train, val, trained["palette"], tmp_path / what, trained["pretrained"], "--off_palette_tolerance", "1")
        )
        assert f"{empty}: no labelled pixel in its 2 {what} mask(s)" in message, message
        assert ("nothing to learn from" if what == "training" else "no pixel to score") in message
        assert not (tmp_path / what / "log.txt").exists()
    loveda, loveda_val = write_pairs(tmp_path / "loveda", 2), write_pairs(tmp_path / "loveda_val", 2)
    for folder, value in ((loveda, 0), (loveda_val, 1)):  # index masks; 0 = no data under --reduce_zero_label
        for path in (folder / "masks").iterdir():
            segmentation.write_mask(path, np.full((32, 32), value, np.uint8))
    message = expect_error(
        [
            *argv(loveda, loveda_val, "none", tmp_path / "l", trained["pretrained"]),
            "--class_names",
            "a",
            "b",
            "--reduce_zero_label",
        ]
    )
    assert "no labelled pixel" in message and "after --reduce_zero_label" in message
    message = expect_error(
        argv(
            trained["train"],
            trained["val"],
            trained["palette"],
            tmp_path / "c",
            trained["pretrained"],
            "--reduce_zero_label",
        )
    )
    assert "r00_c00.png: --reduce_zero_label is for class-index masks (0: no data); this one is colour-coded" in message
    assert "its class 0 (water) would be ignored" in message  # was: vegetation scored as water, exit 0


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--decoder_channels", "0"], "--decoder_channels must be at least 1, got 0"),
        (["--crop_scale", "0.9", "0.1"], "--crop_scale must satisfy 0 < min <= max <= 1 (area fractions of the image)"),
        (["--crop_scale", "0", "1"], "--crop_scale must satisfy 0 < min <= max <= 1"),
        (["--class_weights", "-1", "1"], "--class_weights must be at least 0, got -1.0 1.0"),
        (["--class_weights", "nan", "1"], "--class_weights must be at least 0, got nan 1.0"),
        (["--class_weights", "inf", "1"], "--class_weights must be finite and at least 0, got inf 1.0"),
        (["--class_weights", "0", "0"], "--class_weights: at least one weight must be > 0, got 0 0"),
        (["--off_palette_tolerance", "2"], "--off_palette_tolerance must be in [0, 1], got 2.0"),
        (["--start_epoch", "5"], "--start_epoch 5 is not below --epochs 1: nothing to train"),
        (["--ignore_index", "1"], "--ignore_index 1 is class 1 (vegetation) of the 2 classes: its pixels would count"),
        (["--exclude_classes", "0", "1"], "--exclude_classes [0, 1]: every one of the 2 classes: none to score"),
    ],
)
def test_segmentation_flags_that_cannot_work(trained, tmp_path, flags, expected):
    out = tmp_path / "o"
    message = expect_error(
        argv(trained["train"], trained["val"], trained["palette"], out, trained["pretrained"], *flags)
    )
    assert expected in message
    assert not out.exists()  # refused before the output folder is made


def test_eval_with_a_palette_of_other_classes_is_refused(trained, tmp_path):
    """Before: --palette isprs with a checkpoint of 2 classes was ignored without a word."""
    base = ["--test_path", str(trained["val"]), "--eval", "--resume", str(trained["run"] / "checkpoint-last.pth")]
    message = expect_error([*FAST, *base, "--palette", "isprs", "--output_dir", str(tmp_path / "e")])
    assert (
        "--palette isprs: 6 classes (impervious_surfaces" in message
        and "was trained on 2 (water, vegetation)" in message
    )
    message = expect_error([*FAST, *base, "--ignore_index", "0", "--output_dir", str(tmp_path / "e")])
    assert "--ignore_index 0 is class 0 (water) of the 2 classes" in message  # was: water left out, exit 0
    message = expect_error([*FAST, *base, "--exclude_classes", "5", "--output_dir", str(tmp_path / "e")])
    assert message == "error: --exclude_classes [5]: classes are 0..1"  # was a raw IndexError after the evaluation
    assert not (tmp_path / "e").exists()
    run([*FAST, *base, "--palette", str(trained["palette"]), "--output_dir", str(tmp_path / "e2")])  # its own: fine
    assert (tmp_path / "e2" / "eval" / "seg_results.csv").exists()


def edited_checkpoint(trained, tmp_path, edit):
    state = checkpoint.read_checkpoint(trained["run"] / "checkpoint-last.pth")
    edit(state)
    path = tmp_path / "edited.pth"
    checkpoint.save_checkpoint(state, path)
    return path


def test_eval_says_when_reduce_zero_label_differs_from_training(trained, tmp_path, capsys):
    """Not refused (an evaluation set may use the other mask convention), but never silent: a difference shifts
    every class by one."""
    path = edited_checkpoint(trained, tmp_path, lambda s: s["args"].update(reduce_zero_label=True))
    run(
        [
            *FAST,
            "--test_path",
            str(trained["val"]),
            "--eval",
            "--resume",
            str(path),
            "--output_dir",
            str(tmp_path / "e"),
        ]
    )
    out = capsys.readouterr().out
    assert f"note: {path} was trained with --reduce_zero_label and this evaluation reads masks without it" in out
    run(
        [
            *FAST,
            "--test_path",
            str(trained["val"]),
            "--eval",
            "--resume",
            str(trained["run"] / "checkpoint-last.pth"),
            "--output_dir",
            str(tmp_path / "e2"),
        ]
    )
    assert "--reduce_zero_label and this evaluation" not in capsys.readouterr().out


def test_checkpoints_that_cannot_be_resumed_name_the_reason(trained, tmp_path):
    """An epoch of 10**9 (was: "continuing at epoch 1000000001", nothing trained, exit 0), NaN weights (was: the
    "lower --blr" advice of the NaN guard), and weights whose keys do not fit (was: no key named)."""

    def resume(path):
        return expect_error(
            argv(trained["train"], trained["val"], trained["palette"], tmp_path / "o", trained["pretrained"])
            + ["--resume", str(path)]
        )

    far = edited_checkpoint(trained, tmp_path, lambda s: s.update(epoch=10**9))
    assert "its position (epoch 1000000001) lies beyond the end of this run (--epochs 1): a damaged" in resume(far)
    nan = edited_checkpoint(trained, tmp_path, lambda s: s["model"]["head.classifier.weight"].fill_(float("nan")))
    message = resume(nan)
    assert message.startswith(f"error: {nan}: non-finite values (NaN/inf) in head.classifier.weight")
    missing = edited_checkpoint(trained, tmp_path, lambda s: s["model"].pop("head.classifier.bias"))
    assert "cannot resume this run from it (another model or size?): not in the file: head.classifier.bias" in resume(
        missing
    )
