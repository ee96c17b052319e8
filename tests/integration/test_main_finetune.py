import json
import re

import pytest
import torch
from conftest import write_csv_dataset

import engine_finetune
import main_finetune
import main_linprobe
import models_vit
from util import config
from util.run import checkpoint, process
from util.run.process import run_entry_point

COMMON = ["--input_size", "32", "--batch_size", "8", "--num_workers", "0", "--log_every", "1", "--warmup_epochs", "1"]


@pytest.fixture
def split(tmp_path):
    """24 training and 8 evaluation images, bright (0) vs dark (1): easy for any encoder."""
    return write_csv_dataset(tmp_path / "data", 24, "train.csv"), write_csv_dataset(tmp_path / "data", 8, "val.csv")


def run(module, argv):
    module.main(config.parse_args(module.get_args_parser(), argv))


def data_flags(split):
    return ["--train_path", str(split[0]), "--test_path", str(split[1])]


def final_accuracy(out):
    return json.loads((out / "log.txt").read_text().splitlines()[-1])["test_acc1"]


def test_short_fine_tune_beats_chance_and_writes_its_outputs(split, pretrained, tmp_path, capsys):
    out = tmp_path / "ft"
    run(
        main_finetune,
        [
            *COMMON,
            *data_flags(split),
            "--finetune",
            str(pretrained),
            "--output_dir",
            str(out),
            "--epochs",
            "6",
            "--blr",
            "5e-3",
            "--mixup",
            "0",
            "--cutmix",
            "0",
            "--aa",
            "none",
            "--reprob",
            "0",
        ],
    )
    printed = capsys.readouterr().out
    assert (
        "loaded 52 tensors" in printed
        and "freshly initialised: fc_norm.weight, fc_norm.bias, head.weight, head.bias" in printed
    )
    assert re.search(  # 3 steps timed: too few for an ETA
        r"^epoch 0 done in \d:\d\d:\d\d\.\d .*; run eta estimating \(5 of 6 epochs left\)$", printed, re.M
    )
    assert re.search(r"^epoch 1 done in .*; run eta \d:\d\d:\d\d\.\d \(4 of 6 epochs left\)$", printed, re.M)
    assert re.search(r"^training time \d:\d\d:\d\d\.\d \(6 epoch\(s\) in this run\)$", printed, re.M)
    assert re.search(r"^evaluation: 0/1 batches$", printed, re.M) and re.search(
        r"^evaluation: 1/1 done in ", printed, re.M
    )
    assert final_accuracy(out) > 75.0
    assert {
        "checkpoint-best.pth",
        "checkpoint-last.pth",
        "confusion_matrix_best.png",
        "confusion_matrix_last.png",
        "config.yaml",
        "log.txt",
    } <= {p.name for p in out.iterdir()}
    log = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert {"test_acc1", "test_macro_f1", "test_loss", "train_loss"} <= set(log) and "test_acc5" not in log


def test_fine_tune_with_mixup_randaugment_and_erasing_runs(split, pretrained, tmp_path):
    out = tmp_path / "ft"
    run(
        main_finetune,
        [
            *COMMON,
            *data_flags(split),
            "--finetune",
            str(pretrained),
            "--output_dir",
            str(out),
            "--epochs",
            "1",
            "--color_jitter",
            "0.4",
        ],
    )
    assert (out / "checkpoint-last.pth").exists()


def test_linear_probe_on_cached_features_beats_chance(split, pretrained, tmp_path, capsys):
    out = tmp_path / "lp"
    run(
        main_linprobe,
        [
            *COMMON,
            *data_flags(split),
            "--finetune",
            str(pretrained),
            "--output_dir",
            str(out),
            "--epochs",
            "20",
            "--blr",
            "20",
            "--no_aug",
        ],
    )
    printed = capsys.readouterr().out
    assert "computing the frozen encoder's features once" in printed
    assert (
        "frozen features: 0/3 batches" in printed and "frozen features: 3/3 done in" in printed
    )  # not a terminal: plain lines
    assert final_accuracy(out) > 75.0
    state = checkpoint.read_checkpoint(out / "checkpoint-last.pth")["model"]
    assert "head.0.running_mean" in state and "head.1.weight" in state  # BatchNorm + Linear head saved with the encoder
    trained = state["blocks.0.attn.qkv.weight"]
    original = checkpoint.read_checkpoint(pretrained)["model"]["encoder.blocks.0.attn.qkv.weight"]
    assert torch.equal(trained, original)  # the encoder stayed frozen


