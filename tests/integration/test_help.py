"""``--help`` of every script: defaults and units shown, answered before torch loads."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S, REPO

from util import config

SHOW_HELP = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
print("TORCH LOADED" if "torch" in sys.modules else "NO TORCH")
"""


def help_text(script):
    result = subprocess.run(
        [sys.executable, "-c", SHOW_HELP, script], cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split())  # argparse wraps lines


ENTRY_POINTS = ["main_pretrain.py", "main_finetune.py", "main_linprobe.py", "main_knn.py", "main_segment.py"]
TOOLS = [
    "tools/band_stats.py",
    "tools/preprocess.py",
    "tools/seg_baseline.py",
    "tools/sample_eval.py",
    "tools/export_weights.py",
    "tools/prepare_benchmark.py",
    "tools/make_sample_data.py",
]
# Tools whose --help answers before torch loads (preprocess and seg_baseline still import it first).
TORCH_FREE_TOOLS = [
    "tools/band_stats.py",
    "tools/sample_eval.py",
    "tools/export_weights.py",
    "tools/prepare_benchmark.py",
    "tools/make_sample_data.py",
]


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_help_shows_defaults_and_answers_before_torch_loads(script):
    text = help_text(script)
    assert text.endswith("NO TORCH")
    assert text.startswith(f"usage: {script}")
    assert re.search(r"--output_dir OUTPUT_DIR .*?\(default: \S+\)", text)
    if script != "main_knn.py":
        assert re.search(r"--epochs EPOCHS epochs of the whole run .*?\(default: \d+\)", text)
        assert (
            "--dist_timeout DIST_TIMEOUT time before a stuck collective ends the job, in minutes (default: 30.0)"
            in text
        )
        assert re.search(r"--input_size INPUT_SIZE (image|crop) side in pixels .*?\(default:", text)


@pytest.mark.parametrize("script", TOOLS)
def test_every_tool_answers_help(script):
    text = help_text(script)
    assert text.startswith(f"usage: {Path(script).name}")
    docstring = ast.get_docstring(ast.parse((REPO / script).read_text()), clean=False)
    assert config.summary(docstring) in text  # the whole first paragraph: a first line alone stopped mid-sentence
    assert script not in TORCH_FREE_TOOLS or text.endswith("NO TORCH")


def test_pretrain_help_gives_the_epochs_default_and_knn_help_describes_its_outputs():
    assert "--epochs EPOCHS epochs of the whole run (a resume continues to it) (default: 200)" in help_text(
        "main_pretrain.py"
    )
    knn = help_text("main_knn.py")
    assert (
        "--output_dir OUTPUT_DIR folder of knn_results.csv/.md, protocol.json and knn_accuracy_vs_scale.png; a "
        "training run's folder (one holding checkpoint-*.pth) gets them in its knn/ subfolder"
    ) in knn
    assert "checkpoints, config" not in knn
    assert "--k K neighbours (k) of the weighted classifier (default: 20)" in knn


