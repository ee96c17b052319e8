"""The suite's own guards (tests/conftest.py): a disk too full to hold it is one line at the start, and temporary
files of the suite's processes stay out of /tmp."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import conftest
import pytest


def session_with(basetemp):
    return SimpleNamespace(config=SimpleNamespace(option=SimpleNamespace(basetemp=basetemp)))


def test_a_disk_without_room_for_the_suite_is_one_error_line_before_any_test(monkeypatch, tmp_path):
    """CI once failed with hundreds of ``could not create numbered dir`` setup errors: /tmp's disk was full."""
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100e9, 99.5e9, 0.5e9))
    with pytest.raises(pytest.exit.Exception) as stop:
        conftest.pytest_sessionstart(session_with(tmp_path / "not" / "made"))
    message = str(stop.value)
    assert message.startswith(f"error: {tmp_path} has 0.5 GB free; the suite needs about 2 GB") and "\n" not in message
    assert stop.value.returncode == 1


def test_a_disk_with_room_starts_the_suite(monkeypatch, tmp_path):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100e9, 97e9, 3e9))
    conftest.pytest_sessionstart(session_with(tmp_path))


def test_subprocesses_write_temporary_files_in_the_runs_folder_and_tmp_path_stays_outside_it(tmp_path):
    """The run's folder is removed at its end; a failing test's tmp_path must outlive it."""
    run_folder = Path(os.environ["TMPDIR"])
    assert run_folder.name.startswith("suite-tmp-")
    assert tempfile.gettempdir() == str(run_folder)
    child = subprocess.run(
        [sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"], capture_output=True, text=True
    )
    assert child.stdout.strip() == str(run_folder)
    assert run_folder not in tmp_path.parents
