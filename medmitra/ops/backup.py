"""Consistent online backups of a data dir, their verification, and scheduled backups.

A backup is a folder:

    manifest.json        format, versions, counts, and every file below with SHA-256 + size
    manifest.sha256      SHA-256 of manifest.json (a flipped byte in the manifest is caught)
    medmitra.sqlite3     the database (SQLite only; on PostgreSQL pg_dump does the database)
    audit.sqlite3        the audit trail's own database file (SQLite only; ops/audit_store.py)
    files/<2 hex>/<id>   every uploaded file the database snapshot names
    secrets/jwt_secret, secrets/auth_keys/<kid>.pem, secrets/audit_key

Consistency while the server runs: the database is copied first with ``VACUUM INTO``, one
read transaction, so the copy is a snapshot; in WAL mode writers are not blocked meanwhile.
The audit file is copied the same way right after it (its rows name accesses, never rows of
the main file, so the two snapshots need not be one).
Then exactly the files that snapshot names are copied. A stored file is written and
renamed before its row is committed (storage.py), so every file of the snapshot exists,
unless its case or file was deleted after the snapshot: such rows are dropped from the
copy (the backup then holds the data dir as it was at the end of the copy, for those rows)
and counted in the manifest. Files uploaded after the snapshot are not copied: no orphan.

The backup is built in a hidden sibling folder and renamed into place when complete, so a
folder named like a backup is never half-written.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from medmitra import __version__
from medmitra.atomicfile import fsync_dir
from medmitra.config import Settings
from medmitra.ops.audit_store import AUDIT_DB_NAME

log = logging.getLogger("medmitra.ops.backup")

FORMAT = "medmitra-backup"
# 2: the audit trail in its own file (manifest key "audit_database"); 1 is still read.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MANIFEST_SUM = "manifest.sha256"
DB_NAME = "medmitra.sqlite3"
FILES_DIR = "files"
SECRETS_DIR = "secrets"
# Files of the data dir that a restored server needs besides the database and uploads.
SECRET_FILES = ("jwt_secret", "audit_key")
SECRET_DIRS = ("auth_keys",)
COPY_BLOCK_BYTES = 1 << 20
# Tables counted in the manifest (those that exist in the snapshot).
COUNTED_TABLES = ("cases", "case_files", "ai_insights", "jobs", "auth_users", "audit_log")
AUDIT_TABLE = "audit_log"
PG_NOTE = ("PostgreSQL: this backup holds the uploaded files, the keys and the manifest, "
           "not the database. Back the database up with pg_dump (e.g. pg_dump -Fc -f "
           "medmitra.dump DBNAME) at the same time, and restore it with pg_restore.")


class BackupError(Exception):
    """A backup could not be made, verified or restored; the message says why."""


@dataclass
class Entry:
    path: str          # relative to the backup folder, '/'-separated
    sha256: str
    size: int

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


@dataclass
class BackupResult:
    path: Path
    manifest: dict[str, Any]
    seconds: float
    warnings: list[str] = field(default_factory=list)


def utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def backups_dir(settings: Settings) -> Path:
    configured = settings.backup.dir
    return Path(configured).expanduser().resolve() if configured else \
        settings.data_path / "backups"


def sqlite_path(settings: Settings) -> Path:
    return Path(settings.database_url.removeprefix("sqlite://"))


def copy_hashed(src: Path, dest: Path, *, mode: int | None = None) -> Entry:
    """Copy src to dest (fsynced), hashing the bytes as they are read."""
    digest = hashlib.sha256()
    size = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        if mode is not None:
            os.chmod(dest, mode)
        while block := fin.read(COPY_BLOCK_BYTES):
            digest.update(block)
            size += len(block)
            fout.write(block)
        fout.flush()
        os.fsync(fout.fileno())
    return Entry("", digest.hexdigest(), size)


def hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(COPY_BLOCK_BYTES):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _progress(total: int, desc: str, show: bool) -> Any:
    """A tqdm bar on a terminal; a no-op object in scripts and tests."""
    if show:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="file", file=sys.stderr, leave=False)

    class _Quiet:
        def update(self, n: int = 1) -> None:
            pass

        def close(self) -> None:
            pass

    return _Quiet()


def _connect(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    return conn


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _counts(conn: sqlite3.Connection) -> dict[str, int]:
    have = _tables(conn)
    return {t: conn.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0]
            for t in COUNTED_TABLES if t in have}


def _schema_version(conn: sqlite3.Connection) -> int:
    if "schema_version" not in _tables(conn):
        return 0
    return int(conn.execute('SELECT MAX("version") FROM "schema_version"').fetchone()[0] or 0)


def file_rel(file_id: str) -> str:
    return f"{FILES_DIR}/{file_id[:2]}/{file_id}"


# -- making a backup ------------------------------------------------------------------------


def make_backup(settings: Settings, dest: Path | None = None, *, progress: bool = False
                ) -> BackupResult:
    """Write a complete backup folder at ``dest`` (default: backups_dir/medmitra-<UTC>)."""
    t0 = time.perf_counter()
    data = settings.data_path
    if dest is None:
        dest = backups_dir(settings) / f"medmitra-{utc_stamp()}"
    dest = Path(dest).expanduser().resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} already exists and is not empty")
    if dest == data or any(dest.is_relative_to(data / d) for d in (FILES_DIR, "tmp")):
        raise BackupError(f"{dest} is the data dir or inside its own folders")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        audit_entry = None
        if settings.is_sqlite:
            db_entry, file_rows, counts, version, warnings = _sqlite_snapshot(settings, staging)
            audit_entry, audit_counts = _audit_snapshot(settings, staging)
            counts.update(audit_counts)
        else:
            db_entry = None
            file_rows, counts, version = asyncio.run(_pg_listing(settings))
            warnings = [PG_NOTE]
        entries, missing = _copy_files(data, staging, file_rows, progress)
        if missing:
            if settings.is_sqlite:
                _drop_vanished(settings, staging, missing)
                db_entry, main_counts = _rehash_db(staging)
                counts.update(main_counts)
            warnings.append(f"{len(missing)} file(s) were deleted while the backup ran; "
                            "their rows are not in the backup")
        secrets = _copy_secrets(data, staging)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "app_version": __version__,
            "schema_version": version,
            "database": ({"kind": "sqlite", **db_entry.as_dict()} if db_entry else
                         {"kind": "postgres", "note": PG_NOTE}),
            **({"audit_database": audit_entry.as_dict()} if audit_entry else {}),
            "counts": {**counts, "stored_files": len(entries),
                       "removed_during_backup": len(missing)},
            "files": [e.as_dict() for e in entries],
            "secrets": [e.as_dict() for e in secrets],
        }
        raw = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
        _write_synced(staging / MANIFEST, raw)
        _write_synced(staging / MANIFEST_SUM,
                      f"{hashlib.sha256(raw).hexdigest()}  {MANIFEST}\n".encode("ascii"))
        fsync_dir(staging)
        if dest.exists():
            dest.rmdir()   # empty (checked above)
        os.replace(staging, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BackupResult(dest, manifest, time.perf_counter() - t0, warnings)


def _write_synced(path: Path, raw: bytes) -> None:
    with open(path, "xb") as fh:
        fh.write(raw)
        fh.flush()
        os.fsync(fh.fileno())


def _vacuum_copy(settings: Settings, src: Path, out: Path, what: str) -> sqlite3.Connection:
    """``src`` copied to ``out`` in one read transaction (a consistent snapshot, written
    compactly; writers go on), checked with integrity_check; the copy, opened."""
    conn = _connect(src, settings.database.busy_timeout_ms)
    try:
        conn.execute("VACUUM INTO ?", (str(out),))
    finally:
        conn.close()
    snap = sqlite3.connect(str(out), isolation_level=None)
    try:
        check = snap.execute("PRAGMA integrity_check").fetchall()
        if check != [("ok",)]:
            raise BackupError(f"the {what} copy fails integrity_check: {check[:5]}")
    except BaseException:
        snap.close()
        raise
    return snap


def _sqlite_snapshot(settings: Settings, staging: Path
                     ) -> tuple[Entry, list[tuple[str, str]], dict[str, int], int, list[str]]:
    src = sqlite_path(settings)
    if not src.is_file():
        raise BackupError(f"no database at {src}")
    out = staging / DB_NAME
    snap = _vacuum_copy(settings, src, out, "database")
    try:
        rows = snap.execute('SELECT "file_id", "sha256" FROM "case_files"').fetchall() \
            if "case_files" in _tables(snap) else []
        counts, version = _counts(snap), _schema_version(snap)
    finally:
        snap.close()
    sha, size = hash_file(out)
    return Entry(DB_NAME, sha, size), rows, counts, version, []


def _audit_snapshot(settings: Settings, staging: Path) -> tuple[Entry | None, dict[str, int]]:
    """The audit file, copied like the database (a snapshot, writers go on)."""
    src = sqlite_path(settings).with_name(AUDIT_DB_NAME)
    if not src.is_file():
        return None, {}      # no trail written in this data dir yet
    out = staging / AUDIT_DB_NAME
    snap = _vacuum_copy(settings, src, out, "audit file")
    try:
        counts = _counts(snap)
    finally:
        snap.close()
    sha, size = hash_file(out)
    return Entry(AUDIT_DB_NAME, sha, size), counts


async def _pg_listing(settings: Settings) -> tuple[list[tuple[str, str]], dict[str, int], int]:
    from tortoise import connections

    from medmitra.db.setup import current_version
    from medmitra.ops.db import ops_db

    async with ops_db(settings, migrate=False):
        conn = connections.get("default")
        rows = await conn.execute_query_dict('SELECT "file_id", "sha256" FROM "case_files"')
        counts = {}
        for t in COUNTED_TABLES:
            try:
                r = await conn.execute_query_dict(f'SELECT COUNT(*) AS n FROM "{t}"')
                counts[t] = int(r[0]["n"])
            except Exception:   # table of a later migration not present
                pass
        version = await current_version()
    return [(r["file_id"], r["sha256"]) for r in rows], counts, version


def _copy_files(data: Path, staging: Path, rows: list[tuple[str, str]], progress: bool
                ) -> tuple[list[Entry], list[str]]:
    entries: list[Entry] = []
    missing: list[str] = []
    bar = _progress(len(rows), "backup", progress)
    try:
        for file_id, recorded_sha in rows:
            rel = file_rel(file_id)
            src = data / rel
            try:
                e = copy_hashed(src, staging / rel)
            except FileNotFoundError:
                missing.append(file_id)
                (staging / rel).unlink(missing_ok=True)
                bar.update()
                continue
            if recorded_sha and e.sha256 != recorded_sha:
                # The stored bytes no longer match what was uploaded: never copy silently.
                raise BackupError(f"stored file {file_id} does not match its recorded "
                                  "SHA-256 (disk corruption?); backup stopped")
            entries.append(Entry(rel, e.sha256, e.size))
            bar.update()
    finally:
        bar.close()
    return entries, missing


def _drop_vanished(settings: Settings, staging: Path, missing: list[str]) -> None:
    """Rows whose file was deleted after the snapshot: drop the file row, and the whole case
    when the case itself is gone from the live database."""
    live = _connect(sqlite_path(settings), settings.database.busy_timeout_ms)
    snap = sqlite3.connect(str(staging / DB_NAME), isolation_level=None)
    try:
        snap.execute("PRAGMA foreign_keys = ON")
        snap.execute("BEGIN")
        for fid in missing:
            row = snap.execute('SELECT c."case_id" FROM "case_files" f JOIN "cases" c '
                               'ON c."id" = f."case_id" WHERE f."file_id" = ?', (fid,)).fetchone()
            snap.execute('DELETE FROM "case_files" WHERE "file_id" = ?', (fid,))
            if row and live.execute('SELECT 1 FROM "cases" WHERE "case_id" = ?',
                                    (row[0],)).fetchone() is None:
                snap.execute('DELETE FROM "cases" WHERE "case_id" = ?', (row[0],))
        snap.execute("COMMIT")
    finally:
        snap.close()
        live.close()


def _rehash_db(staging: Path) -> tuple[Entry, dict[str, int]]:
    snap = sqlite3.connect(str(staging / DB_NAME), isolation_level=None)
    try:
        counts = _counts(snap)
    finally:
        snap.close()
    sha, size = hash_file(staging / DB_NAME)
    return Entry(DB_NAME, sha, size), counts


def _copy_secrets(data: Path, staging: Path) -> list[Entry]:
    out: list[Entry] = []
    sources: list[Path] = [data / n for n in SECRET_FILES if (data / n).is_file()]
    for d in SECRET_DIRS:
        if (data / d).is_dir():
            sources += sorted(p for p in (data / d).iterdir() if p.is_file())
    for src in sources:
        rel = f"{SECRETS_DIR}/{src.relative_to(data).as_posix()}"
        (staging / rel).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        e = copy_hashed(src, staging / rel, mode=0o600)
        out.append(Entry(rel, e.sha256, e.size))
    return out


# -- verifying ------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise BackupError(f"{path} is not a backup: no {MANIFEST}")
    raw = (path / MANIFEST).read_bytes()
    try:
        recorded = (path / MANIFEST_SUM).read_text("ascii").split()[0]
    except (OSError, IndexError, UnicodeDecodeError):
        raise BackupError(f"{MANIFEST_SUM} is missing or unreadable") from None
    if hashlib.sha256(raw).hexdigest() != recorded:
        raise BackupError(f"{MANIFEST} does not match {MANIFEST_SUM}: the manifest was changed")
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise BackupError(f"{MANIFEST} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{MANIFEST} is not a {FORMAT} manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise BackupError(f"backup format {manifest.get('format_version')} is newer than this "
                          f"medmitra reads ({FORMAT_VERSION}); upgrade medmitra")
    return manifest


def listed_entries(manifest: dict[str, Any]) -> list[Entry]:
    out = [Entry(e["path"], e["sha256"], int(e["size"]))
           for e in manifest.get("files", []) + manifest.get("secrets", [])]
    db = manifest.get("database", {})
    if db.get("kind") == "sqlite":
        out.append(Entry(db["path"], db["sha256"], int(db["size"])))
    trail = manifest.get("audit_database")
    if trail:
        out.append(Entry(trail["path"], trail["sha256"], int(trail["size"])))
    for e in out:
        p = Path(e.path)
        if p.is_absolute() or ".." in p.parts:
            raise BackupError(f"{MANIFEST} names a path outside the backup: {e.path!r}")
    return out


def verify_backup(path: Path, *, progress: bool = False) -> tuple[dict[str, Any], list[str]]:
    """Check every checksum, the database's integrity and that rows and files agree.
    Returns (manifest, problems); no problem means the backup can be restored."""
    path = Path(path)
    manifest = read_manifest(path)
    problems: list[str] = []
    entries = listed_entries(manifest)
    bar = _progress(len(entries), "verify", progress)
    try:
        for e in entries:
            p = path / e.path
            if not p.is_file():
                problems.append(f"missing: {e.path}")
            else:
                sha, size = hash_file(p)
                if size != e.size or sha != e.sha256:
                    problems.append(f"checksum mismatch: {e.path}")
            bar.update()
    finally:
        bar.close()
    listed = {e.path for e in entries} | {MANIFEST, MANIFEST_SUM}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_file() and rel not in listed and not rel.startswith(
                (f"{DB_NAME}-", f"{AUDIT_DB_NAME}-")):
            problems.append(f"not in the manifest: {rel}")
    db = manifest.get("database", {})
    if db.get("kind") == "sqlite" and not any(x.endswith(DB_NAME) for x in problems):
        problems += _check_sqlite(path / DB_NAME, manifest)
    if manifest.get("audit_database") and not any(x.endswith(AUDIT_DB_NAME) for x in problems):
        problems += _check_audit_file(path / AUDIT_DB_NAME, manifest)
    return manifest, problems


def _check_audit_file(db_path: Path, manifest: dict[str, Any]) -> list[str]:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro&immutable=1", uri=True)
    try:
        check = conn.execute("PRAGMA integrity_check").fetchall()
        if check != [("ok",)]:
            return [f"audit file integrity_check: {check[0][0]}"]
        counts = _counts(conn)
    finally:
        conn.close()
    n, said = counts.get(AUDIT_TABLE), manifest.get("counts", {}).get(AUDIT_TABLE)
    return [] if n == said else [f"{AUDIT_TABLE}: {n} rows in {AUDIT_DB_NAME}, the manifest "
                                 f"says {said}"]


def _check_sqlite(db_path: Path, manifest: dict[str, Any]) -> list[str]:
    problems = []
    # Read-only and immutable: verifying never writes a -wal or -shm next to the backup.
    conn = sqlite3.connect(f"file:{db_path}?mode=ro&immutable=1", uri=True)
    try:
        check = conn.execute("PRAGMA integrity_check").fetchall()
        if check != [("ok",)]:
            problems.append(f"database integrity_check: {check[0][0]}")
            return problems
        if _schema_version(conn) != manifest.get("schema_version"):
            problems.append("database schema version differs from the manifest")
        ids = {r[0] for r in conn.execute('SELECT "file_id" FROM "case_files"')} \
            if "case_files" in _tables(conn) else set()
        counts = _counts(conn)
    finally:
        conn.close()
    have = {e["path"].rsplit("/", 1)[-1] for e in manifest.get("files", [])}
    for fid in sorted(ids - have):
        problems.append(f"file row {fid} has no file in the backup")
    for fid in sorted(have - ids):
        problems.append(f"file {fid} has no row in the database (orphan)")
    for table, n in counts.items():
        if table == AUDIT_TABLE and manifest.get("audit_database"):
            continue    # counted in the audit file (_check_audit_file)
        if manifest.get("counts", {}).get(table) != n:
            problems.append(f"{table}: {n} rows, the manifest says "
                            f"{manifest.get('counts', {}).get(table)}")
    return problems


# -- scheduled backups ----------------------------------------------------------------------


def prune(directory: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest complete backups named medmitra-* in directory."""
    if keep <= 0 or not directory.is_dir():
        return []
    done = sorted((p for p in directory.iterdir()
                   if p.is_dir() and p.name.startswith("medmitra-") and (p / MANIFEST).is_file()),
                  key=lambda p: p.name)
    removed = done[:-keep]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


