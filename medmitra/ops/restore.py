"""Restore a backup (ops/backup.py) into a data dir.

Order: verify the whole backup (every checksum, integrity_check, rows against files);
refuse a backup of a newer schema than this program knows; refuse a non-empty data dir
unless forced (forced: the old contents are moved aside into ``.pre-restore-<UTC>/``,
never deleted); copy everything into a staging folder inside the data dir, re-checking each
checksum as it is copied; move the pieces into place; then run the migrations forward when
the backup is older. A crash before the final moves leaves only the staging folder, which
the next restore removes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medmitra.config import Settings
from medmitra.ops.backup import (
    AUDIT_DB_NAME, DB_NAME, FILES_DIR, SECRETS_DIR, BackupError, copy_hashed, fsync_dir,
    listed_entries, utc_stamp, verify_backup, _progress,
)

STAGING = ".restore-partial"
ASIDE_PREFIX = ".pre-restore-"


@dataclass
class RestoreResult:
    data_dir: Path
    manifest: dict[str, Any]
    migrated_to: int
    applied: list[int]
    moved_aside: Path | None


def _is_empty(d: Path) -> bool:
    return not d.exists() or not any(p for p in d.iterdir() if p.name != STAGING)


def restore_backup(backup: Path, settings: Settings, *, force: bool = False,
                   progress: bool = False) -> RestoreResult:
    from medmitra.db.setup import latest_version

    backup = Path(backup).expanduser().resolve()
    data = settings.data_path
    manifest, problems = verify_backup(backup, progress=progress)
    if problems:
        shown = "; ".join(problems[:10]) + (f" (+{len(problems) - 10} more)"
                                            if len(problems) > 10 else "")
        raise BackupError(f"the backup fails verification, nothing was restored: {shown}")
    kind = manifest["database"]["kind"]
    if kind == "sqlite" and not settings.is_sqlite:
        raise BackupError("this backup holds a SQLite database but the configured database "
                          "is PostgreSQL (database.url); restore into a SQLite data dir")
    newest = latest_version(settings)
    if int(manifest.get("schema_version", 0)) > newest:
        raise BackupError(f"the backup is from a newer schema (version "
                          f"{manifest['schema_version']}) than this medmitra knows "
                          f"(version {newest}); restore it with a newer medmitra")
    if settings.is_sqlite and Path(settings.database_url.removeprefix("sqlite://")).parent \
            != data:
        raise BackupError("database.url points outside the data dir; restore needs the "
                          "default SQLite location")
    moved_aside = None
    if not _is_empty(data):
        if not force:
            raise BackupError(f"{data} is not empty; restore into an empty data dir, or pass "
                              "--force to move its current contents aside first")
        moved_aside = data / f"{ASIDE_PREFIX}{utc_stamp()}"
        moved_aside.mkdir()
        for p in list(data.iterdir()):
            if p.name not in (moved_aside.name, STAGING) and not p.name.startswith(ASIDE_PREFIX):
                os.replace(p, moved_aside / p.name)
    data.mkdir(parents=True, exist_ok=True)
    staging = data / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    entries = listed_entries(manifest)
    bar = _progress(len(entries), "restore", progress)
    try:
        for e in entries:
            secret = e.path.startswith(f"{SECRETS_DIR}/")
            target = e.path.removeprefix(f"{SECRETS_DIR}/") if secret else e.path
            got = copy_hashed(backup / e.path, staging / target,
                              mode=0o600 if secret else None)
            if got.sha256 != e.sha256 or got.size != e.size:
                raise BackupError(f"{e.path} changed while being restored; nothing was "
                                  "restored")
            bar.update()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        bar.close()
    if (staging / "auth_keys").is_dir():
        os.chmod(staging / "auth_keys", 0o700)
    # Into place: files and keys first, the database last (a database is what makes a data
    # dir look initialised).
    for p in sorted(staging.iterdir(), key=lambda p: p.name == DB_NAME):
        os.replace(p, data / p.name)
    (data / FILES_DIR).mkdir(exist_ok=True)
    staging.rmdir()
    fsync_dir(data)
    applied: list[int] = []
    version = int(manifest.get("schema_version", 0))
    if kind == "sqlite":
        # PostgreSQL: the database comes back with pg_restore; `medmitra migrate` after it.
        # A backup of format 1 had the audit trail in the database: 0008 moves it out.
        applied, version = asyncio.run(_migrate(settings))
        for name in (DB_NAME, AUDIT_DB_NAME):
            if not (data / name).is_file():
                continue
            conn = sqlite3.connect(str(data / name))
            try:
                check = conn.execute("PRAGMA integrity_check").fetchall()
            finally:
                conn.close()
            if check != [("ok",)]:
                raise BackupError(f"restored {name} fails integrity_check: {check[:3]}")
    return RestoreResult(data, manifest, version, applied, moved_aside)


async def _migrate(settings: Settings) -> tuple[list[int], int]:
    from medmitra.db.setup import apply_migrations, current_version
    from medmitra.ops.db import ops_db

    async with ops_db(settings, migrate=False):
        applied = await apply_migrations(settings)
        return applied, await current_version()
