"""The hot read paths (GET case, list cases) as plain SQL.

Reading a case through the ORM cost ~4 ms of query building and model instantiation; the
same rows in plain SQL cost ~0.1 ms. On SQLite the reads run on a read-only connection of
their own, synchronously on the event loop: a short indexed SELECT is cheaper than a hop
to aiosqlite's thread, and in WAL mode readers never wait for writers. Each view is read
inside one read transaction, so it is a consistent snapshot. On PostgreSQL the same SQL
runs through tortoise's async connection, in one REPEATABLE READ transaction.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import orjson

from tortoise.transactions import in_transaction

from medmitra import contract
from medmitra.contract import JobState


def _columns(names: Sequence[str]) -> str:
    return ", ".join(f'"{n}"' for n in names)


CASE_COLS = _columns(contract.CASE_COLUMNS)
FILE_COLS = _columns(contract.FILE_COLUMNS)


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


# Big reads (an unpaged case list can be tens of MiB) run on these threads, each with a
# read-only connection of its own, so the event loop keeps serving other requests.
BIG_READ_THREADS = 2
# An unpaged list of up to this many cases is joined into its response on the loop (a
# thread hop costs more than the join); a longer one on a big-read thread.
JOIN_ON_LOOP_ROWS = 1000


def _snapshot(conn: sqlite3.Connection, queries: Sequence[tuple[str, Sequence[Any]]],
              tuples: bool) -> list[list[Any]]:
    """Run ``queries`` in one read transaction (one consistent snapshot) on ``conn``."""
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


class Reader:
    """Runs SELECTs and returns rows as dicts.

    On SQLite the rows of recent reads are kept and handed out again while the database
    is unchanged: ``PRAGMA data_version`` moves whenever another connection commits
    (every write of the server goes through tortoise's connection, never this one), so
    clients polling a case or the case list cost at most one pragma per event-loop
    iteration instead of their queries until something is written. Hits get fresh copies
    of the rows. Values derived from reads (GET case's rendered JSON) are kept the same way
    (``kept``/``keep``). The cache is bounded by entries and by size, and a read larger than
    ``CACHE_ITEM_MAX_BYTES`` is never kept, so a few big unpaged lists cannot pin memory.
    """

    CACHE_ENTRIES = 256     # distinct reads kept (a read is its SQL texts and parameters)
    CACHE_MAX_BYTES = 64 * 1024 * 1024        # all kept reads together, roughly (text sizes)
    CACHE_ITEM_MAX_BYTES = 4 * 1024 * 1024    # a larger read is not kept

    def __init__(self, sqlite_path: Path | None, busy_timeout_ms: int = 10000):
        self._conn: sqlite3.Connection | None = None
        self._path = sqlite_path
        self._busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()          # big-read threads: a connection each
        self._thread_conns: list[sqlite3.Connection] = []
        self._pool: ThreadPoolExecutor | None = None
        self.is_sqlite = sqlite_path is not None
        self._cache: OrderedDict[Any, tuple[int, list[list[Any]], int]] = OrderedDict()
        self._cache_bytes = 0
        self._known_version: int | None = None   # this loop iteration's data_version
        if sqlite_path is not None:
            conn = self._connect()
            self._conn = conn
            self._version_cursor = conn.cursor()
            self._version_cursor.row_factory = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True,
                               check_same_thread=False, isolation_level=None)
        conn.row_factory = _dict_row
        conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
        conn.execute("PRAGMA query_only=1")
        return conn

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for conn in self._thread_conns:
            conn.close()
        self._thread_conns.clear()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            self._cache.clear()
            self._cache_bytes = 0
            self._known_version = None

    # -- the read cache (event-loop thread only) ----------------------------------------

    @staticmethod
    def _key(queries: Sequence[tuple[str, Sequence[Any]]], tuples: bool) -> Any:
        return (tuples, tuple((sql, tuple(params)) for sql, params in queries))

    def _version(self) -> int:
        """``PRAGMA data_version``, read at most once per event-loop iteration.

        The pragma takes SQLite's shared-memory locks: ~17 us of a cached GET case's ~210
        (A/B, same run). Under load one loop iteration serves many requests, and they share
        one reading. That is safe: a commit that ends after the reading is signalled to the
        loop (aiosqlite, executors: ``call_soon_threadsafe``) behind the callback that
        forgets the reading, so whoever learns of the commit, and every request that starts
        after it, reads again. The one thing it cannot see is a commit made synchronously on
        the loop thread itself during the same iteration; nothing in the server writes the
        main database that way (its writes go through tortoise's connection thread).
        """
        known = self._known_version
        if known is not None:
            return known
        # Read before the snapshot it keys: a commit in between makes the next read miss.
        version = self._version_cursor.execute("PRAGMA data_version").fetchone()[0]
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:    # not on a loop: nothing to share the reading with
            return version
        self._known_version = version
        loop.call_soon(self._forget_version)
        return version

    def _forget_version(self) -> None:
        self._known_version = None

    @staticmethod
    def _copy(out: list[list[Any]], tuples: bool) -> list[list[Any]]:
        return [list(rows) if tuples else [dict(r) for r in rows] for rows in out]

    def _cache_get(self, key: Any, version: int, tuples: bool) -> list[list[Any]] | None:
        hit = self._cache.get(key)
        if hit is None or hit[0] != version:
            return None
        self._cache.move_to_end(key)
        return self._copy(hit[1], tuples)

    @staticmethod
    def rows_size(out: Sequence[Sequence[Any]]) -> int:
        """Roughly how many bytes groups of rows (dicts or tuples) hold: what the cache's
        bounds count."""
        size = 0
        for rows in out:
            for row in rows:
                values = row.values() if isinstance(row, dict) else row
                size += sum(len(v) if isinstance(v, (str, bytes)) else 16 for v in values)
        return size

    def _cache_put(self, key: Any, version: int, out: list[list[Any]], tuples: bool) -> None:
        size = self.rows_size(out)
        self._store(key, version, self._copy(out, tuples) if size <= self.CACHE_ITEM_MAX_BYTES
                    else None, size)

    def _store(self, key: Any, version: int, value: Any, size: int) -> None:
        old = self._cache.pop(key, None)
        if old is not None:
            self._cache_bytes -= old[2]
        if size > self.CACHE_ITEM_MAX_BYTES:
            return
        self._cache[key] = (version, value, size)
        self._cache_bytes += size
        while self._cache and (len(self._cache) > self.CACHE_ENTRIES
                               or self._cache_bytes > self.CACHE_MAX_BYTES):
            _, evicted = self._cache.popitem(last=False)
            self._cache_bytes -= evicted[2]

    # -- values derived from reads (event-loop thread only) ------------------------------

    def version(self) -> int | None:
        """The database's ``data_version`` as this loop iteration read it; None on
        PostgreSQL, where nothing is kept. Read it *before* the reads a kept value is made
        from, and keep the value under it."""
        return self._version() if self._conn is not None else None

    def kept(self, key: Any, version: int | None) -> Any | None:
        """The value ``keep`` stored under ``key`` if the database is still at ``version``.
        Kept values are handed out as they are: keep only values nobody mutates."""
        if version is None:
            return None
        hit = self._cache.get(("kept", key))
        if hit is None or hit[0] != version:
            return None
        self._cache.move_to_end(("kept", key))
        return hit[1]

    def keep(self, key: Any, version: int | None, value: Any, size: int) -> None:
        """Keep ``value`` (about ``size`` bytes) for ``key`` while the database stays at
        ``version``; it shares the read cache's bounds."""
        if version is not None:
            self._store(("kept", key), version, value, size)

    def _thread_conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            self._thread_conns.append(conn)
        return conn

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on a big-read thread (it may call ``many_sync`` there)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(BIG_READ_THREADS, thread_name_prefix="big-read")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def many_off_loop(self, queries: Sequence[tuple[str, Sequence[Any]]], *,
                            tuples: bool = False) -> list[list[Any]]:
        """SQLite only: ``many`` for reads of any size, on a big-read thread. The rows are
        not kept: the caller (the unpaged case list) keeps the answer made from them."""
        return await self.off_loop(lambda: self.many_sync(queries, tuples=tuples))

    def many_sync(self, queries: Sequence[tuple[str, Sequence[Any]]], *,
                  tuples: bool = False) -> list[list[Any]]:
        """SQLite only: one consistent snapshot on this thread's own connection (for
        ``off_loop``). Not cached here (``many_off_loop`` keeps small results)."""
        return _snapshot(self._thread_conn(), queries, tuples)

    async def many(self, queries: Sequence[tuple[str, Sequence[Any]]], *,
                   tuples: bool = False, keep_rows: bool = True) -> list[list[Any]]:
        """Run several SELECTs as one consistent snapshot; rows as dicts (or tuples).
        ``keep_rows=False`` for a caller that keeps what it makes of the rows (``keep``):
        the rows would take a second cache entry that is never read."""
        if self._conn is not None:
            conn = self._conn
            if not keep_rows:
                return _snapshot(conn, queries, tuples)
            key = self._key(queries, tuples)
            version = self._version()
            hit = self._cache_get(key, version, tuples)
            if hit is not None:
                return hit
            out = _snapshot(conn, queries, tuples)
            self._cache_put(key, version, out, tuples)
            return out
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


# The newest job row of case_view's query, as its fair-queue position subquery names it.
_OUTER_JOB_ID = '"jobs"."id"'


def _case_view_sql(column: str) -> tuple[str, str, str, str]:
    where = f"{column} = ? AND \"user_id\" = ?"
    case_sql = f'SELECT {CASE_COLS} FROM "cases" WHERE {where}'
    sub = f'(SELECT "id" FROM "cases" WHERE {where})'
    files_sql = f'SELECT {FILE_COLS} FROM "case_files" WHERE "case_id" = {sub} ORDER BY "id"'
    ins_sql = (f'SELECT "data", "model", "stages", "generated_at", "created_at", "updated_at" '
               f'FROM "ai_insights" WHERE "case_id" = {sub} ORDER BY "id" DESC LIMIT 1')
    from medmitra.jobs.queue import AHEAD_SQL   # the fair queue order (one definition)

    job_sql = (f'SELECT "id", "state", "stage", "progress", "attempts", "error", "started_at", '
               f'"finished_at", CASE WHEN "state" = \'{JobState.QUEUED}\' THEN '
               f'{AHEAD_SQL.format(job=_OUTER_JOB_ID)} ELSE 0 END AS "ahead" '
               f'FROM "jobs" WHERE "case_id" = {sub} '
               f'ORDER BY "id" DESC LIMIT 1')
    return case_sql, files_sql, ins_sql, job_sql


# The four statements of case_view per identifying column, built once: formatting them cost
# ~15-60 us per GET case (more than the cached read itself), and the same string objects
# keep their hash for the read cache's key.
_CASE_VIEW_SQL: dict[str, tuple[str, str, str, str]] = {}


async def case_view(reader: Reader, user_id: str, ident: dict[str, Any], *,
                    keep_rows: bool = True) -> dict[str, Any] | None:
    """Case row, its files, newest insights and newest job (with its queue position).
    ``keep_rows`` as ``Reader.many``."""
    key, value = next(iter(ident.items()))
    column = {"id": '"id"', "case_id": '"case_id"'}[key]
    sql = _CASE_VIEW_SQL.get(column)
    if sql is None:
        sql = _CASE_VIEW_SQL[column] = _case_view_sql(column)
    case_sql, files_sql, ins_sql, job_sql = sql
    p = (value, user_id)
    cases, files, insights, jobs = await reader.many(
        [(case_sql, p), (files_sql, p), (ins_sql, p), (job_sql, p)], keep_rows=keep_rows)
    if not cases:
        return None
    return {"case": cases[0], "files": files, "insight": insights[0] if insights else None,
            "job": jobs[0] if jobs else None}


def analysis_from_row(job: dict[str, Any] | None) -> dict[str, Any] | None:
    if job is None:
        return None
    state = JobState(job["state"])
    return {
        "state": contract.analysis_state(state),
        "stage": job["stage"],
        "progress": round(float(job["progress"] or 0.0), 4),
        "queue_position": int(job["ahead"]) + 1 if state is JobState.QUEUED else None,
        "error": job["error"] if state in (JobState.FAILED, JobState.CANCELLED) else None,
        "started_at": iso(job["started_at"]),
        "finished_at": iso(job["finished_at"]),
        "attempts": job["attempts"],
    }


def _case_json_sqlite() -> str:
    """The JSON of one case as SQLite renders it: the same object as
    services.cases.case_dict, both derived from ``contract.CASE_FIELDS`` (a test holds the
    two equal). Rendering in SQL spares a Python dict per row."""
    parts = []
    for name in contract.CASE_FIELDS:
        column = f'"{contract.CASE_FIELD_SOURCES.get(name, name)}"'
        if name in contract.CASE_TIMESTAMPS:
            column = f"replace({column}, ' ', 'T')"
        parts.append(f"'{name}', {column}")
    return f"json_object({', '.join(parts)})"


CASE_JSON_SQLITE = _case_json_sqlite()


@dataclass(frozen=True)
class CaseQuery:
    """One page of a user's cases: validated filters (services/cases.py) and the order."""
    user_id: str
    status: str | None = None
    search: str | None = None          # matched literally in patient name or summary
    created_from: datetime | None = None
    created_to: datetime | None = None
    min_age: int | None = None
    max_age: int | None = None
    gender: str | None = None          # exact match, case-insensitive
    sort_key: str = contract.DEFAULT_SORT_KEY
    descending: bool = True
    limit: int | None = None
    offset: int = 0


def _case_where(q: CaseQuery, sqlite: bool) -> tuple[str, list[Any]]:
    where, params = ['"user_id" = ?'], [q.user_id]
    like = "LIKE" if sqlite else "ILIKE"   # SQLite's LIKE ignores ASCII case
    if q.status is not None:
        where.append('"status" = ?')
        params.append(q.status)
    if q.search is not None:
        # Wildcards typed by the user are taken literally.
        pattern = "%" + re.sub(r"([\\%_])", r"\\\1", q.search) + "%"
        where.append(f'("patient_name" {like} ? ESCAPE \'\\\' OR '
                     f'"case_summary" {like} ? ESCAPE \'\\\')')
        params += [pattern, pattern]
    for value, op in ((q.created_from, ">="), (q.created_to, "<=")):
        if value is not None:
            where.append(f'"created_at" {op} ?')
            params.append(db_timestamp(value, sqlite))
    for age, op in ((q.min_age, ">="), (q.max_age, "<=")):
        if age is not None:
            where.append(f'"patient_age" {op} ?')
            params.append(age)
    if q.gender is not None:
        where.append('LOWER("patient_gender") = LOWER(?)')
        params.append(q.gender)
    return " AND ".join(where), params


def _case_order(q: CaseQuery) -> str:
    if q.sort_key not in contract.SORT_KEYS:   # validated before; never a raw column name
        raise ValueError(f"unknown sort key {q.sort_key!r}")
    # Names sort as people read them ("asha" next to "Asha"), not in byte order.
    column = 'LOWER("patient_name")' if q.sort_key == "patient_name" else f'"{q.sort_key}"'
    direction = "DESC" if q.descending else "ASC"
    return f'{column} {direction}, "id" {direction}'


async def list_cases_json(reader: Reader, q: CaseQuery,
                          render: Callable[[dict[str, Any]], dict[str, Any]]) -> tuple[str, int]:
    """A page of cases as a JSON array text, and the total count. The rows are not kept:
    the caller keeps the answer (``services.cases.list_cases_body``)."""
    cond, params = _case_where(q, reader.is_sqlite)
    order = _case_order(q)
    page = f" LIMIT {int(q.limit)} OFFSET {int(q.offset)}" if q.limit is not None else ""
    if reader.is_sqlite:
        queries = [
            (f'SELECT {CASE_JSON_SQLITE} FROM "cases" WHERE {cond} ORDER BY {order}{page}',
             params), (f'SELECT COUNT(*) FROM "cases" WHERE {cond}', params)]

        def joined(rows: list[Any], count: list[Any]) -> tuple[str, int]:
            return "[" + ",".join(r[0] for r in rows) + "]", int(count[0][0])

        if q.limit is None:
            # Unpaged (the original frontend's list): any size, so read off the event loop
            # (other requests go on meanwhile) and joined there.
            rows, count = await reader.many_off_loop(queries, tuples=True)
            if len(rows) <= JOIN_ON_LOOP_ROWS:
                return joined(rows, count)
            return await reader.off_loop(joined, rows, count)
        return joined(*await reader.many(queries, tuples=True, keep_rows=False))
    rows, count = await reader.many([
        (f'SELECT {CASE_COLS} FROM "cases" WHERE {cond} ORDER BY {order}{page}', params),
        (f'SELECT COUNT(*) AS "n" FROM "cases" WHERE {cond}', params)])
    if q.limit is None:
        text = await asyncio.get_running_loop().run_in_executor(
            None, lambda: orjson.dumps([render(r) for r in rows]).decode())
        return text, int(count[0]["n"])
    return orjson.dumps([render(r) for r in rows]).decode(), int(count[0]["n"])