def test_export_tool_answers_help_before_torch_and_errors_in_one_line(tmp_path):
    import torch
    from upstream_layouts import upstream_checkpoint

    import tools.export_weights as tool
    from util.run.process import run_entry_point

    text = help_text("tools/export_weights.py")
    assert text.endswith("NO TORCH") and "--gsd GSD ground sample distance of the pretraining data, metres" in text
    parse = tool.get_args_parser().parse_args
    with pytest.raises(SystemExit, match=r"^error: \S*missing\.pth: no such checkpoint file$"):
        run_entry_point(tool.main, parse([str(tmp_path / "missing.pth"), "--output", str(tmp_path / "out")]))
    torch.save(upstream_checkpoint("timm"), tmp_path / "up.pth")
    with pytest.raises(SystemExit, match=r"^error: --band_names: 2 name\(s\) for a 3-band encoder$"):
        run_entry_point(
            tool.main,
            parse([str(tmp_path / "up.pth"), "--output", str(tmp_path / "out"), "--band_names", "B04", "B03"]),
        )
    with pytest.raises(SystemExit, match=r"^error: --hashed_pth a-b: a file name stem without"):
        run_entry_point(
            tool.main, parse([str(tmp_path / "up.pth"), "--output", str(tmp_path / "out"), "--hashed_pth", "a-b"])
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", [*ENTRY_POINTS, *TOOLS])
def test_help_shows_each_default_once_and_no_path_of_this_clone(script):
    text = help_text(script)
    assert str(REPO) not in text  # the same on every clone: the repository's data/..., as below
    for flag_help in re.split(r" (?=--\w)", text):  # each flag's entry (argparse joined into one line)
        assert flag_help.count("default:") <= 1, flag_help  # "(…; default: all) (default: None)" is gone


def test_help_shows_repository_paths_relative_and_the_launchers_defaults():
    text = help_text("main_pretrain.py")
    assert (
        "--train_path TRAIN_PATH CSV file (fMoW format), ImageFolder tree or image folder (default: the repository's "
        "data/sentinel2_rgb/train.csv)" in text
    )
    assert (
        "The defaults are upstream's (its paper run on fMoW-RGB: 224 px, batch 512, 200 epochs, --blr 5e-5); `bash "
        "train.sh` runs the embedded sample with the quick start's" in text
    )
    assert "shown as R G B; default: all) --band_stats" in text  # the help's own default, not argparse's again
    assert "`bash finetune.sh` runs the embedded sample with its own" in help_text("main_finetune.py")
    assert "--cls_token the cls token after norm --head_init_std" in help_text("main_linprobe.py")  # no pair default
    stats = help_text("tools/band_stats.py")
    for entry in (
        "--workers WORKERS reading processes (default: 1)",
        "(default: 64)",
        "(default: 1.0 2.0 50.0 98.0 99.0)",
    ):
        assert entry in stats


def test_bare_scripts_on_the_sample_note_that_the_defaults_are_upstreams(capsys):
    import main_finetune
    import main_pretrain
    from util import config

    flags = config.parse_args(main_pretrain.get_args_parser(), [])
    note = config.note_upstream_defaults(flags, main_pretrain.UPSTREAM_DEFAULTS, "bash train.sh")
    assert note == (
        "note: --input_size 224 --batch_size 512 --epochs 200 --blr 5e-05: upstream's paper defaults (fMoW-RGB) on the "
        "small embedded sample; `bash train.sh` runs the sample with its own settings (the top of the launcher)"
    )
    assert capsys.readouterr().out == note + "\n"
    chosen = config.parse_args(main_pretrain.get_args_parser(), ["--input_size", "64", "--batch_size", "32"])
    assert config.note_upstream_defaults(chosen, main_pretrain.UPSTREAM_DEFAULTS, "bash train.sh").startswith(
        "note: --epochs 200 --blr 5e-05: "
    )
    mine = config.parse_args(main_finetune.get_args_parser(), ["--train_path", "/elsewhere/train.csv"])
    assert config.note_upstream_defaults(mine, main_finetune.UPSTREAM_DEFAULTS, "bash finetune.sh") is None


@pytest.mark.parametrize(
    "script, flag",
    [
        ("main_pretrain.py", "--train_path"),
        ("main_finetune.py", "--finetune"),
        ("main_knn.py", "--checkpoints"),
        ("main_segment.py", "--test_path"),
    ],
)
def test_a_missing_input_path_is_named_absolute_before_torch_loads(script, flag, tmp_path):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(REPO / script), flag, "mine/missing"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    error = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert result.returncode == 1 and error == [f"error: {flag} {tmp_path}/mine/missing: no such file or folder"]
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert "util.config" in imported and "torch" not in imported


def test_knn_refuses_one_checkpoint_given_twice_before_torch_loads(tmp_path):
    """Its rows are keyed by checkpoint: the same one twice (here through a link) was a KeyError traceback after the
    first had been scored."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pth").write_bytes(b"not read")
    (tmp_path / "link").symlink_to(tmp_path / "run")
    result = subprocess.run(
        [sys.executable, str(REPO / "main_knn.py"), "--checkpoints", "run/checkpoint.pth", "link/checkpoint.pth"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 1 and result.stderr == (
        "error: --checkpoints gives run/checkpoint.pth and link/checkpoint.pth: the same checkpoint twice\n"
    )


WITHOUT_TORCH = """
import importlib.util, runpy, sys
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] == "torch" else find_spec(name, *a)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize(
    "argv", [["main_knn.py", "--checkpoints", "none"], ["tools/preprocess.py", "--input", "x", "--output", "y"]]
)
def test_a_python_without_the_requirements_is_named_in_one_line(argv):
    """`bash knn.sh` outside the virtual environment ran the system's python: a ModuleNotFoundError traceback."""
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *argv], cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"error: {sys.executable} has no torch: run with the Python that requirements.txt was installed into "
        "(activate its virtual environment: . .venv/bin/activate; or set PYTHON=/path/to/python for the launchers)\n"
    )
