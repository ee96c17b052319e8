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


def config_with(basetemp):
    return SimpleNamespace(option=SimpleNamespace(basetemp=basetemp, help=False, version=False))


def test_a_disk_without_room_for_the_suite_is_one_error_line_before_any_test(monkeypatch, tmp_path, capsys):
    """CI once failed with hundreds of ``could not create numbered dir`` setup errors: /tmp's disk was full."""
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100e9, 99.5e9, 0.5e9))
    assert conftest.pytest_cmdline_main(config_with(tmp_path / "not" / "made")) == 1
    assert capsys.readouterr().err == (
        f"error: {tmp_path} has 0.5 GB free; the suite needs about 2 GB there (free some space, or point --basetemp "
        "at a disk that has it)\n"
    )


def test_a_disk_with_room_starts_the_suite(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100e9, 97e9, 3e9))
    assert conftest.pytest_cmdline_main(config_with(tmp_path)) is None and capsys.readouterr().err == ""


FULL_DISK = "import shutil\nshutil.disk_usage = lambda path: shutil._ntuple_diskusage(100e9, 99.5e9, 0.5e9)\n"


@pytest.mark.parametrize("workers", [[], ["-n", "2"]])
def test_pytest_on_a_full_disk_prints_only_the_error_line_and_leaves_no_folder(tmp_path, workers):
    """``pytest.exit`` in ``pytest_sessionstart`` printed it twice (``Exit: error: ...``), named the run's own
    folder (TMPDIR moved already), and a full disk refused that folder before any check."""
    (tmp_path / "full_disk.py").write_text(FULL_DISK)
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TMPDIR": str(tmp_path / "tmp")}
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_DEBUG_TEMPROOT", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "full_disk", *workers, "tests/unit/test_suite_guards.py"],
        cwd=conftest.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=conftest.HANG_GUARD_S,
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"error: {tmp_path / 'tmp'} has 0.5 GB free; the suite needs about 2 GB there (free some space, or point "
        "--basetemp at a disk that has it)\n"
    )
    assert list((tmp_path / "tmp").iterdir()) == []


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
