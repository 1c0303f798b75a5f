"""Private files: the data dir holds patient records, so only the server's own account may
read it, whatever the umask.

New directories are made 0700 and new files 0600 (``private_dir``, ``open_private``); the
SQLite database is created 0600 before SQLite opens it, because SQLite gives its ``-wal``
and ``-shm`` files the mode of the database file. ``tighten`` brings an existing install
(made by an older version, or copied with a loose umask) to the same modes at start-up and
says so in the log.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("medmitra.filemodes")

DIR_MODE = 0o700
FILE_MODE = 0o600
_LOOSE = 0o077   # any permission bit for group or others


def private_dir(path: Path) -> Path:
    """mkdir -p with 0700 for the directories it creates (and ``path`` itself)."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & _LOOSE:
        os.chmod(path, DIR_MODE)
    return path


def open_private(path: Path, flags: int = os.O_WRONLY | os.O_CREAT | os.O_EXCL) -> int:
    """``os.open`` that creates the file 0600 whatever the umask."""
    fd = os.open(path, flags, FILE_MODE)
    if os.name == "posix":
        os.fchmod(fd, FILE_MODE)     # the umask can only remove bits; make it exact
    return fd


def private_opener(path: str, flags: int) -> int:
    """``opener=`` for the built-in ``open``: the file is created 0600 whatever the umask."""
    return open_private(Path(path), flags)


def create_private_file(path: Path) -> None:
    """Make sure ``path`` exists as a 0600 file (an empty one if it did not exist)."""
    try:
        os.close(open_private(path))
    except FileExistsError:
        pass


def tighten(root: Path) -> int:
    """chmod every directory under ``root`` (itself included) to 0700 and every file to
    0600 where group or others had any access. Returns how many entries were changed."""
    if os.name != "posix" or not root.is_dir():
        return 0
    changed = 0

    def fix(path: str, mode: int) -> None:
        nonlocal changed
        try:
            st = os.lstat(path)
        except OSError:
            return
        if stat.S_ISLNK(st.st_mode):
            return
        if stat.S_IMODE(st.st_mode) & _LOOSE:
            os.chmod(path, mode)
            changed += 1

    fix(str(root), DIR_MODE)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            fix(os.path.join(dirpath, d), DIR_MODE)
        for f in filenames:
            fix(os.path.join(dirpath, f), FILE_MODE)
    if changed:
        log.warning("tightened the permissions of %d file(s)/dir(s) in %s to owner-only "
                    "(0700/0600): they were readable by other local accounts", changed, root)
    return changed
