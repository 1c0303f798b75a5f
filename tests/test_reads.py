"""The plain-SQL read path renders exactly what the ORM-based renderers do."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from conftest import make_settings
from medmitra.db import reads
from medmitra.db.models import Case
from medmitra.db.setup import close_db, open_db
from medmitra.services.cases import case_dict


def test_sqlite_case_json_equals_python_rendering(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)

    async def run() -> tuple[list, list]:
        await open_db(settings)
        user = str(uuid.uuid4())
        base = datetime(2026, 3, 4, 10, 30, 0, 123456, tzinfo=timezone.utc)
        names = ['Zoë "Quote" O\'Brien', "Asha\\backslash", "नमस्ते", "plain"]
        for i, name in enumerate(names):
            await Case.create(case_id=str(uuid.uuid4()), user_id=user, patient_name=name,
                              patient_age=i * 50, patient_gender="f",
                              case_summary=None if i % 2 else f"note {i}\nline two",
                              status="processing", created_at=base + timedelta(seconds=i),
                              updated_at=base + timedelta(seconds=i, microseconds=1))
        reader = reads.Reader(Path(settings.database_url.removeprefix("sqlite://")))
        try:
            text, total = await reads.list_cases_json(
                reader, reads.CaseQuery(user_id=user, descending=False), case_dict)
            rows = (await reader.many(
                [(f'SELECT {reads.CASE_COLS} FROM "cases" WHERE "user_id" = ? ORDER BY "id"',
                  [user])]))[0]
        finally:
            reader.close()
            await close_db()
        assert total == len(names)
        return json.loads(text), [case_dict(r) for r in rows]

    from_sql, from_python = asyncio.run(run())
    assert from_sql == from_python
    assert from_sql[0]["created_at"] == "2026-03-04T10:30:00.123456+00:00"
    assert [c["patient_name"] for c in from_sql][0] == 'Zoë "Quote" O\'Brien'
    assert from_sql[1]["case_summary"] is None and isinstance(from_sql[0]["patient_age"], int)


def test_reads_are_reused_only_while_the_database_is_unchanged(tmp_path: Path) -> None:
    """The reader hands out the rows of a repeated read again until another connection
    commits (a write through tortoise, or another process); hits are fresh copies."""
    import sqlite3

    settings = make_settings(tmp_path)
    db_path = Path(settings.database_url.removeprefix("sqlite://"))
    user = str(uuid.uuid4())
    select = [(f'SELECT {reads.CASE_COLS} FROM "cases" WHERE "user_id" = ? ORDER BY "id"',
               [user])]

    def case(name: str) -> dict:
        now = datetime.now(timezone.utc)
        return dict(case_id=str(uuid.uuid4()), user_id=user, patient_name=name,
                    patient_age=40, patient_gender="f", status="processing",
                    created_at=now, updated_at=now)

    async def run() -> None:
        await open_db(settings)
        reader = reads.Reader(db_path)
        try:
            await Case.create(**case("first"))
            (first,) = await reader.many(select)
            assert [r["patient_name"] for r in first] == ["first"]
            first[0]["patient_name"] = "changed by a caller"      # must not leak into a hit
            (again,) = await reader.many(select)
            assert [r["patient_name"] for r in again] == ["first"]
            assert len(reader._cache) == 1

            # A write through tortoise's connection: the next read sees it.
            await Case.create(**case("second"))
            (after,) = await reader.many(select)
            assert [r["patient_name"] for r in after] == ["first", "second"]
            # Tuples too, and a read with other parameters is its own entry.
            rows, count = await reader.many(
                [('SELECT "patient_name" FROM "cases" WHERE "user_id" = ?', [user]),
                 ('SELECT COUNT(*) FROM "cases"', [])], tuples=True)
            assert rows == [("first",), ("second",)] and count == [(2,)]
            (none,) = await reader.many([(select[0][0], [str(uuid.uuid4())])])
            assert none == []

            # A commit by another process's connection (here: a plain sqlite3 one). A
            # reading of data_version serves the rest of its loop iteration, so a commit
            # made synchronously on the loop thread is seen from the next one on.
            other = sqlite3.connect(db_path)
            try:
                other.execute('UPDATE "cases" SET "patient_name" = ? WHERE "patient_name" = ?',
                              ("renamed", "second"))
                other.commit()
            finally:
                other.close()
            await asyncio.sleep(0)
            (renamed,) = await reader.many(select)
            assert [r["patient_name"] for r in renamed] == ["first", "renamed"]

            # Bounded: the oldest entries go first.
            for i in range(reads.Reader.CACHE_ENTRIES + 10):
                await reader.many([('SELECT ? AS "n"', [i])])
            assert len(reader._cache) == reads.Reader.CACHE_ENTRIES
        finally:
            reader.close()
            await close_db()

    asyncio.run(run())


def test_data_version_is_read_once_per_loop_iteration_and_commits_are_seen(
        tmp_path: Path) -> None:
    """Reads within one loop iteration share one PRAGMA data_version; a commit on another
    thread, signalled to the loop the way aiosqlite signals it, is seen by the read that
    follows the signal, even though a reading was taken earlier in the same iteration."""
    import sqlite3
    import threading

    settings = make_settings(tmp_path)
    db_path = Path(settings.database_url.removeprefix("sqlite://"))
    user = str(uuid.uuid4())
    select = [('SELECT "patient_name" FROM "cases" WHERE "user_id" = ? ORDER BY "id"',
               [user])]

    async def run() -> None:
        await open_db(settings)
        reader = reads.Reader(db_path)
        pragmas: list[str] = []
        assert reader._conn is not None
        reader._conn.set_trace_callback(
            lambda sql: pragmas.append(sql) if "data_version" in sql else None)
        try:
            for _ in range(5):                  # no await that yields: one iteration
                await reader.many(select, tuples=True)
            assert len(pragmas) == 1
            await asyncio.sleep(0)
            await reader.many(select, tuples=True)
            assert len(pragmas) == 2            # a new iteration reads it again

            loop = asyncio.get_running_loop()
            committed = loop.create_future()

            def write() -> None:
                other = sqlite3.connect(db_path)
                try:
                    now = datetime.now(timezone.utc).isoformat(sep=" ")
                    other.execute(
                        'INSERT INTO "cases" ("case_id", "user_id", "patient_name", '
                        '"patient_age", "patient_gender", "status", "created_at", '
                        '"updated_at") VALUES (?, ?, ?, 40, \'f\', \'processing\', ?, ?)',
                        (str(uuid.uuid4()), user, "written", now, now))
                    other.commit()
                finally:
                    other.close()
                loop.call_soon_threadsafe(committed.set_result, None)

            assert await reader.many(select, tuples=True) == [[]]   # takes a reading
            thread = threading.Thread(target=write)
            thread.start()
            thread.join()           # committed while this iteration's reading is held
            await committed
            assert await reader.many(select, tuples=True) == [[("written",)]]
        finally:
            reader.close()
            await close_db()

    asyncio.run(run())


def test_read_cache_is_bounded_by_size_and_skips_big_reads(tmp_path: Path) -> None:
    """A read larger than CACHE_ITEM_MAX_BYTES is never kept, and the kept reads together
    stay under CACHE_MAX_BYTES. Reads off the loop and reads with ``keep_rows=False`` (their
    callers keep what they make of the rows) take no entry."""
    settings = make_settings(tmp_path)
    db_path = Path(settings.database_url.removeprefix("sqlite://"))

    async def run() -> None:
        await open_db(settings)
        reader = reads.Reader(db_path)
        reader.CACHE_ITEM_MAX_BYTES = 1000
        reader.CACHE_MAX_BYTES = 2500
        try:
            big = [('SELECT ? AS "t"', ["x" * 1500])]
            await reader.many(big)
            assert len(reader._cache) == 0 and reader._cache_bytes == 0
            for i in range(5):
                await reader.many([('SELECT ? AS "t", ? AS "i"', ["y" * 800, i])])
            # 5 reads of ~816 bytes: only the newest three fit under 2500 bytes.
            assert len(reader._cache) == 3
            assert 0 < reader._cache_bytes <= reader.CACHE_MAX_BYTES
            kept = dict(reader._cache)
            small = [('SELECT ? AS "t"', ["z" * 10])]
            assert await reader.many_off_loop(small, tuples=True) == [[("z" * 10,)]]
            assert await reader.many(small, tuples=True, keep_rows=False) == [[("z" * 10,)]]
            await reader.many_off_loop(big, tuples=True)
            assert reader._cache == kept
        finally:
            reader.close()
            await close_db()

    asyncio.run(run())


def test_audit_trail_writes_leave_cached_reads_in_place(tmp_path: Path, monkeypatch) -> None:
    """The audit trail writes its batches to its own file (ops/audit_store.py): they must not
    move the main file's data_version, or every batch would empty the read cache."""
    from medmitra.ops import audit

    settings = make_settings(tmp_path)
    db_path = Path(settings.database_url.removeprefix("sqlite://"))
    user = str(uuid.uuid4())
    select = [(f'SELECT {reads.CASE_COLS} FROM "cases" WHERE "user_id" = ?', [user])]
    snapshots = []
    real = reads._snapshot
    monkeypatch.setattr(reads, "_snapshot", lambda *a: snapshots.append(1) or real(*a))

    async def run() -> None:
        await open_db(settings)
        reader = reads.Reader(db_path)
        try:
            now = datetime.now(timezone.utc)
            await Case.create(case_id=str(uuid.uuid4()), user_id=user, patient_name="p",
                              patient_age=40, patient_gender="f", status="processing",
                              created_at=now, updated_at=now)
            await reader.many(select)
            assert len(snapshots) == 1
            for i in range(3):
                await audit.append_rows([{"ts": audit.utc_now_iso(), "action": "view",
                                          "status": 200, "user_id": user}], b"k" * 32)
                await reader.many(select)
            assert len(snapshots) == 1, "an audit batch emptied the read cache"
            assert len(await audit.fetch_rows()) == 3
            await Case.filter(user_id=user).update(patient_name="q")   # a real change
            (rows,) = await reader.many(select)
            assert len(snapshots) == 2 and rows[0]["patient_name"] == "q"
        finally:
            reader.close()
            await close_db()

    asyncio.run(run())