def test_eval_reports_the_checkpoints_accuracy(split, pretrained, tmp_path):
    out = tmp_path / "lp"
    flags = [*COMMON, *data_flags(split), "--finetune", str(pretrained), "--output_dir", str(out), "--blr", "20"]
    run(main_linprobe, [*flags, "--epochs", "3", "--no_aug"])
    best = checkpoint.read_checkpoint(out / "checkpoint-best.pth")["best_acc1"]
    run(main_linprobe, [*flags, "--eval", "--resume", str(out / "checkpoint-best.pth")])
    metrics = json.loads((out / "eval" / "eval_metrics.json").read_text())  # eval/: never over the training run's files
    assert metrics["acc1"] == pytest.approx(best)
    assert (out / "eval" / "confusion_matrix_eval.png").exists()
    (out / "eval" / "eval_metrics.json").unlink()
    without_weights = [
        *COMMON,
        *data_flags(split),
        "--model",
        "vit_tiny_patch16",
        "--patch_size",
        "8",
        "--output_dir",
        str(out),
    ]
    run(main_linprobe, [*without_weights, "--no_aug", "--eval", "--resume", str(out / "checkpoint-best.pth")])
    assert json.loads((out / "eval" / "eval_metrics.json").read_text())["acc1"] == pytest.approx(
        best
    )  # features of the resumed encoder


