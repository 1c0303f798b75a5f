"""medmitra.storage: temp file -> fsync -> atomic rename, paths from ids only, the start-up
sweep, and a full disk reported as InsufficientStorage (507), never a raw OSError."""

from __future__ import annotations

import errno
import hashlib
import os
import uuid
from pathlib import Path

import pytest

from medmitra import storage as storage_mod
from medmitra.errors import InsufficientStorage
from medmitra.storage import HEAD_BYTES, Storage


@pytest.fixture
def store(tmp_path: Path) -> Storage:
    s = Storage(tmp_path / "data")
    s.open()
    return s


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def write(store: Storage, *chunks: bytes):
    up = store.new_upload()
    for chunk in chunks:
        up.write(chunk)
    return up


def test_open_creates_the_layout(store: Storage) -> None:
    assert store.files_dir.is_dir() and store.tmp_dir.is_dir()
    assert store.files_dir == store.root / "files" and store.tmp_dir == store.root / "tmp"


def test_upload_is_written_to_tmp_then_committed_atomically(store: Storage) -> None:
    chunks = [b"%PDF-1.4\n", b"a" * HEAD_BYTES, b"tail"]
    up = write(store, *chunks)
    data = b"".join(chunks)
    # While in flight the bytes live only in tmp/, never under files/.
    assert up.path.parent == store.tmp_dir
    assert files_under(store.files_dir) == []
    assert up.size == len(data)
    assert up.head == data[:HEAD_BYTES]
    assert up.sha256 == hashlib.sha256(data).hexdigest()

    fid = str(uuid.uuid4())
    dest = store.commit(up, fid)
    assert dest == store.files_dir / fid[:2] / fid
    assert dest.read_bytes() == data
    assert list(store.tmp_dir.iterdir()) == []     # renamed, not copied
    assert store.exists(fid) and store.path_for(fid) == dest


def test_commit_uses_a_rename_so_readers_never_see_a_partial_file(store: Storage,
                                                                  monkeypatch) -> None:
    seen = []
    real = os.replace

    def spy(src, dst, *a, **kw):
        # At the moment of the rename the final path does not exist yet.
        seen.append((Path(src).parent, Path(dst).exists()))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(storage_mod.os, "replace", spy)
    fid = str(uuid.uuid4())
    store.commit(write(store, b"hello"), fid)
    assert seen == [(store.tmp_dir, False)]


def test_discard_removes_the_temp_file(store: Storage) -> None:
    up = write(store, b"abc")
    assert up.path.exists()
    up.discard()
    up.discard()  # idempotent
    assert list(store.tmp_dir.iterdir()) == []


def test_paths_are_derived_from_ids_only(store: Storage) -> None:
    fid = "0F8FAD5B-D9CB-469F-A165-70867728950E"
    canonical = str(uuid.UUID(fid))
    assert store.path_for(fid) == store.files_dir / canonical[:2] / canonical
    # Other spellings of the same UUID land on the same canonical path.
    assert store.path_for("{" + fid + "}") == store.path_for(canonical.replace("-", ""))


@pytest.mark.parametrize("bad", ["../../etc/passwd", "", "report.pdf", "..", "/",
                                 "0f8fad5b-d9cb-469f-a165-70867728950e/../../x",
                                 "0f8fad5b-d9cb-469f-a165-70867728950", "\x00"])
def test_non_uuid_ids_are_refused(store: Storage, bad: str) -> None:
    with pytest.raises(ValueError):
        store.path_for(bad)
    up = write(store, b"data")
    with pytest.raises(ValueError):
        store.commit(up, bad)
    up.discard()
    assert files_under(store.root) == []
    with pytest.raises(ValueError):
        store.exists(bad)
    store.delete([bad])          # logged and ignored, never a path outside files/
    assert (store.root / "files").is_dir()


def test_delete_removes_bytes_and_tolerates_missing(store: Storage) -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    store.commit(write(store, b"a"), a)
    store.commit(write(store, b"b"), b)
    store.delete([a, str(uuid.uuid4())])
    assert not store.exists(a) and store.exists(b)


def test_sweep_removes_temp_files_and_orphans(store: Storage) -> None:
    keep, orphan = str(uuid.uuid4()), str(uuid.uuid4())
    store.commit(write(store, b"keep"), keep)
    store.commit(write(store, b"orphan"), orphan)
    in_flight = write(store, b"half an upload")          # a crash mid-upload
    (store.tmp_dir / "stray.part").write_bytes(b"x")
    temps, orphans = store.sweep({keep})
    assert (temps, orphans) == (2, 1)
    assert list(store.tmp_dir.iterdir()) == []
    assert not in_flight.path.exists()
    in_flight.discard()                                 # closes the handle; nothing to unlink
    assert files_under(store.files_dir) == [store.path_for(keep)]
    assert store.stored_ids() == {keep}
    assert store.sweep({keep}) == (0, 0)


# -- disk full ---------------------------------------------------------------------------

class FullDisk:
    """Stands in for a file object whose writes and flushes fail with ENOSPC."""

    def __init__(self, real, fail_on: str):
        self._real, self._fail_on, self.closed = real, fail_on, False

    def write(self, chunk):
        if self._fail_on == "write":
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._real.write(chunk)

    def flush(self):
        if self._fail_on == "flush":
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return self._real.flush()

    def fileno(self):
        return self._real.fileno()

    def close(self):
        self.closed = True
        self._real.close()


def test_disk_full_on_write_is_insufficient_storage(store: Storage) -> None:
    up = store.new_upload()
    up._fh = FullDisk(up._fh, "write")
    with pytest.raises(InsufficientStorage) as info:
        up.write(b"x" * 100)
    assert info.value.status == 507
    up.discard()
    assert list(store.tmp_dir.iterdir()) == []


def test_disk_full_on_flush_is_insufficient_storage(store: Storage) -> None:
    up = write(store, b"abc")
    up._fh = FullDisk(up._fh, "flush")
    with pytest.raises(InsufficientStorage):
        store.commit(up, str(uuid.uuid4()))
    up.discard()
    assert files_under(store.root) == []


def test_disk_full_on_rename_is_insufficient_storage(store: Storage, monkeypatch) -> None:
    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage_mod.os, "replace", full)
    fid = str(uuid.uuid4())
    with pytest.raises(InsufficientStorage):
        store.commit(write(store, b"abc"), fid)
    assert files_under(store.root) == []          # the temp file went too


def test_other_os_errors_are_not_disguised(store: Storage, monkeypatch) -> None:
    def denied(*a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(storage_mod.os, "replace", denied)
    with pytest.raises(PermissionError):
        store.commit(write(store, b"abc"), str(uuid.uuid4()))
    assert files_under(store.root) == []


def test_creating_a_temp_file_on_a_full_disk(store: Storage, monkeypatch) -> None:
    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage_mod, "open", full, raising=False)
    with pytest.raises(InsufficientStorage):
        store.new_upload()


def test_uploads_refused_below_min_free_bytes(tmp_path: Path) -> None:
    s = Storage(tmp_path / "d", min_free_bytes=1 << 62)   # more than any disk has
    s.open()
    with pytest.raises(InsufficientStorage):
        s.new_upload()
    assert list(s.tmp_dir.iterdir()) == []
    roomy = Storage(tmp_path / "d", min_free_bytes=0)
    roomy.new_upload().discard()
