"""Which files of the project one pretraining batch passes through: from the loader's fetch through the loss and the
optimiser update to the end-of-epoch checkpoint (set-up and flag parsing left out), measured with ``sys.setprofile``
on a one-epoch tiny run (docs/architecture.md quotes the result).

    OMP_NUM_THREADS=2 python benchmarks/trace_batch.py
"""

import os
import runpy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# before any third-party import: one error line where this Python lacks the requirements (util/__init__.py)
import util  # noqa: F401

# isort: split

import engine_pretrain
from util.run import loop

REPO = Path(__file__).resolve().parents[1]

files: set[str] = set()


def profiler(frame, event, arg) -> None:
    path = frame.f_code.co_filename
    if event == "call" and path.startswith(str(REPO)) and "/.venv/" not in path:
        files.add(os.path.relpath(path, REPO))


def traced(fn):
    def wrapper(*args, **kwargs):
        sys.setprofile(profiler)
        try:
            return fn(*args, **kwargs)
        finally:
            sys.setprofile(None)

    return wrapper


engine_pretrain.train_one_epoch = traced(engine_pretrain.train_one_epoch)  # the batches: loader, model, steps
loop.end_epoch = traced(loop.end_epoch)  # the checkpoint and the log record
flags = [
    "--model",
    "cross_scale_mae_vit_tiny",
    "--input_size",
    "32",
    "--patch_size",
    "8",
    "--batch_size",
    "8",
    "--epochs",
    "1",
    "--num_workers",
    "0",
    "--log_every",
    "100",
    "--output_dir",
    tempfile.mkdtemp(),
]
sys.argv = ["main_pretrain.py", *flags]
try:
    runpy.run_path(str(REPO / "main_pretrain.py"), run_name="__main__")  # the entry script as the shell runs it
except SystemExit as end:
    if end.code:
        raise
print(f"{len(files)} files of the project on the path of a batch (besides train.sh and main_pretrain.py):")
print("\n".join(sorted(files)))
