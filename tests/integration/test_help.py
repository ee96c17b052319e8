"""``--help`` of every script: defaults and units shown, answered before torch loads."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S, REPO

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
    assert help_text(script).startswith(f"usage: {Path(script).name}")


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
