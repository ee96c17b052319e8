import os

import pytest
import torch
from upstream_layouts import upstream_checkpoint

from model_loading import load_mae
from util.errors import CheckpointError
from util.files import file_md5
from util.run import checkpoint as ckpt


def test_truncated_and_missing_files_give_one_line_errors(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(upstream_checkpoint("timm"), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth: not a readable PyTorch checkpoint, truncated or corrupt"):
        load_mae(truncated)
    with pytest.raises(CheckpointError, match="nothere.pth: no such checkpoint file"):
        load_mae(tmp_path / "nothere.pth")


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_checkpoint",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": RunsCode()}, path)
    with pytest.raises(CheckpointError, match="evil.pth: refused to load"):
        load_mae(path)
    assert not (tmp_path / "pwned_by_checkpoint").exists()


def test_published_names_are_md5_checked(tmp_path, monkeypatch):
    path = tmp_path / "cross_scale_mae_base_pretrain.pth"
    torch.save(upstream_checkpoint("timm"), path)
    with pytest.raises(CheckpointError, match="md5 .* does not match the published 0c33995da85c112d9602f89d5b186bbc"):
        load_mae(path)
    monkeypatch.setitem(ckpt.PUBLISHED_FILENAMES, path.name, file_md5(path))
    monkeypatch.setitem(ckpt.PUBLISHED_MD5, file_md5(path), "published test file")
    _, report = load_mae(path)
    assert report.md5_status.endswith("verified: published test file")


def test_atomic_save_keeps_the_previous_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-last.pth"
    ckpt.save_checkpoint({"epoch": 1}, path)

    def disk_full(obj, f, *args, **kwargs):  # f: the open temporary file (a full disk raises OSError through it)
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="could not write .*checkpoint-last.pth: No space left on device"):
        ckpt.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert ckpt.read_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-last.pth"]


def test_resume_auto_chooses_by_what_the_files_hold_not_their_times(tmp_path):
    """A finished run's files copied one at a time, newest epoch first (so the oldest epoch has the newest mtime)."""
    run = tmp_path / "restored"
    run.mkdir()
    positions = {
        "checkpoint-last.pth": (5, 0),
        "checkpoint-5.pth": (5, 0),
        "checkpoint-3.pth": (3, 0),
        "checkpoint-1.pth": (1, 0),
    }
    for name, (epoch, _) in positions.items():
        ckpt.save_checkpoint({"epoch": epoch, "model": {}}, run / name)
    ckpt.save_checkpoint(
        {"epoch": 4, "next_step": 7, "model": {}}, run / "checkpoint-pre.pth"
    )  # pre-empted inside epoch 5
    path, state = ckpt.find_resume_checkpoint("auto", run)
    assert path.name == "checkpoint-last.pth" and state["epoch"] == 5
    (run / "checkpoint-last.pth").unlink()
    assert ckpt.find_resume_checkpoint("auto", run)[0].name == "checkpoint-5.pth"
    ckpt.save_checkpoint({"epoch": "3", "model": {}}, run / "checkpoint-9.pth")  # a malformed epoch is skipped
    assert ckpt.find_resume_checkpoint("auto", run)[0].name == "checkpoint-5.pth"


def test_training_position_of_complete_and_preempted_epochs():
    assert ckpt.training_position({"epoch": 2}) == (3, 0)
    assert ckpt.training_position({"epoch": 2, "next_step": 4}) == (3, 4)
    assert ckpt.training_position({"epoch": -1, "next_step": 4}) == (0, 4)  # pre-empted inside the first epoch
    for bad in ({}, {"epoch": "3"}, {"epoch": 1, "next_step": -3}, {"epoch": -1}, {"epoch": 1.5}):
        assert ckpt.training_position(bad) is None, bad


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_checkpoint_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    from model_loading import export_encoder
    from models_cross_scale_mae import create_model

    old = os.umask(umask)
    try:
        ckpt.save_checkpoint({"x": torch.zeros(1)}, tmp_path / "checkpoint-last.pth")
        export_encoder(create_model("mae_vit_tiny", input_size=16, patch_size=8), tmp_path / "encoder")
    finally:
        os.umask(old)
    for name in ("checkpoint-last.pth", "encoder.pth", "encoder/model.safetensors", "encoder/config.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_band_flags_compare_nan_nodata_and_default_bands_as_equal():
    from conftest import bands_of

    from util.errors import UsageError

    saved = {"in_chans": 4, "bands": None, "mean": [1.0] * 4, "std": [2.0] * 4, "nodata": float("nan")}
    flags = dict(in_chans=4, bands=[0, 1, 2, 3], mean=[1.0] * 4, std=[2.0] * 4, nodata=float("nan"))
    same = bands_of(**flags)
    ckpt.check_band_flags(saved, same, "c.pth")
    assert not ckpt.changed_flags(saved, {**same.record(), "lr": None, "world_size": 1})
    for flag, value in (("bands", [3, 2, 1, 0]), ("mean", [0.0] * 4), ("nodata", 0.0), ("nodata", None)):
        other = bands_of(**{**flags, flag: value})
        with pytest.raises(UsageError, match=f"c.pth: was trained with other band flags: --{flag} "):
            ckpt.check_band_flags(saved, other, "c.pth")
        assert ckpt.changed_flags(saved, {**other.record(), "lr": None, "world_size": 1})[0].startswith(f"--{flag} ")


def test_a_missing_file_of_a_published_name_is_one_line_not_a_traceback(tmp_path):
    """Before: the md5 check opened it first and raised a raw FileNotFoundError (tools/export_weights.py)."""
    from util.weights import layouts

    path = tmp_path / "weights" / next(iter(ckpt.PUBLISHED_FILENAMES))
    with pytest.raises(CheckpointError, match=f"^{path}: no such checkpoint file"):
        layouts.read_encoder(path)
