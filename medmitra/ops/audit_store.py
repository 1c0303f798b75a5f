"""Where the audit trail's rows live.

PostgreSQL: the ``audit_log`` table of the database (migration 0005), through tortoise's
default connection.

SQLite: a database file of its own, ``audit.sqlite3`` beside the main one, with its own
connection (WAL, ``synchronous=FULL``, like the main file). The trail writes a batch every
``audit.flush_ms``; in the main file each batch moved ``PRAGMA data_version``, which keys
the read cache of db/reads.py, so every batch emptied the cache of case reads. In a file of
its own the trail's writes never touch the main file. The table is the one migration 0005
declares (its DDL is read from there: one definition); migration 0008 drops it from the
main file after ``move_rows_out`` has copied its rows here.

The audit connection belongs to the main connection it was opened for (the server's global
tortoise context, or an ops command's own context), so each context writes through its own.
"""

from __future__ import annotations

import re
import weakref
from pathlib import Path
from typing import Any

from medmitra import filemodes

AUDIT_DB_NAME = "audit.sqlite3"
TABLE = "audit_log"
# The migration that moves the table out of the main SQLite file (after move_rows_out).
MOVE_OUT_VERSION = 8
_DDL_PATH = Path(__file__).resolve().parent.parent / "db" / "migrations" / \
    "0005_audit.sqlite.sql"

_clients: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def audit_path(main_file: str | Path) -> Path | str:
    """The audit file of a main SQLite file (``:memory:`` stays in memory)."""
    if str(main_file) == ":memory:":
        return ":memory:"
    return Path(main_file).with_name(AUDIT_DB_NAME)


def schema_sql() -> str:
    """Migration 0005's table and indexes, made idempotent."""
    sql = _DDL_PATH.read_text(encoding="utf-8")
    return re.sub(r"\bCREATE (TABLE|INDEX) ", r"CREATE \1 IF NOT EXISTS ", sql)


def _base(conn: Any) -> Any:
    # Inside a transaction tortoise hands out a wrapper; its parent is the client.
    return getattr(conn, "_parent", None) or conn


async def connection() -> Any:
    """The client the trail's rows are read and written through. open_db and ops_db open
    it before anything runs concurrently; opened here on first use otherwise."""
    from tortoise import connections

    main = _base(connections.get("default"))
    if main.capabilities.dialect != "sqlite":
        return main
    client = _clients.get(main)
    if client is None:
        client = await _open(main)
    return client


async def _open(main: Any) -> Any:
    from tortoise.backends.sqlite import SqliteClient

    path = audit_path(main.filename)
    if isinstance(path, Path):
        filemodes.create_private_file(path)   # 0600 before SQLite opens it (and -wal/-shm)
    client = SqliteClient(file_path=str(path), connection_name="audit", journal_mode="WAL",
                          synchronous="FULL", foreign_keys="OFF",
                          busy_timeout=main.pragmas.get("busy_timeout", 10000))
    await client.create_connection(with_db=True)
    await client.execute_script(f"BEGIN IMMEDIATE;\n{schema_sql()}\nCOMMIT;")
    _clients[main] = client
    return client


async def close() -> None:
    """Close the audit connection of the current context's main connection, if open."""
    from tortoise import connections

    try:
        main = _base(connections.get("default"))
    except Exception:   # no database configured in this context: nothing was opened
        return
    client = _clients.pop(main, None)
    if client is not None:
        await client.close()


async def move_rows_out(main: Any) -> int:
    """Copy the rows of the main file's ``audit_log`` (if it still has one) into the audit
    file, committed there before migration 0008 drops the table. Idempotent: a crash
    between the two repeats the copy, and rows already copied (same id) are kept as they
    are. Returns the number of rows copied now."""
    tables = await main.execute_query_dict(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?", [TABLE])
    if not tables or str(main.filename) == ":memory:":
        return 0
    from medmitra.ops.audit import COLUMNS

    client = await connection()
    cols = ", ".join(f'"{c}"' for c in COLUMNS)
    before = (await client.execute_query_dict(f'SELECT COUNT(*) AS n FROM "{TABLE}"'))[0]["n"]
    src = str(Path(main.filename).resolve()).replace("'", "''")
    await client.execute_script(f"ATTACH DATABASE '{src}' AS old_main")
    try:
        await client.execute_script(
            f"BEGIN IMMEDIATE;\n"
            f'INSERT OR IGNORE INTO main."{TABLE}" ({cols}) '
            f'SELECT {cols} FROM old_main."{TABLE}" ORDER BY "id";\n'
            f"COMMIT;")
    except BaseException:
        try:
            await client.execute_script("ROLLBACK")
        except Exception:   # no transaction open
            pass
        raise
    finally:
        await client.execute_script("DETACH DATABASE old_main")
    after = (await client.execute_query_dict(f'SELECT COUNT(*) AS n FROM "{TABLE}"'))[0]["n"]
    return int(after) - int(before)
