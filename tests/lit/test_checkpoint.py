"""Atomic checkpoint writes and a last.ckpt that is the last epoch (csdlab/lit/checkpoint.py)."""

import errno

import pytest
import torch

from csdlab.lit import checkpoint as ckpt_mod
from csdlab.lit.checkpoint import AtomicCheckpointIO, LastEpochCheckpoint


def test_write_then_read_back(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.arange(5.0)}, tmp_path / "sub" / "best.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "sub" / "best.ckpt", weights_only=True)["w"], torch.arange(5.0))
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["best.ckpt"]


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "best.ckpt"
    io.save_checkpoint({"epoch": 3, "w": torch.ones(1000)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):  # writes part of the file, then the disk is full
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", disk_full)
    with pytest.raises(OSError, match=r"could not write checkpoint .*best.ckpt \(No space left on device\); "
                                      r"the previous file, if any, is unchanged"):
        io.save_checkpoint({"epoch": 4, "w": torch.zeros(1000)}, path)
    assert path.read_bytes() == before  # not truncated
    assert [p.name for p in tmp_path.iterdir()] == ["best.ckpt"]  # no temporary file left
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert torch.load(path, weights_only=True)["epoch"] == 3


def test_failed_first_write_leaves_no_file(tmp_path, monkeypatch):
    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", disk_full)
    with pytest.raises(OSError, match="could not write checkpoint"):
        AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_link_mode_is_refused():
    with pytest.raises(ValueError, match="save_last='link' makes last.ckpt point at the best checkpoint"):
        LastEpochCheckpoint(monitor="val/top1", mode="max", save_last="link")