def test_resumed_fine_tune_equals_an_uninterrupted_one(split, pretrained, tmp_path):
    flags = [*COMMON, *data_flags(split), "--finetune", str(pretrained), "--epochs", "2", "--save_every", "1"]
    run(main_finetune, [*flags, "--output_dir", str(tmp_path / "straight")])
    run(
        main_finetune,
        [
            *flags,
            "--output_dir",
            str(tmp_path / "resumed"),
            "--resume",
            str(tmp_path / "straight" / "checkpoint-0.pth"),
        ],
    )
    expected = checkpoint.read_checkpoint(tmp_path / "straight" / "checkpoint-last.pth")["model"]
    got = checkpoint.read_checkpoint(tmp_path / "resumed" / "checkpoint-last.pth")["model"]
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_weights_that_do_not_fit_stop_the_run(split, tmp_path):
    saved = {"model": {"encoder.cls_token": torch.zeros(1, 1, 128)}}
    torch.save(saved, tmp_path / "bad.pth")
    argv = [*COMMON, *data_flags(split), "--finetune", str(tmp_path / "bad.pth"), "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=r"error: .*bad.pth: no transformer blocks found"):
        run_entry_point(main_finetune.main, config.parse_args(main_finetune.get_args_parser(), argv))
    argv = [*COMMON, *data_flags(split), "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="error: give --finetune PATH"):
        run_entry_point(main_finetune.main, config.parse_args(main_finetune.get_args_parser(), argv))


def fails(module, argv, message):
    """Runs ``module`` as its entry point does and checks the one-line error."""
    with pytest.raises(SystemExit) as exit_info:
        run_entry_point(module.main, config.parse_args(module.get_args_parser(), argv))
    text = str(exit_info.value)
    assert text.startswith("error: ") and "\n" not in text, text
    assert message in text, text
    return text


NO_MIXING = ["--mixup", "0", "--cutmix", "0", "--aa", "none", "--reprob", "0"]


@pytest.fixture
def fine_tuned(split, pretrained, tmp_path):
    """A fine-tuned classifier (head trained) and the best accuracy it recorded."""
    out = tmp_path / "ft"
    run(
        main_finetune,
        [
            *COMMON,
            *data_flags(split),
            "--finetune",
            str(pretrained),
            "--output_dir",
            str(out),
            "--epochs",
            "4",
            "--blr",
            "5e-3",
            *NO_MIXING,
        ],
    )
    best = checkpoint.read_checkpoint(out / "checkpoint-best.pth")
    return out, best


def test_eval_of_a_fine_tuned_checkpoint_uses_its_head(split, fine_tuned, tmp_path, capsys):
    out, best = fine_tuned
    assert best["class_names"] == ["0", "1"]  # class names travel with the checkpoint
    # no --input_size, no --model, a --batch_size larger than the training set: all from the checkpoint / not needed
    eval_flags = [
        "--test_path",
        str(split[1]),
        "--batch_size",
        "64",
        "--num_workers",
        "0",
        "--output_dir",
        str(tmp_path / "e"),
    ]
    for source in (
        ["--finetune", str(out / "checkpoint-best.pth")],
        ["--resume", str(out / "checkpoint-best.pth")],
        ["--resume", str(out / "checkpoint-best.pth"), "--model", "vit_tiny_patch16"],
    ):
        run(main_finetune, [*eval_flags, "--eval", *source])
        metrics = json.loads((tmp_path / "e" / "eval" / "eval_metrics.json").read_text())
        assert metrics["acc1"] == pytest.approx(best["best_acc1"]) and metrics["input_size"] == 32
        assert metrics["class_names"] == ["0", "1"]
    printed = capsys.readouterr().out
    assert "head included" in printed and "freshly initialised" not in printed.split("eval:")[-1]


def test_eval_refuses_a_freshly_initialised_head_and_random_weights(split, pretrained, tmp_path):
    eval_flags = ["--test_path", str(split[1]), "--num_workers", "0", "--output_dir", str(tmp_path / "e"), "--eval"]
    fails(main_finetune, [*eval_flags, "--finetune", str(pretrained)], "holds no classification head")
    fails(main_finetune, [*eval_flags, "--resume", "auto"], "--eval --resume auto: no checkpoint in")
    assert not (tmp_path / "e" / "eval" / "eval_metrics.json").exists()
    fails(main_finetune, eval_flags, "--eval needs the classifier to evaluate")


def test_eval_refuses_non_finite_weights_and_logits(split, tmp_path):
    torch.manual_seed(0)
    model = models_vit.create_classifier("vit_tiny_patch16", 2, img_size=32, patch_size=8)
    state = model.state_dict()
    state["blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    checkpoint.save_checkpoint({"model": state}, tmp_path / "nan.pth")
    fails(
        main_finetune,
        [
            "--test_path",
            str(split[1]),
            "--num_workers",
            "0",
            "--output_dir",
            str(tmp_path / "e"),
            "--eval",
            "--finetune",
            str(tmp_path / "nan.pth"),
        ],
        "non-finite values (NaN/inf) in blocks.0.mlp.fc1.weight",
    )

    class Broken(torch.nn.Module):
        def forward(self, images):
            return torch.full((len(images), 2), float("inf"))

    loader = [(torch.zeros(3, 3, 4, 4), torch.tensor([0, 1, 0]))]
    run_ = process.Run(0, 1, 0, torch.device("cpu"), None, tmp_path)
    with pytest.raises(engine_finetune.NonFiniteOutputError, match="NaN/inf for 3 of 3 images"):
        engine_finetune.evaluate(Broken(), loader, run_, 2)


def test_resume_with_changed_flags_is_refused_unless_allowed(split, pretrained, tmp_path, capsys):
    out = tmp_path / "ft"
    flags = [*COMMON, *data_flags(split), "--finetune", str(pretrained), "--output_dir", str(out), *NO_MIXING]
    run(main_finetune, [*flags, "--epochs", "1"])
    assert (
        __import__("yaml").safe_load((out / "config.yaml").read_text())["lr"] is None
    )  # derived from --blr: not frozen
    fails(main_finetune, [*flags, "--epochs", "1"], "holds another run's checkpoints")
    text = fails(main_finetune, [*flags, "--epochs", "2", "--resume", "auto"], "--epochs 2 (checkpoint: 1)")
    assert "--allow_changed_flags" in text
    fails(
        main_finetune,
        [*flags, "--epochs", "1", "--batch_size", "4", "--resume", "auto"],
        "--batch_size 4 (checkpoint: 8)",
    )
    run(main_finetune, [*flags, "--epochs", "2", "--resume", "auto", "--allow_changed_flags"])
    assert "resuming" in (printed := capsys.readouterr().out) and "--epochs 2 (checkpoint: 1)" in printed
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    starts = [entry for entry in log if "run_start" in entry]
    assert starts[0]["resumed_from"] is None and len(starts) == 2
    assert starts[1]["resumed_from"] in (
        str(out / "checkpoint-last.pth"),
        str(out / "checkpoint-best.pth"),
    )  # both epoch 0
    assert [entry.get("epoch") for entry in log if "epoch" in entry] == [0, 1]
    run(main_finetune, [*flags, "--epochs", "1", "--overwrite"])  # a fresh run replacing the old one, on request


@pytest.mark.parametrize(
    "label, message", [("5", "label 5 outside 0..3 (--nb_classes 4)"), ("-1", "label -1 is no class index (0..K-1)")]
)
def test_bad_evaluation_labels_stop_the_run_at_start_up(split, pretrained, tmp_path, label, message):
    rows = split[1].read_text().splitlines()
    rows[2] = f"{label}," + rows[2].split(",", 1)[1]
    split[1].write_text("\n".join(rows) + "\n")
    out = tmp_path / "o"
    text = fails(
        main_finetune,
        [
            *COMMON,
            *data_flags(split),
            "--finetune",
            str(pretrained),
            "--output_dir",
            str(out),
            "--nb_classes",
            "4",
            *NO_MIXING,
        ],
        message,
    )
    assert "val.csv" in text and not any(out.glob("checkpoint-*.pth"))  # before any training


def test_image_folder_class_names_travel_from_training_to_eval(pretrained, tmp_path, capsys):
    from conftest import make_tree

    train = make_tree(tmp_path / "train", ["beach", "forest"], per_class=8)
    val = make_tree(tmp_path / "val", ["forest"], per_class=2)  # lacks beach/
    out = tmp_path / "ft"
    run(
        main_finetune,
        [
            *COMMON,
            "--train_path",
            str(train),
            "--test_path",
            str(val),
            "--finetune",
            str(pretrained),
            "--output_dir",
            str(out),
            "--epochs",
            "1",
            *NO_MIXING,
        ],
    )
    assert checkpoint.read_checkpoint(out / "checkpoint-last.pth")["class_names"] == ["beach", "forest"]
    run(
        main_finetune,
        [
            "--test_path",
            str(val),
            "--num_workers",
            "0",
            "--output_dir",
            str(out),
            "--eval",
            "--resume",
            "auto",
            "--train_path",
            "unused",
        ],
    )
    metrics = json.loads((out / "eval" / "eval_metrics.json").read_text())
    assert metrics["class_names"] == ["beach", "forest"] and metrics["images"] == 2
    assert "no images of class(es) beach" in capsys.readouterr().out


def test_eval_or_resume_with_other_normalisation_than_the_checkpoint_is_refused(split, pretrained, tmp_path):
    out = tmp_path / "ft"
    flags = [*COMMON, *data_flags(split), "--finetune", str(pretrained), "--output_dir", str(out), *NO_MIXING]
    run(main_finetune, [*flags, "--epochs", "1"])
    other = ["--mean", "0.5", "0.5", "0.5", "--std", "0.2", "0.2", "0.2"]
    text = fails(
        main_finetune,
        [*COMMON, "--test_path", str(split[1]), "--output_dir", str(out), "--eval", "--resume", "auto", *other],
        "was trained with other band flags: --mean 0.5 0.5 0.5 (checkpoint: ",
    )
    assert "--std 0.2 0.2 0.2" in text
    fails(main_finetune, [*flags, "--epochs", "1", "--resume", "auto", *other], "--mean [0.5, 0.5, 0.5] (checkpoint: ")
    run(main_finetune, [*COMMON, "--test_path", str(split[1]), "--output_dir", str(out), "--eval", "--resume", "auto"])


def test_one_folder_trains_on_a_seeded_split_and_eval_scores_the_images_it_held_out(pretrained, tmp_path, capsys):
    from conftest import make_tree

    data = make_tree(tmp_path / "mine", ["bright", "dark"], per_class=10)
    out = tmp_path / "ft"
    split = ["--train_path", str(data), "--test_path", "split", "--val_fraction", "0.25"]
    run(main_finetune, [*COMMON, *split, "--finetune", str(pretrained), "--output_dir", str(out), "--epochs", "1"])
    printed = capsys.readouterr().out
    assert f"data: seeded split (seed 0) of {data}: 25% evaluated" in printed
    assert "15 training / 5 evaluation images, 2 classes" in printed
    evaluation = [*split, "--num_workers", "0", "--output_dir", str(out), "--eval", "--resume", "auto"]
    run(main_finetune, evaluation)
    metrics = json.loads((out / "eval" / "eval_metrics.json").read_text())
    assert metrics["images"] == 5 and metrics["evaluated"] == "25% of mine held out (seed 0)"
    fails(main_finetune, [*evaluation, "--seed", "1"], f"--test_path split: {out / 'checkpoint-last.pth'} was trained")
    assert "with --seed 0, which chose its held-out images; give --seed 0" in fails(
        main_finetune, [*evaluation, "--seed", "1"], "--seed 0"
    )


@pytest.mark.parametrize("module", [main_finetune, main_linprobe])
def test_the_users_training_data_is_never_evaluated_on_the_sample(module, tmp_path):
    from conftest import make_tree

    data = make_tree(tmp_path / "mine", ["bright", "dark"], per_class=2)
    text = fails(
        module,
        ["--train_path", str(data), "--output_dir", str(tmp_path / "o")],
        f"--test_path missing: give the evaluation set of --train_path {data} (--test_path PATH), or --test_path "
        "split to hold out a seeded --val_fraction of it",
    )
    assert not (tmp_path / "o").exists()  # refused before the run started
    assert "val.csv" not in text


def test_linear_probe_on_a_split_of_one_folder(pretrained, tmp_path, capsys):
    from conftest import make_tree

    data = make_tree(tmp_path / "mine", ["bright", "dark"], per_class=6)
    out = tmp_path / "lp"
    flags = ["--train_path", str(data), "--test_path", "split", "--finetune", str(pretrained), "--no_aug"]
    run(main_linprobe, [*COMMON, *flags, "--output_dir", str(out), "--epochs", "1"])
    assert "10 training / 2 evaluation images" in capsys.readouterr().out  # 20 % of 12 images held out
