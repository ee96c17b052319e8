import os

import pytest
import torch
from upstream_layouts import upstream_checkpoint

from model_loading import load_mae
from util import checkpoint as ckpt
from util.errors import CheckpointError


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
    monkeypatch.setitem(ckpt.PUBLISHED_FILENAMES, path.name, ckpt.file_md5(path))
    monkeypatch.setitem(ckpt.PUBLISHED_MD5, ckpt.file_md5(path), "published test file")
    _, report = load_mae(path)
    assert report.md5_status.endswith("verified: published test file")


def test_atomic_save_keeps_the_previous_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-last.pth"
    ckpt.save_checkpoint({"epoch": 1}, path)

    def disk_full(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="could not write .*checkpoint-last.pth: No space left on device"):
        ckpt.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert ckpt.read_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-last.pth"]


