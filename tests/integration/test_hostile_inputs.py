"""Hostile inputs: each gives exit status 1 and one line ``error: …``, no traceback."""

import errno
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HANG_GUARD_S, REPO, TINY_ONE_EPOCH, write_csv_dataset
from PIL import Image

import engine_knn
import main_knn
import main_linprobe
import main_pretrain
from util import config
from util.data import datasets, images, packed
from util.errors import DataError
from util.run import checkpoint, process
from util.run.process import run_entry_point


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_csv_dataset(tmp_path_factory.mktemp("hostile"), 8, "train.csv")


def expect_error(module, argv):
    """The message of the SystemExit that ends the run; a string code means exit status 1 (Python prints it)."""
    with pytest.raises(SystemExit) as info:
        run_entry_point(module.main, config.parse_args(module.get_args_parser(), argv))
    assert isinstance(info.value.code, str)
    message = str(info.value)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message, message
    return message


FLAG_CASES = [
    (["--lr", "-1"], "--lr must be > 0, got -1.0"),
    (
        ["--scale_range", "0", "0"],
        "--scale_range must satisfy 0 < min <= max <= 1 (area fractions of the crop), got 0.0 0.0",
    ),
    (["--scale_range", "0.8", "0.2"], "--scale_range must satisfy 0 < min <= max <= 1"),
    (["--loss_weights", "rec=nan"], "--loss_weights: weights must be finite and at least 0, got rec=nan"),
    (["--num_workers", "-1"], "--num_workers must be at least 0, got -1"),
    (["--input_size", "0"], "--input_size must be at least 1, got 0"),
    (["--input_size", "-16"], "--input_size must be at least 1, got -16"),
    (["--patch_size", "0"], "--patch_size must be at least 1, got 0"),
    (["--std", "0", "0", "0"], "--std must be > 0, got 0.0 0.0 0.0"),
    (["--device", "mps"], "--device mps: Apple MPS is not available"),
    (
        ["--mask_ratio", "0.95", "--input_size", "32", "--patch_size", "8"],
        "--mask_ratio 0.95 leaves no visible patch of the 16 patches",
    ),
    (["--max_image_pixels", "0"], "--max_image_pixels must be at least 1"),
    (["--max_image_pixels", "inf"], "--max_image_pixels must be finite and at least 1, got inf"),  # was OverflowError
    (["--min_lr", "inf"], "--min_lr must be finite and at least 0, got inf"),
    (["--seed", "-1"], "--seed must be in [0, 4.29497e+09], got -1"),
]


