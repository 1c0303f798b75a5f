"""Open/close the database and apply schema migrations.

Migrations are frozen SQL files ``NNNN_name.<dialect>.sql`` in ``db/migrations``; each is
applied once, in order, in its own transaction together with its ``schema_version`` row,
so a crash mid-upgrade leaves the previous version intact.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tortoise import Tortoise, connections

from medmitra import filemodes
from medmitra.config import Settings

log = logging.getLogger("medmitra.db")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_NAME_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.(sqlite|postgres)\.sql$")


def tortoise_config(settings: Settings) -> dict[str, Any]:
    url = settings.database_url
    if settings.is_sqlite:
        filemodes.private_dir(settings.data_path)
        # Created 0600 before SQLite opens it: its -wal/-shm files copy this mode.
        if url.removeprefix("sqlite://") != ":memory:":
            filemodes.create_private_file(Path(url.removeprefix("sqlite://")))
        conn: Any = {
            "engine": "tortoise.backends.sqlite",
            "credentials": {
                "file_path": url.removeprefix("sqlite://"),
                "journal_mode": "WAL",
                "busy_timeout": settings.database.busy_timeout_ms,
                # FULL: a committed record survives power loss too, not only a crash.
                "synchronous": "FULL",
                "foreign_keys": "ON",
            },
        }
    else:
        conn = url
    return {
        "connections": {"default": conn},
        "apps": {"models": {"models": ["medmitra.db.models", "medmitra.db.auth_models",
                                      "medmitra.db.flow_models", "medmitra.ops.audit_models"],
                            "default_connection": "default"}},
        "use_tz": True,
        "timezone": "UTC",
    }


def dialect(settings: Settings) -> str:
    return "sqlite" if settings.is_sqlite else "postgres"


def available_migrations(kind: str) -> list[tuple[int, str, Path]]:
    out = []
    for path in sorted(MIGRATIONS_DIR.iterdir()):
        m = _NAME_RE.match(path.name)
        if m and m.group(3) == kind:
            out.append((int(m.group(1)), m.group(2), path))
    return out


async def open_db(settings: Settings, *, migrate: bool = True) -> None:
    # The global fallback lets handlers and background tasks (other contexts than the
    # listener that initialised tortoise) use the connection; see tortoise/context.py.
    await Tortoise.init(config=tortoise_config(settings), _enable_global_fallback=True)
    await open_audit(settings)
    if migrate:
        await apply_migrations(settings)


async def open_audit(settings: Settings) -> None:
    """SQLite: open the audit trail's own file (ops/audit_store.py) beside the database."""
    if settings.is_sqlite:
        from medmitra.ops import audit_store

        await audit_store.connection()


async def close_db() -> None:
    from medmitra.ops import audit_store

    await audit_store.close()
    await Tortoise.close_connections()


# Key of the PostgreSQL advisory lock that serialises migrations of nodes starting together
# (an arbitrary constant; "medmitra" in ASCII).
PG_MIGRATION_LOCK_KEY = 0x6D65646D69747261
_VERSION_TABLE_SQL = (
    'CREATE TABLE IF NOT EXISTS "schema_version" ("version" INT NOT NULL PRIMARY KEY, '
    '"name" VARCHAR(128) NOT NULL, "applied_at" TIMESTAMP NOT NULL)')


async def _pg_lock(tx: Any) -> None:
    """Hold the migration lock until ``tx`` ends. Several nodes sharing one PostgreSQL
    database may start at once: without it two of them run the same CREATE TABLE."""
    await tx.execute_query(f"SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK_KEY})")


async def current_version() -> int:
    conn = connections.get("default")
    if conn.capabilities.dialect == "sqlite":
        await conn.execute_script(_VERSION_TABLE_SQL)
    else:
        # Even CREATE TABLE IF NOT EXISTS fails when another session creates it meanwhile.
        async with conn._in_transaction() as tx:
            await _pg_lock(tx)
            await tx.execute_script(_VERSION_TABLE_SQL)
    rows = await conn.execute_query_dict('SELECT MAX("version") AS v FROM "schema_version"')
    return int(rows[0]["v"] or 0)


async def apply_migrations(settings: Settings) -> list[int]:
    """Apply every migration the database has not recorded; return the versions applied."""
    from medmitra.ops import audit_store

    kind = dialect(settings)
    conn = connections.get("default")
    await current_version()     # creates the version table when missing
    # Every migration not yet recorded, not only those above the newest: numbers are
    # reserved per piece of work, so 0006 may ship before 0004 does.
    have = {int(r["version"]) for r in await conn.execute_query_dict(
        'SELECT "version" FROM "schema_version"')}
    applied = []
    for version, name, path in available_migrations(kind):
        if version in have:
            continue
        sql = path.read_text(encoding="utf-8")
        now = datetime.now(timezone.utc).isoformat()
        record = (f'INSERT INTO "schema_version" ("version", "name", "applied_at") '
                  f"VALUES ({version}, '{name}', '{now}');")
        if kind == "sqlite":
            if version == audit_store.MOVE_OUT_VERSION:
                # The audit rows go to their own file first; 0008 then drops the table.
                moved = await audit_store.move_rows_out(conn)
                if moved:
                    log.info("moved %d audit row(s) to %s", moved, audit_store.AUDIT_DB_NAME)
            try:
                await conn.execute_script(f"BEGIN IMMEDIATE;\n{sql}\n{record}\nCOMMIT;")
            except Exception:
                try:
                    await conn.execute_script("ROLLBACK;")
                except Exception:  # no transaction open: nothing to undo
                    pass
                raise
        else:
            async with conn._in_transaction() as tx:
                await _pg_lock(tx)
                done = await tx.execute_query_dict(
                    'SELECT 1 FROM "schema_version" WHERE "version" = $1', [version])
                if done:   # another node applied it while this one waited for the lock
                    continue
                await tx.execute_script(f"{sql}\n{record}")
        log.info("applied migration %04d_%s", version, name)
        applied.append(version)
    return applied


def latest_version(settings: Settings) -> int:
    return max(v for v, _, _ in available_migrations(dialect(settings)))
