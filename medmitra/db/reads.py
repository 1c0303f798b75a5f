"""The hot read paths (GET case, list cases) as plain SQL.

Reading a case through the ORM cost ~4 ms of query building and model instantiation; the
same rows in plain SQL cost ~0.1 ms. On SQLite the reads run on a read-only connection of
their own, synchronously on the event loop: a short indexed SELECT is cheaper than a hop
to aiosqlite's thread, and in WAL mode readers never wait for writers. Each view is read
inside one read transaction, so it is a consistent snapshot. On PostgreSQL the same SQL
runs through tortoise's async connection, in one REPEATABLE READ transaction.
"""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import orjson

from tortoise.transactions import in_transaction

CASE_COLS = ('"id", "case_id", "user_id", "patient_name", "patient_age", "patient_gender", '
             '"case_summary", "status", "created_at", "updated_at"')
FILE_COLS = ('"id", "file_id", "user_id", "file_name", "file_type", "file_size", '
             '"file_category", "text_data", "ai_summary", "uploaded_at"')


def iso(value: Any) -> str | None:
    """ISO 8601 with offset from a stored timestamp (SQLite text or a datetime)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc).isoformat()
    return str(value).replace(" ", "T", 1)


def db_timestamp(dt: datetime, sqlite: bool) -> Any:
    """A bound parameter comparable with stored timestamps. SQLite stores tortoise's text
    form 'YYYY-MM-DD HH:MM:SS.ffffff+00:00'; always with microseconds so text order is
    time order."""
    dt = dt.astimezone(timezone.utc)
    return dt.isoformat(sep=" ", timespec="microseconds") if sqlite else dt


def from_json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, (str, bytes)) else value


def _dict_row(cursor: sqlite3.Cursor, row: tuple) -> dict[str, Any]:
    return dict(zip([d[0] for d in cursor.description], row))


class Reader:
    """Runs SELECTs and returns rows as dicts."""

    def __init__(self, sqlite_path: Path | None, busy_timeout_ms: int = 10000):
        self._conn: sqlite3.Connection | None = None
        self.is_sqlite = sqlite_path is not None
        if sqlite_path is not None:
            conn = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True,
                                   check_same_thread=False, isolation_level=None)
            conn.row_factory = _dict_row
            conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            conn.execute("PRAGMA query_only=1")
            self._conn = conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def many(self, queries: Sequence[tuple[str, Sequence[Any]]], *,
                   tuples: bool = False) -> list[list[Any]]:
        """Run several SELECTs as one consistent snapshot; rows as dicts (or tuples)."""
        if self._conn is not None:
            conn = self._conn
            conn.execute("BEGIN")
            try:
                out = []
                for sql, params in queries:
                    cur = conn.cursor()
                    if tuples:
                        cur.row_factory = None
                    out.append(cur.execute(sql, params).fetchall())
                return out
            finally:
                conn.execute("COMMIT")
        out = []
        # PostgreSQL's default READ COMMITTED takes a new snapshot per statement; REPEATABLE
        # READ holds the first one for the whole transaction.
        async with in_transaction() as tx:
            await tx.execute_script("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            for sql, params in queries:
                rows = await tx.execute_query_dict(_dollar(sql), list(params))
                out.append([tuple(r.values()) for r in rows] if tuples else rows)
        return out


_QMARK = re.compile(r"\?")


def _dollar(sql: str) -> str:
    counter = iter(range(1, 10_000))
    return _QMARK.sub(lambda _: f"${next(counter)}", sql)


async def case_view(reader: Reader, user_id: str, ident: dict[str, Any]) -> dict[str, Any] | None:
    """Case row, its files, newest insights and newest job (with its queue position)."""
    key, value = next(iter(ident.items()))
    column = {"id": '"id"', "case_id": '"case_id"'}[key]
    where = f"{column} = ? AND \"user_id\" = ?"
    case_sql = f'SELECT {CASE_COLS} FROM "cases" WHERE {where}'
    sub = f'(SELECT "id" FROM "cases" WHERE {where})'
    files_sql = f'SELECT {FILE_COLS} FROM "case_files" WHERE "case_id" = {sub} ORDER BY "id"'
    ins_sql = (f'SELECT "data", "model", "stages", "generated_at", "created_at", "updated_at" '
               f'FROM "ai_insights" WHERE "case_id" = {sub} ORDER BY "id" DESC LIMIT 1')
    job_sql = (f'SELECT "id", "state", "stage", "progress", "attempts", "error", "started_at", '
               f'"finished_at", (SELECT COUNT(*) FROM "jobs" AS q WHERE q."state" = \'queued\' '
               f'AND q."id" < "jobs"."id") AS "ahead" FROM "jobs" WHERE "case_id" = {sub} '
               f'ORDER BY "id" DESC LIMIT 1')
    p = (value, user_id)
    cases, files, insights, jobs = await reader.many(
        [(case_sql, p), (files_sql, p), (ins_sql, p), (job_sql, p)])
    if not cases:
        return None
    return {"case": cases[0], "files": files, "insight": insights[0] if insights else None,
            "job": jobs[0] if jobs else None}


def analysis_from_row(job: dict[str, Any] | None) -> dict[str, Any] | None:
    if job is None:
        return None
    state = job["state"]
    return {
        "state": state if state != "cancelled" else "failed",
        "stage": job["stage"],
        "progress": round(float(job["progress"] or 0.0), 4),
        "queue_position": int(job["ahead"]) + 1 if state == "queued" else None,
        "error": job["error"] if state in ("failed", "cancelled") else None,
        "started_at": iso(job["started_at"]),
        "finished_at": iso(job["finished_at"]),
        "attempts": job["attempts"],
    }


# The JSON of one case as SQLite renders it: the same object as services.cases.case_dict
# (a test holds the two equal). Rendering in SQL spares a Python dict per row.
CASE_JSON_SQLITE = (
    "json_object('id', \"id\", 'case_id', \"case_id\", 'doctor_id', \"user_id\", "
    "'user_id', \"user_id\", 'patient_name', \"patient_name\", 'patient_age', \"patient_age\", "
    "'patient_gender', \"patient_gender\", 'case_summary', \"case_summary\", "
    "'status', \"status\", 'created_at', replace(\"created_at\", ' ', 'T'), "
    "'updated_at', replace(\"updated_at\", ' ', 'T'))")


async def list_cases_json(reader: Reader, where: list[str], params: list[Any], order: str,
                          limit: int | None, offset: int,
                          render: Callable[[dict[str, Any]], dict[str, Any]]) -> tuple[str, int]:
    """A page of cases as a JSON array text, and the total count."""
    cond = " AND ".join(where)
    page = f" LIMIT {int(limit)} OFFSET {int(offset)}" if limit is not None else ""
    if reader.is_sqlite:
        count_sql = (f'SELECT COUNT(*) FROM "cases" WHERE {cond}', params)
        rows, count = await reader.many([
            (f'SELECT {CASE_JSON_SQLITE} FROM "cases" WHERE {cond} ORDER BY {order}{page}',
             params), count_sql], tuples=True)
        return "[" + ",".join(r[0] for r in rows) + "]", int(count[0][0])
    rows, count = await reader.many([
        (f'SELECT {CASE_COLS} FROM "cases" WHERE {cond} ORDER BY {order}{page}', params),
        (f'SELECT COUNT(*) AS "n" FROM "cases" WHERE {cond}', params)])
    return orjson.dumps([render(r) for r in rows]).decode(), int(count[0]["n"])
