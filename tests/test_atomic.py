"""Writes are atomic: a file the project writes (manifest, checkpoint, report, index) holds its new
bytes or its old ones, never a part, whatever stops the write; nothing half-written is visible."""
from __future__ import annotations

import os

import pytest
import torch

from model import read_checkpoint, save_checkpoint
from pipeline.shards import atomic_write_bytes, atomic_write_json


class DiskFull(OSError):
    pass


def fail_at_fsync(monkeypatch) -> None:
    """The write stops after its bytes went out but before they reached the disk (a full disk, a
    crash): what a reader sees then is what the defence decides."""
    def full(fd):
        raise DiskFull(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)


def visible(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_an_interrupted_write_leaves_the_old_bytes(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    atomic_write_json(path, {"version": 1})
    fail_at_fsync(monkeypatch)
    with pytest.raises(DiskFull):
        atomic_write_bytes(path, b'{"version": 2, "and much more": "' + b"x" * 100_000 + b'"}')
    assert path.read_bytes() == b'{\n  "version": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]       # no temp file left either


def test_an_interrupted_first_write_leaves_no_file(tmp_path, monkeypatch):
    fail_at_fsync(monkeypatch)
    with pytest.raises(DiskFull):
        atomic_write_bytes(tmp_path / "report.md", b"# report")
    assert visible(tmp_path) == []


def test_an_interrupted_checkpoint_save_keeps_the_last_whole_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    model = torch.nn.Linear(3, 2)
    save_checkpoint(path, model, {"model": {}, "train": {}}, 10)
    with torch.no_grad():
        model.weight.add_(1)
    fail_at_fsync(monkeypatch)
    with pytest.raises(DiskFull):
        save_checkpoint(path, model, {"model": {}, "train": {}}, 20)
    monkeypatch.undo()
    assert read_checkpoint(path)["step"] == 10


def test_a_shard_being_written_is_invisible_until_whole(tmp_path):
    """Mid-shard (where a crash would leave it) no tar and no index exist under their names; a
    writer that fails leaves none either, and a finished one both."""
    from pipeline.shards import TarShardWriter

    path = tmp_path / "train" / "pairs-000000.tar"
    writer = TarShardWriter(path)
    for key in ("00000_000000", "00000_000001"):
        writer.add(key, {"cur.png": b"x" * 1000, "json": b"{}"})
    assert visible(path.parent) == []                 # a reader globbing *.tar or *.idx sees nothing yet
    writer.close()
    assert visible(path.parent) == ["pairs-000000.idx", "pairs-000000.tar"]
    with pytest.raises(DiskFull):
        with TarShardWriter(tmp_path / "val" / "pairs-000000.tar") as failing:
            failing.add("00001_000000", {"cur.png": b"y"})
            raise DiskFull(28, "No space left on device")
    assert visible(tmp_path / "val") == [] and list((tmp_path / "val").iterdir()) == []