async def run_schedule(settings: Settings, stop: Callable[[], bool] | None = None,
                       on_done: Callable[[BackupResult], None] | None = None) -> None:
    """The server's backup loop: one backup every ``backup.every_h`` hours, in a thread,
    then keep the newest ``backup.keep``. Errors are logged; the loop goes on."""
    interval_s = settings.backup.every_h * 3600
    while stop is None or not stop():
        await asyncio.sleep(interval_s)
        try:
            result = await asyncio.to_thread(make_backup, settings)
            removed = prune(backups_dir(settings), settings.backup.keep)
            log.info("scheduled backup written to %s in %.1f s (%d file(s)); %d old one(s) "
                     "removed", result.path, result.seconds, len(result.manifest["files"]),
                     len(removed))
            if on_done is not None:
                on_done(result)
        except Exception as exc:
            log.error("scheduled backup failed: %s", exc)


def summary(manifest: dict[str, Any]) -> str:
    c = manifest.get("counts", {})
    size = sum(e["size"] for e in manifest.get("files", [])) + \
        int(manifest.get("database", {}).get("size", 0) or 0)
    return (f"schema {manifest.get('schema_version')}, {c.get('cases', '?')} case(s), "
            f"{c.get('stored_files', '?')} file(s), {size / 1e6:.1f} MB")
