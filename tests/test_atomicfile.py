"""medmitra/atomicfile.py: a file appears complete or not at all, and nothing is left over."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from medmitra.atomicfile import atomic_file, publish, write_atomic


def test_write_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    write_atomic(target, "one")
    assert target.read_text() == "one"
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_failure_inside_the_block_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as fh:
            fh.write(b"half of the new")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_exclusive_never_replaces(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    write_atomic(target, "first", exclusive=True)
    with pytest.raises(FileExistsError):
        write_atomic(target, "second", exclusive=True)
    assert target.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_mode_is_set(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    write_atomic(target, "s", mode=0o600)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_publish_moves_a_finished_temp_file(tmp_path: Path) -> None:
    tmp = tmp_path / "upload.part"
    tmp.write_bytes(b"bytes")
    dest = tmp_path / "sub" / "final"
    dest.parent.mkdir()
    publish(tmp, dest)
    assert dest.read_bytes() == b"bytes" and not tmp.exists()


def test_durable_false_skips_every_fsync_and_is_still_all_or_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    target = tmp_path / "head"
    write_atomic(target, "1 abc\n")
    assert len(synced) == 2                       # the file, then its directory
    synced.clear()
    write_atomic(target, "2 def\n", mode=0o600, durable=False)
    assert synced == [] and target.read_text() == "2 def\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    (tmp_path / "taken").mkdir()
    with pytest.raises(IsADirectoryError):   # the rename fails: no temp file is left
        write_atomic(tmp_path / "taken", "3 ghi\n", durable=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head", "taken"]
