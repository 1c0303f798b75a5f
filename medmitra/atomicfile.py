"""Atomic file writes, in one place: write a temp file in the target's directory, fsync it,
rename it over the target, fsync the directory.

A reader (or a restart after a crash at any moment) sees the old file or the complete new
one, never a part. Used for user uploads (storage.py), the local JWT secret
(auth/keys.py), model files copied in by the CLI, the model-hash cache (llm/runtime.py)
and the audit trail's head file (ops/audit.py, not fsynced: see ``durable``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in ``directory`` durable (POSIX). Directories cannot
    be opened on Windows, where this is a no-op."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, dest: Path, *, exclusive: bool = False, durable: bool = True) -> None:
    """Move the finished (already fsynced) temp file ``tmp`` to ``dest`` atomically and
    make the move durable.

    ``exclusive``: never replace an existing ``dest`` (FileExistsError instead; ``tmp`` is
    left for the caller to remove). Done with ``os.link``, which does not clobber a file a
    concurrent process has just created; where hard links are unsupported it falls back to
    ``os.replace`` (still atomic, last writer wins).
    """
    if exclusive:
        try:
            os.link(tmp, dest)
        except FileExistsError:
            raise
        except OSError:
            os.replace(tmp, dest)
        else:
            os.unlink(tmp)
    else:
        os.replace(tmp, dest)
    if durable:
        fsync_dir(dest.parent)


@contextlib.contextmanager
def atomic_file(path: Path, *, mode: int | None = None, exclusive: bool = False,
                durable: bool = True) -> Iterator[BinaryIO]:
    """``with atomic_file(path) as fh: fh.write(...)``: ``path`` appears complete when the
    block ends, or not at all if it raises (the temp file is removed).

    ``mode``: permission bits of the new file, set before any byte is written.
    ``exclusive``: see ``publish``; raises FileExistsError if ``path`` exists.
    ``durable=False``: no fsync of the file or the directory. Still all-or-nothing for
    readers, but after a power cut the old file may be back; only for a file that another
    durable record can stand in for.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.chmod(tmp, mode)
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        publish(tmp, path, exclusive=exclusive, durable=durable)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_atomic(path: Path, data: bytes | str, *, mode: int | None = None,
                 exclusive: bool = False, durable: bool = True) -> None:
    """Replace (or, ``exclusive``, create) ``path`` with ``data`` atomically."""
    with atomic_file(path, mode=mode, exclusive=exclusive, durable=durable) as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
