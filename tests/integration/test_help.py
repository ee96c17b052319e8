"""``--help`` of every script: defaults and units shown, answered before torch loads."""
import re
import subprocess
import sys

import pytest
from conftest import REPO

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
    result = subprocess.run([sys.executable, "-c", SHOW_HELP, script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split())  # argparse wraps lines


@pytest.mark.parametrize("script", ["main_pretrain.py", "main_finetune.py", "main_linprobe.py", "main_knn.py"])
def test_help_shows_defaults_and_answers_before_torch_loads(script):
    text = help_text(script)
    assert text.endswith("NO TORCH")
    assert text.startswith(f"usage: {script}")
    assert re.search(r"--output_dir OUTPUT_DIR .*?\(default: \S+\)", text)
    if script != "main_knn.py":
        assert re.search(r"--epochs EPOCHS epochs of the whole run .*?\(default: \d+\)", text)
        assert "--dist_timeout DIST_TIMEOUT time before a stuck collective ends the job, in minutes (default: 30.0)" in text
        assert "--input_size INPUT_SIZE image side in pixels (default:" in text


def test_pretrain_help_gives_the_epochs_default_and_knn_help_describes_its_outputs():
    assert "--epochs EPOCHS epochs of the whole run (a resume continues to it) (default: 200)" in help_text("main_pretrain.py")
    knn = help_text("main_knn.py")
    assert ("--output_dir OUTPUT_DIR folder of knn_results.csv/.md, protocol.json and knn_accuracy_vs_scale.png; a "
            "training run's folder (one holding checkpoint-*.pth) gets them in its knn/ subfolder") in knn
    assert "checkpoints, config" not in knn
    assert "--k K neighbours (k) of the weighted classifier (default: 20)" in knn