@pytest.mark.parametrize("flags,expected", FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_bad_pretrain_flags(data, tmp_path, flags, expected):
    if flags[:2] == ["--device", "mps"] and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    message = expect_error(
        main_pretrain, [*TINY_ONE_EPOCH, "--train_path", str(data), "--output_dir", str(tmp_path / "o"), *flags]
    )
    assert expected in message


@pytest.mark.parametrize("flag", ["--save_every", "--plot_every"])
def test_save_and_plot_every_0_mean_only_the_last_epoch(data, tmp_path, flag):
    out = tmp_path / "o"
    main_pretrain.main(
        config.parse_args(
            main_pretrain.get_args_parser(),
            [*TINY_ONE_EPOCH, "--epochs", "2", "--train_path", str(data), "--output_dir", str(out), flag, "0"],
        )
    )
    assert (out / "checkpoint-1.pth").exists() and not (out / "checkpoint-0.pth").exists()


def test_linprobe_batch_of_one(data, tmp_path):
    message = expect_error(
        main_linprobe,
        [
            "--model",
            "vit_tiny_patch16",
            "--input_size",
            "32",
            "--batch_size",
            "1",
            "--train_path",
            str(data),
            "--test_path",
            str(data),
            "--output_dir",
            str(tmp_path),
        ],
    )
    assert "--batch_size must be at least 2 per device for linear probing" in message


def test_knn_input_size_not_divisible(data, tmp_path):
    message = expect_error(
        main_knn,
        [
            "--checkpoints",
            "none",
            "--model",
            "vit_tiny_patch16",
            "--input_size",
            "36",
            "--patch_size",
            "8",
            "--train_path",
            str(data),
            "--test_path",
            str(data),
            "--output_dir",
            str(tmp_path),
        ],
    )
    assert "--input_size 36 is not divisible by --patch_size 8" in message


CONFIG_CASES = [
    ("epochs: [1]", "epochs: expected a single int"),
    ("epochs: 1.7", "epochs: 1.7 is not a valid int"),
    ("batch_size: null", "batch_size: null, but the flag needs a value"),
    ("mean: 0.5", "mean: expected a list, got 0.5"),
    ("amp: fp8", "amp: 'fp8' is not one of auto, bf16, fp16, none"),
    ("skip_bad_images: 3", "skip_bad_images: expected true or false"),
]


@pytest.mark.parametrize("text,expected", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_values_of_the_wrong_type(data, tmp_path, capsys, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    message = expect_error(main_pretrain, [*TINY_ONE_EPOCH, "--config", str(path), "--train_path", str(data)])
    assert f"--config {path}: {expected}" in message


def test_config_string_for_a_string_flag_is_kept_as_the_command_line_would(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("resume: 5\nlr: 1e-3\n")
    args = config.parse_args(main_pretrain.get_args_parser(), ["--config", str(path)])
    assert args.resume == "5" and args.lr == 1e-3


def test_second_live_run_in_the_same_folder_is_refused(data, tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys; f = open(sys.argv[1], 'a+'); "
            "fcntl.flock(f, fcntl.LOCK_EX); f.write('pid 1 on elsewhere'); f.flush(); print('held', flush=True); "
            "sys.stdin.read()",  # holds the lock until killed: no time bound that a loaded machine could outlast
            str(tmp_path / ".lock"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        message = expect_error(
            main_pretrain, [*TINY_ONE_EPOCH, "--train_path", str(data), "--output_dir", str(tmp_path)]
        )
        assert f"--output_dir {tmp_path} is in use by another run (pid 1 on elsewhere)" in message
    finally:
        holder.kill()
        holder.wait()
    process.prepare_output_dir(tmp_path)  # the dead holder's lock is gone
    assert "pid" in (tmp_path / ".lock").read_text()
    process.release_output_dirs()


def test_stale_temporaries_are_removed_at_start(tmp_path, capsys):
    (tmp_path / ".checkpoint-last.pth.abcd1234.tmp").write_bytes(b"x" * 2048)
    (tmp_path / "keep.txt").write_text("mine")
    process.prepare_output_dir(tmp_path)
    process.release_output_dirs()
    assert not list(tmp_path.glob(".*.tmp")) and (tmp_path / "keep.txt").exists()
    assert "removed 1 temporary file(s)" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_unusable_output_dir_is_one_line(data, tmp_path, monkeypatch, kind):
    out = tmp_path / "o"
    if kind == "file":
        out.write_text("not a folder")
    else:
        real_open = open

        def refusing(path, *a, **k):
            if str(path).endswith(".lock"):
                raise PermissionError(errno.EACCES, "Permission denied")
            return real_open(path, *a, **k)

        monkeypatch.setattr("builtins.open", refusing)
    message = expect_error(main_pretrain, [*TINY_ONE_EPOCH, "--train_path", str(data), "--output_dir", str(out)])
    assert f"--output_dir {out}: cannot create or write it" in message


def test_full_disk_on_log_and_config_warns_and_continues(data, tmp_path, monkeypatch, capfd):
    real_open = open

    def full(path, *a, **k):
        if str(path).endswith(("log.txt",)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", full)
    real_write_text = Path.write_text

    def full_for_config(self, *a, **k):
        if self.name == "config.yaml":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full_for_config)
    import engine_pretrain

    monkeypatch.setattr(
        engine_pretrain,
        "save_reconstruction_png",
        lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")),
    )
    out = tmp_path / "o"
    main_pretrain.main(
        config.parse_args(
            main_pretrain.get_args_parser(), [*TINY_ONE_EPOCH, "--train_path", str(data), "--output_dir", str(out)]
        )
    )
    err = capfd.readouterr().err
    assert f"warning: could not write {out / 'log.txt'}: No space left on device; continuing" in err
    assert f"warning: could not write {out / 'config.yaml'}: No space left on device" in err
    assert f"warning: could not write {out / 'plots' / 'reconstruction_epoch0000.png'}: No space left on device" in err
    assert (out / "checkpoint-last.pth").exists()


def test_zero_byte_checkpoint_is_named_and_skipped_by_resume_auto(tmp_path, capsys):
    (tmp_path / "checkpoint-9.pth").write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint-9.pth: not a readable PyTorch checkpoint"):
        checkpoint.read_checkpoint(tmp_path / "checkpoint-9.pth")
    assert checkpoint.find_resume_checkpoint("auto", tmp_path) is None
    assert "resume: skipping" in capsys.readouterr().out


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("args", [1, 2], "field 'args' must be a mapping, found list"),
        ("model_config", [1], "field 'model_config' must be a mapping, found list"),
    ],
)
def test_checkpoint_fields_of_the_wrong_type(tmp_path, field, value, expected):
    path = tmp_path / "c.pth"
    torch.save({"model": {}, "epoch": 0, field: value}, path)
    with pytest.raises(checkpoint.CheckpointError, match=expected):
        checkpoint.read_checkpoint(path)


@pytest.mark.parametrize("fields", [{"epoch": "3"}, {"next_step": -3}, {}])
def test_checkpoint_without_a_valid_position_is_skipped_by_resume_auto(tmp_path, fields):
    state = {"model": {}, "epoch": 0, **fields}
    if not fields:
        del state["epoch"]
    torch.save(state, tmp_path / "checkpoint-last.pth")
    assert checkpoint.find_resume_checkpoint("auto", tmp_path) is None


def test_decompression_bomb_is_a_bad_image_and_skippable(tmp_path):
    Image.new("L", (12000, 12000)).save(tmp_path / "bomb.png", optimize=True)
    with pytest.raises(images.BadImageError, match="declares 12000 x 12000 pixels, more than --max_image_pixels"):
        images.load_image(str(tmp_path / "bomb.png"), max_pixels=10**8)
    dataset = datasets.ImageDataset([(str(tmp_path / "bomb.png"), 0)] * 2, describe=lambda i: "bomb", max_pixels=10**8)
    with pytest.raises(DataError, match="bomb: cannot read image"):
        dataset[0]


def seed_files():
    files = {}
    base = Image.new("RGB", (24, 16), (10, 200, 30))
    for fmt in ("JPEG", "PNG", "TIFF"):
        buffer = io.BytesIO()
        base.save(buffer, format=fmt)
        files[fmt] = buffer.getvalue()
    return files


def mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    kind = rng.randrange(3)
    if kind == 0:  # bit flips
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncation
        data = data[: rng.randrange(len(data))]
    else:  # header edit: overwrite bytes near the start with random values
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(min(64, len(data)))
            data[i] = rng.randrange(256)
    return bytes(data)


def test_fuzzed_images_raise_only_bad_image_errors(tmp_path):
    rng = random.Random(1234)
    for fmt, original in seed_files().items():
        for n in range(100):
            path = tmp_path / f"f{n}.{fmt.lower()}"
            path.write_bytes(mutate(original, rng))
            try:  # a mutated header may declare a huge size: refused, never decoded
                assert images.load_image(str(path), max_pixels=10**6).mode == "RGB"
            except images.BadImageError as e:
                assert "\n" not in str(e) and str(path) in str(e)


def test_unreadable_class_folder_is_reported(tmp_path, monkeypatch):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "x.png")
    real = Path.iterdir

    def iterdir(self):
        if self.name == "b":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(DataError, match=r"b: cannot list the folder \(Permission denied\)"):
        datasets.scan_image_folder(tmp_path)


@pytest.mark.parametrize(
    "meta,expected",
    [
        ({"size": "32"}, "key 'size' must be a positive integer, got '32'"),
        ({"size": -32}, "key 'size' must be a positive integer, got -32"),
        ({"labels": ["water"]}, "key 'labels' must hold integer class indices (or -1), found 'water'"),
    ],
)
def test_hand_edited_packed_description(tmp_path, meta, expected):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"size": 32, "count": 1, "array": "p.u8", "labels": [0], **meta}))
    with pytest.raises(DataError) as info:
        packed.PackedDataset(path)
    assert str(path) in str(info.value) and expected in str(info.value)


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--workers", "0"], "--workers must be at least 1, got 0"),
        (["--size", "0"], "--size must be at least 1, got 0"),
        (["--max_image_pixels", "inf"], "--max_image_pixels must be finite and at least 1, got inf"),
    ],
)
def test_preprocess_flags(data, tmp_path, flags, expected):
    sys.path.insert(0, str(REPO / "tools"))
    import preprocess

    with pytest.raises(SystemExit) as info:
        preprocess.main(["--input", str(data), "--output", str(tmp_path), *flags])
    assert str(info.value) == f"error: {expected}"


