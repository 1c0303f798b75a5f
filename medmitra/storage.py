"""The only module that writes user files.

Layout under ``<data_dir>/``: ``files/<2 hex>/<file_id>`` for stored bytes (the name is the
file's UUID, never the client's name) and ``tmp/`` for uploads in flight. Bytes are
streamed to a temp file, fsynced, then renamed into place, so a stored file is always
complete. The database row is committed after the rename; a crash in between leaves an
orphan that ``sweep`` removes at the next start.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from medmitra import filemodes
from medmitra.atomicfile import publish
from medmitra.errors import InsufficientStorage

log = logging.getLogger("medmitra.storage")

HEAD_BYTES = 4096


def _check_id(file_id: str) -> str:
    # Paths are derived from ids only; anything that is not a canonical UUID is refused.
    return str(uuid.UUID(file_id))


def _is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class TempUpload:
    """A file being received. Write chunks, then ``Storage.commit`` or ``discard``."""

    def __init__(self, path: Path):
        self.path = path
        self.size = 0
        self.head = b""
        self._sha = hashlib.sha256()
        # 0600 whatever the umask: uploads are patient data (filemodes.py). Closed in
        # finish()/discard().
        self._fh = open(path, "xb", opener=filemodes.private_opener)  # noqa: SIM115

    def write(self, chunk: bytes) -> None:
        if len(self.head) < HEAD_BYTES:
            self.head += chunk[: HEAD_BYTES - len(self.head)]
        self._sha.update(chunk)
        self.size += len(chunk)
        try:
            self._fh.write(chunk)
        except OSError as exc:
            if _is_disk_full(exc):
                raise InsufficientStorage() from None
            raise

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def finish(self) -> None:
        if self._fh.closed:
            return
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            self._close_quietly()
            if _is_disk_full(exc):
                raise InsufficientStorage() from None
            raise
        self._fh.close()

    def discard(self) -> None:
        self._close_quietly()
        self.path.unlink(missing_ok=True)

    def _close_quietly(self) -> None:
        # Closing flushes what is still buffered; on a full disk that fails again (ENOSPC)
        # although the descriptor is closed. The bytes are being thrown away, or the first
        # error is already being reported, so this one is dropped.
        try:
            self._fh.close()
        except OSError:
            pass


@dataclass
class FilePart:
    """An uploaded file of a request: the form field it came in, the client's name and
    declared type (never trusted), and its bytes in a temp upload."""
    field: str
    filename: str | None
    declared_type: str | None
    upload: TempUpload


class Storage:
    def __init__(self, root: Path, *, min_free_bytes: int = 0):
        self.root = root
        self.files_dir = root / "files"
        self.tmp_dir = root / "tmp"
        self.min_free_bytes = min_free_bytes

    def open(self) -> None:
        filemodes.private_dir(self.files_dir)
        filemodes.private_dir(self.tmp_dir)

    # -- writing -----------------------------------------------------------------------

    def new_upload(self) -> TempUpload:
        if self.free_bytes() < self.min_free_bytes:
            raise InsufficientStorage()
        try:
            return TempUpload(self.tmp_dir / f"upload-{uuid.uuid4().hex}.part")
        except OSError as exc:
            if _is_disk_full(exc):
                raise InsufficientStorage() from None
            raise

    def path_for(self, file_id: str) -> Path:
        fid = _check_id(file_id)
        return self.files_dir / fid[:2] / fid

    def commit(self, upload: TempUpload, file_id: str) -> Path:
        """Move a finished upload to its final place atomically."""
        upload.finish()
        dest = self.path_for(file_id)
        try:
            filemodes.private_dir(dest.parent)
            publish(upload.path, dest)
        except OSError as exc:
            upload.discard()
            if _is_disk_full(exc):
                raise InsufficientStorage() from None
            raise
        return dest

    def delete(self, file_ids: Iterable[str]) -> None:
        for fid in file_ids:
            try:
                self.path_for(fid).unlink(missing_ok=True)
            except (OSError, ValueError):
                log.warning("could not remove stored file %s", fid)

    # -- reading -----------------------------------------------------------------------

    def exists(self, file_id: str) -> bool:
        return self.path_for(file_id).is_file()

    def free_bytes(self) -> int:
        try:
            return shutil.disk_usage(self.root).free
        except OSError:
            return 0

    def stored_ids(self) -> set[str]:
        out = set()
        for sub in self.files_dir.iterdir():
            if sub.is_dir():
                out.update(p.name for p in sub.iterdir() if p.is_file())
        return out

    def sweep(self, known_ids: set[str]) -> tuple[int, int]:
        """Remove uploads in flight from a previous run and stored files with no row.

        Returns (temp files removed, orphans removed)."""
        temps = 0
        for p in self.tmp_dir.iterdir():
            p.unlink(missing_ok=True)
            temps += 1
        orphans = 0
        for fid in self.stored_ids() - known_ids:
            for p in self.files_dir.glob(f"*/{fid}"):
                p.unlink(missing_ok=True)
                orphans += 1
        return temps, orphans