def test_kept_answers_take_one_cache_entry_each(tmp_path: Path) -> None:
    """GET case and the case lists keep their whole answer (``Reader.keep``); the rows they
    are made from are not kept beside it, so each answer counts once against the cache's
    bounds. The files route still shares the case's rows."""
    from medmitra.services import cases as svc

    settings = make_settings(tmp_path)
    db_path = Path(settings.database_url.removeprefix("sqlite://"))
    user = str(uuid.uuid4())

    async def run() -> None:
        await open_db(settings)
        now = datetime.now(timezone.utc)
        case = await Case.create(case_id=str(uuid.uuid4()), user_id=user, patient_name="A",
                                 patient_age=40, patient_gender="f", status="processing",
                                 created_at=now, updated_at=now)
        reader = reads.Reader(db_path)
        try:
            for _ in range(2):
                parts = await svc.case_parts(reader, user, case.case_id)
                assert parts.case_uuid == case.case_id
                await svc.list_cases_body(reader, user, {"limit": "10"})      # paged
                await svc.list_cases_body(reader, user, {})                   # unpaged
            assert len(reader._cache) == 3
            assert all(key[0] == "kept" for key in reader._cache)
            await svc.case_view(reader, user, case.case_id)        # GET /cases/files/<id>
            assert len(reader._cache) == 4
        finally:
            reader.close()
            await close_db()

    asyncio.run(run())