def test_sigterm_during_an_epochs_last_step_completes_that_epochs_record(data, tmp_path, monkeypatch):
    from util.run import loop

    calls = []

    def stop_after_first_check(run):  # the stop arrives after the check of step 0: during the last step (1 of 2)
        calls.append(1)
        return len(calls) > 1

    monkeypatch.setattr(loop, "stop_requested", stop_after_first_check)
    out = tmp_path / "o"
    main_pretrain.main(
        config.parse_args(
            main_pretrain.get_args_parser(),
            [*TINY_ONE_EPOCH, "--epochs", "2", "--train_path", str(data), "--output_dir", str(out)],
        )
    )
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    epochs = [r for r in records if "epoch" in r]
    assert len(epochs) == 1 and epochs[0]["epoch"] == 0 and "train_loss" in epochs[0], records
    state = checkpoint.read_checkpoint(out / "checkpoint-last.pth")
    assert checkpoint.training_position(state) == (1, 0)


@pytest.mark.parametrize(
    "edit,expected",
    [
        (
            lambda c: setattr(c["args"], "norm_style", "banana"),
            "field 'norm_style' must be 'pre' or 'post', found 'banana'",
        ),
        (
            lambda c: c["model"].__setitem__("cls_token", torch.tensor(0.5)),
            "field 'cls_token' must be a 3-d tensor, found ()",
        ),
    ],
)
def test_upstream_checkpoint_with_odd_fields_read_as_encoder(tmp_path, edit, expected):
    from upstream_layouts import upstream_checkpoint

    from util.weights import layouts

    state = upstream_checkpoint("timm")
    edit(state)
    path = tmp_path / "up.pth"
    torch.save(state, path)
    with pytest.raises(checkpoint.CheckpointError) as info:
        layouts.read_encoder(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_odd_norm_style_in_upstream_args_is_ignored_and_in_model_config_named(data, tmp_path):
    from upstream_layouts import upstream_checkpoint

    import model_loading

    state = upstream_checkpoint("timm")
    state["args"].norm_style = "banana"
    path = tmp_path / "up.pth"
    torch.save(state, path)
    model_loading.load_mae(path)  # upstream args only choose among variants; the layout decides the norm style
    out = tmp_path / "o"
    main_pretrain.main(
        config.parse_args(
            main_pretrain.get_args_parser(), [*TINY_ONE_EPOCH, "--train_path", str(data), "--output_dir", str(out)]
        )
    )
    ours = checkpoint.read_checkpoint(out / "checkpoint-last.pth")
    ours["model_config"]["kwargs"]["norm_style"] = "banana"
    torch.save(ours, path)
    with pytest.raises(checkpoint.CheckpointError, match="its model_config / args describe no model this code builds"):
        model_loading.load_mae(path)


def test_bad_rng_state_in_a_resumed_checkpoint_is_named(data, tmp_path):
    out = tmp_path / "o"
    argv = [*TINY_ONE_EPOCH, "--train_path", str(data), "--output_dir", str(out)]
    main_pretrain.main(config.parse_args(main_pretrain.get_args_parser(), argv))
    state = checkpoint.read_checkpoint(out / "checkpoint-last.pth")
    state["rng_per_rank"] = [{}]
    torch.save(state, out / "checkpoint-last.pth")
    message = expect_error(main_pretrain, [*argv, "--resume", str(out / "checkpoint-last.pth")])
    assert "checkpoint-last.pth: field 'rng_per_rank' holds no valid RNG state" in message


def test_full_disk_on_knn_outputs_warns_and_prints_the_table(data, tmp_path, monkeypatch, capfd):
    real_open = open

    def full(path, *a, **k):
        if str(path).endswith("knn_results.csv"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", full)
    monkeypatch.setattr(
        Path,
        "write_text",
        lambda self, *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")),
    )
    monkeypatch.setattr(
        engine_knn,
        "save_knn_plot",
        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")),
    )
    out = tmp_path / "k"
    main_knn.main(
        config.parse_args(
            main_knn.get_args_parser(),
            [
                "--checkpoints",
                "none",
                "--model",
                "vit_tiny_patch16",
                "--input_size",
                "32",
                "--patch_size",
                "8",
                "--scales",
                "1",
                "--k",
                "2",
                "--majority_k",
                "1",
                "--num_workers",
                "0",
                "--amp",
                "none",
                "--train_path",
                str(data),
                "--test_path",
                str(data),
                "--output_dir",
                str(out),
            ],
        )
    )
    captured = capfd.readouterr()
    for name in ("knn_results.csv", "knn_results.md", "protocol.json", "knn_accuracy_vs_scale.png"):
        assert f"warning: could not write {out / name}: No space left on device; continuing" in captured.err
    assert "| checkpoint | schedule seen | classifier |" in captured.out


@pytest.mark.parametrize(
    "script, argv, expected",
    [
        ("main_pretrain.py", ["--lr", "-1"], "error: --lr must be > 0, got -1.0"),
        (
            "main_knn.py",
            ["--checkpoints", "none", "--model", "vit_tiny_patch16", "--temperature", "0"],
            "error: --temperature",
        ),
    ],
)
def test_a_real_process_exits_1_with_one_line(tmp_path, script, argv, expected):
    """What a user sees in a shell: exit status 1, one stderr line, no traceback."""
    repo = REPO
    result = subprocess.run(
        [sys.executable, script, *argv, "--output_dir", str(tmp_path / "o")],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().startswith(expected) and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_full_disk_on_tensorboard_events_warns_once_and_training_goes_on(data, tmp_path, monkeypatch, capfd):
    from torch.utils.tensorboard import SummaryWriter

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    out = tmp_path / "o"
    main_pretrain.main(
        config.parse_args(
            main_pretrain.get_args_parser(), [*TINY_ONE_EPOCH, "--train_path", str(data), "--output_dir", str(out)]
        )
    )
    err = capfd.readouterr().err
    assert (
        err.count(
            f"warning: could not write TensorBoard events in {out} (add_scalar): No space left on device; continuing"
        )
        == 1
    )
    assert (out / "checkpoint-last.pth").exists() and (out / "encoder.pth").exists()


@pytest.mark.parametrize(
    "content", [b"hello", bytes(random.Random(0).randrange(256) for _ in range(300))], ids=["text", "random"]
)
def test_a_file_that_is_not_a_checkpoint_is_named_as_such(data, tmp_path, content):
    path = tmp_path / "not_a_checkpoint.pth"
    path.write_bytes(content)
    message = expect_error(
        main_pretrain,
        [*TINY_ONE_EPOCH, "--train_path", str(data), "--output_dir", str(tmp_path / "o"), "--resume", str(path)],
    )
    assert message.startswith(f"error: {path}: not a readable PyTorch checkpoint, truncated or corrupt")


def test_preprocess_output_that_is_a_file(data, tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    import preprocess

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SystemExit) as info:
        preprocess.main(["--input", str(data), "--output", str(afile), "--size", "32"])
    assert str(info.value).startswith(f"error: --output {afile}: cannot create")


def test_the_stop_message_names_the_signal_received(monkeypatch):
    import signal as signals

    from util.run import process

    monkeypatch.setattr(process, "_STOP_REASON", [])
    monkeypatch.setattr(process, "_STOP_SIGNAL", [])
    monkeypatch.setattr(process._STOP, "set", lambda: None)
    assert process.stop_reason() == "a stop signal on another process" and process.stopped_exit_status() == 143
    monkeypatch.setattr(signals, "signal", lambda *a: None)
    process._interrupt(signals.SIGINT, None)
    assert process.stop_reason() == "Ctrl-C (SIGINT)" and process.stopped_exit_status() == 130
    monkeypatch.setattr(process, "_STOP_REASON", [])
    monkeypatch.setattr(process, "_STOP_SIGNAL", [])
    process._request_stop(signals.SIGUSR1, None)
    assert process.stop_reason() == "SIGUSR1" and process.stopped_exit_status() == 138
