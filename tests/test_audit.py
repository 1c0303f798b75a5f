"""The audit trail (issue 12 part 2): real server on loopback, real SQLite file.

Every access to patient data leaves a row with ids only; the chain names an edited,
deleted or inserted row; list filters and formats; retention keeps the chain verifiable;
in "ack" mode a SIGKILL right after the last response loses no row of an answered request.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import docfactory as df
from conftest import (ROOT, TEST_SECRET, Served, free_port, make_settings, make_user,
                      wait_healthy)
from medmitra.cli import main
from medmitra.ops import audit
from medmitra.ops.audit_store import AUDIT_DB_NAME
from tests.pg import pg_server, pg_url  # noqa: F401  (fixtures)

PATIENT = "Zebulon Quixote-Audit"
SUMMARY = "Persistent cough and night sweats, weight loss of 4 kg"


@pytest.fixture
def server(start_app, tmp_path: Path) -> Served:
    """ack mode: every answered request's row is committed before the answer."""
    return start_app(make_settings(tmp_path, audit={"durability": "ack"}))


def _rows(data: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(data / AUDIT_DB_NAME)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM audit_log ORDER BY id")]
    finally:
        conn.close()


def _exercise(server: Served) -> dict[str, Any]:
    """One of each action by alice, one refused token, one probe by bob."""
    alice, bob = make_user(), make_user()
    with server.client(alice.token) as c:
        r = c.post("/cases/create_case", data={"patient_name": PATIENT, "patient_age": "47",
                                               "patient_gender": "male",
                                               "case_summary": SUMMARY},
                   files=[("lab_files", ("cbc.csv", df.lab_csv(), "text/csv"))])
        assert r.status_code == 201
        case = r.json()["case"]["case_id"]
        first_file = r.json()["uploaded_files"][0]
        assert c.get("/cases/all_cases").status_code == 200
        assert c.get(f"/cases/cases/{case}").status_code == 200
        assert c.put(f"/cases/cases/{case}", json={"case_summary": "edited"}).status_code == 200
        up = c.post("/cases/upload", data={"case_id": case, "category": "radiology"},
                    files=[("file", ("x.png", df.xray_png(), "image/png"))])
        assert up.status_code == 201
        new_file = up.json()["file"]["file_id"]
        assert server.client().get(first_file["file_url"]).status_code == 200
        assert c.delete(f"/cases/file/{new_file}").status_code == 200
        assert c.post(f"/cases/analyze/{case}").status_code == 200
    with server.client("not.a.token") as c:
        assert c.get(f"/cases/cases/{case}").status_code == 401
    with server.client(bob.token) as c:
        assert c.get(f"/cases/cases/{case}").status_code == 404
    with server.client(alice.token) as c:
        assert c.delete(f"/cases/cases/{case}").status_code == 200
        assert c.get("/health").status_code in (200, 503)
    return {"alice": alice, "bob": bob, "case": case, "file": first_file["file_id"],
            "new_file": new_file}


def test_every_access_is_recorded_with_ids_only(server: Served) -> None:
    ids = _exercise(server)
    rows = _rows(server.settings.data_path)
    got = [(r["action"], r["status"], r["user_id"], r["case_ref"]) for r in rows]
    a, b, case = ids["alice"].id, ids["bob"].id, ids["case"]
    assert got == [
        ("create", 201, a, case),
        ("list", 200, a, None),
        ("view", 200, a, case),
        ("update", 200, a, case),
        ("create", 201, a, case),          # upload into the case
        ("download", 200, a, None),
        ("delete", 200, a, None),           # the uploaded file
        ("analyse", 200, a, case),
        ("view", 401, None, case),          # refused token
        ("view", 404, b, case),             # another user's case
        ("delete", 200, a, case),           # the trail outlives the case
    ], got
    by_action = {(r["action"], r["status"]): r for r in rows}
    assert by_action[("download", 200)]["file_ref"] == ids["file"]
    assert by_action[("download", 200)]["auth_kind"] == "signed-link"
    assert by_action[("delete", 200)]["file_ref"] in (ids["new_file"], None)
    assert rows[0]["file_ref"] and rows[0]["route"] == "/cases/create_case"
    assert rows[2]["route"] == "/cases/cases/<case_id:str>" and rows[2]["auth_kind"] == "token"
    assert rows[8]["detail"] == "credentials refused"
    assert all(r["client"] == "127.0.0.1" and len(r["request_id"]) >= 16 for r in rows)
    # No clinical text or names anywhere in the trail.
    dump = json.dumps(rows)
    for secret in (PATIENT, "Zebulon", SUMMARY, "night sweats", "edited", "Hemoglobin"):
        assert secret not in dump


def test_sign_ins_are_recorded_without_the_email(server: Served) -> None:
    email = "auditor.probe@clinic.test"
    r = server.client().post("/auth/v1/token?grant_type=password",
                             json={"email": email, "password": "wrong password 123"})
    assert r.status_code == 400
    (row,) = _rows(server.settings.data_path)
    assert (row["action"], row["status"], row["user_id"]) == ("sign-in", 400, None)
    assert email not in json.dumps(row) and "auditor" not in json.dumps(row)


def test_verify_names_edited_deleted_and_inserted_rows(server: Served,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    _exercise(server)
    data = server.settings.data_path
    args = ["audit", "verify", "--data-dir", str(data)]
    assert main(args) == 0
    assert "audit trail ok: 11 rows (ids 1-11)" in capsys.readouterr().out
    db = sqlite3.connect(data / AUDIT_DB_NAME)

    def check(expect: str) -> None:
        assert main(args) == 1
        out = capsys.readouterr().out
        assert expect in out, out

    with db:
        db.execute("UPDATE audit_log SET status = 200 WHERE id = 9")
    check("row 9: edited")
    with db:
        db.execute("UPDATE audit_log SET status = 401 WHERE id = 9")
    assert main(args) == 0
    capsys.readouterr()

    saved = db.execute("SELECT * FROM audit_log WHERE id = 5").fetchone()
    with db:
        db.execute("DELETE FROM audit_log WHERE id = 5")
    check("row 5 is missing (deleted)")
    with db:
        db.execute(f"INSERT INTO audit_log VALUES ({','.join('?' * len(saved))})", saved)
    assert main(args) == 0
    capsys.readouterr()

    last = db.execute("SELECT * FROM audit_log WHERE id = 11").fetchone()
    forged = list(last)
    forged[0] = 12
    forged[-2] = last[-1]                       # links to row 11 ...
    forged[-1] = "f" * 64                       # ... but cannot make a valid HMAC
    with db:
        db.execute(f"INSERT INTO audit_log VALUES ({','.join('?' * len(forged))})", forged)
    check("row 12: inserted")
    with db:
        db.execute("DELETE FROM audit_log WHERE id >= 10")
    check("rows 10-11 are missing from the end")
    db.close()


def test_list_filters_and_formats(server: Served,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    ids = _exercise(server)
    data = ["--data-dir", str(server.settings.data_path)]
    assert main(["audit", "list", "--user", ids["bob"].id, "--format", "jsonl"] + data) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x)["status"] for x in lines] == [404]
    assert main(["audit", "list", "--case", ids["case"], "--format", "csv"] + data) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["action"] for r in table] == ["create", "view", "update", "create", "analyse",
                                             "view", "view", "delete"]
    assert main(["audit", "list", "--since", "1h", "--action", "download"] + data) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert main(["audit", "list", "--since", "2999-01-01"] + data) == 0
    assert capsys.readouterr().out == ""
    assert main(["audit", "list", "--since", "yesterday"] + data) == 2


def test_retention_removes_old_rows_and_keeps_the_chain_verifiable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medmitra.db.setup import close_db, open_db

    settings = make_settings(tmp_path)
    data = settings.data_path
    key = audit.load_or_create_key(data)

    async def fill() -> None:
        await open_db(settings)
        try:
            old = "2020-01-01T00:00:00.000000+00:00"
            await audit.append_rows([{"ts": old, "action": "view", "status": 200}
                                     for _ in range(5)], key, data / audit.HEAD_FILE)
            await audit.append_rows([{"ts": audit.utc_now_iso(), "action": "list",
                                      "status": 200}], key, data / audit.HEAD_FILE)
        finally:
            await close_db()

    asyncio.run(fill())
    assert main(["audit", "prune", "--data-dir", str(data)]) == 0
    assert "nothing pruned" in capsys.readouterr().out      # retention 0 = keep forever
    assert main(["audit", "prune", "--days", "30", "--data-dir", str(data)]) == 0
    assert "pruned 5 audit row(s)" in capsys.readouterr().out
    rows = _rows(data)
    assert [r["id"] for r in rows] == [6, 7] and rows[1]["action"] == "retention"
    assert main(["audit", "verify", "--data-dir", str(data)]) == 0
    # Deleting the first remaining row is not covered by the retention record.
    db = sqlite3.connect(data / AUDIT_DB_NAME)
    with db:
        db.execute("DELETE FROM audit_log WHERE id = 6")
    db.close()
    capsys.readouterr()
    assert main(["audit", "verify", "--data-dir", str(data)]) == 1
    assert "rows 1-6 are missing" in capsys.readouterr().out


def _legacy_rows(db: Path, key: bytes, n: int) -> None:
    """Chain ``n`` rows into the main file's audit_log, as a server before 0008 did."""
    conn = sqlite3.connect(db)
    prev = audit.GENESIS
    with conn:
        for i in range(1, n + 1):
            row = {"id": i, "ts": audit.utc_now_iso(), "action": "view", "status": 200,
                   "user_id": f"u{i}", "case_ref": str(i)}
            h = audit.row_hash(key, prev, row)
            conn.execute(audit.INSERT_HEAD + audit._placeholders("sqlite", len(audit.COLUMNS), 1),
                         [row.get(c) for c in audit.FIELDS] + [prev, h])
            prev = h
    conn.close()


@pytest.mark.parametrize("crash_after_copy", [False, True])
def test_upgrade_moves_the_trail_into_its_own_file(tmp_path: Path, crash_after_copy: bool,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Migration 0008 (SQLite): the rows of an older install move to audit.sqlite3 and their
    chain still verifies; a crash after the copy and before the table is dropped repeats
    the copy without duplicating or losing a row."""
    from conftest import database_at_version
    from medmitra.db import setup as dbsetup
    from medmitra.ops import audit_store

    settings = make_settings(tmp_path)
    data = settings.data_path
    database_at_version(settings, audit_store.MOVE_OUT_VERSION - 1)
    (data / AUDIT_DB_NAME).unlink()     # the older install had no audit file
    key = audit.load_or_create_key(data)
    main_db = data / "medmitra.sqlite3"
    _legacy_rows(main_db, key, 7)

    async def copy_only() -> int:       # what a crash right after the copy leaves
        await dbsetup.open_db(settings, migrate=False)
        try:
            return await audit_store.move_rows_out(dbsetup.connections.get("default"))
        finally:
            await dbsetup.close_db()

    if crash_after_copy:
        assert asyncio.run(copy_only()) == 7
        assert len(_rows(data)) == 7
    assert main(["audit", "verify", "--data-dir", str(data)]) == 0   # migrates, then checks
    assert "audit trail ok: 7 rows" in capsys.readouterr().out
    rows = _rows(data)
    assert [r["id"] for r in rows] == list(range(1, 8))
    assert [r["user_id"] for r in rows] == [f"u{i}" for i in range(1, 8)]
    conn = sqlite3.connect(main_db)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        version = conn.execute('SELECT MAX("version") FROM "schema_version"').fetchone()[0]
    finally:
        conn.close()
    assert "audit_log" not in tables and version >= audit_store.MOVE_OUT_VERSION
    # New rows chain on from the moved ones.
    assert main(["users", "add", "--email", "mover@example.org", "--password",
                 "a long enough password 42", "--data-dir", str(data)]) == 0
    assert main(["audit", "verify", "--data-dir", str(data)]) == 0
    assert "audit trail ok: 8 rows" in capsys.readouterr().out


def test_batch_mode_commits_within_flush_interval(start_app, tmp_path: Path) -> None:
    server = start_app(make_settings(tmp_path, audit={"durability": "batch",
                                                      "flush_ms": 100}))
    user = make_user()
    with server.client(user.token) as c:
        for _ in range(20):
            assert c.get("/cases/all_cases").status_code == 200
    deadline = time.monotonic() + 5
    while len(_rows(server.settings.data_path)) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_rows(server.settings.data_path)) == 20
    assert server.app.ctx.audit.written == 20


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["in_process", "socket"])
def test_a_graceful_stop_writes_every_queued_row_promptly(how: str, tmp_path: Path) -> None:
    """batch mode with a long interval: rows still queued at stop are written before the
    database closes, and the stop does not hang waiting for a closed database (it took
    10 s and lost the rows while the database closed first)."""
    from conftest import serve_in_process, serve_on_socket

    serve = serve_in_process if how == "in_process" else serve_on_socket
    settings = make_settings(tmp_path, audit={"durability": "batch", "flush_ms": 60000})
    user = make_user()
    with serve(settings, tmp_path=tmp_path) as server:
        with server.client(user.token) as c:
            for _ in range(3):
                assert c.get("/cases/all_cases").status_code == 200
        time.sleep(0.3)
        assert _rows(settings.data_path) == []     # nothing flushed yet: all queued
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5
    assert [r["action"] for r in _rows(settings.data_path)] == ["list"] * 3


def test_disabled_trail_writes_nothing(start_app, tmp_path: Path) -> None:
    server = start_app(make_settings(tmp_path, audit={"enabled": False}))
    with server.client(make_user().token) as c:
        assert c.get("/cases/all_cases").status_code == 200
    assert _rows(server.settings.data_path) == []


@pytest.mark.e2e
def test_sigkill_after_responses_loses_no_acknowledged_row(tmp_path: Path) -> None:
    """ack mode: kill -9 the server right after its last answer; every answered request has
    its committed row."""
    port = free_port()
    data = tmp_path / "data"
    env = {**os.environ, "MEDMITRA_STORAGE_DATA_DIR": str(data),
           "MEDMITRA_SERVER_PORT": str(port), "MEDMITRA_LLM_WORKERS": "0",
           "MEDMITRA_AUTH_JWT_SECRET": TEST_SECRET, "MEDMITRA_LOG_LEVEL": "WARNING",
           "MEDMITRA_STORAGE_MIN_FREE_BYTES": "0", "MEDMITRA_AUDIT_DURABILITY": "ack"}
    proc = subprocess.Popen([sys.executable, "-m", "medmitra", "serve"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, timeout_s=60)
        user = make_user()
        answered = 0
        import concurrent.futures as cf

        def one(i: int) -> int:
            r = httpx.get(url + "/cases/all_cases", timeout=10,
                          headers={"Authorization": f"Bearer {user.token}"})
            return r.status_code

        with cf.ThreadPoolExecutor(8) as ex:
            answered = sum(1 for s in ex.map(one, range(200)) if s == 200)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    rows = [r for r in _rows(data) if r["action"] == "list"]
    assert answered == 200 and len(rows) == 200


def test_trail_on_postgresql(pg_url, start_app, tmp_path: Path, monkeypatch,  # noqa: F811
                             capsys: pytest.CaptureFixture[str]) -> None:
    server = start_app(make_settings(tmp_path, database={"url": pg_url},
                                     audit={"durability": "ack"}))
    user = make_user()
    with server.client(user.token) as c:
        for _ in range(3):
            assert c.get("/cases/all_cases").status_code == 200
        assert c.post("/cases/create_case", data={"patient_name": PATIENT, "patient_age": "5",
                                                  "patient_gender": "male"}).status_code == 201
    monkeypatch.setenv("MEDMITRA_DATABASE_URL", pg_url)
    data = ["--data-dir", str(server.settings.data_path)]
    assert main(["audit", "verify"] + data) == 0
    assert "audit trail ok: 4 rows" in capsys.readouterr().out
    assert main(["audit", "list", "--user", user.id, "--format", "jsonl"] + data) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["action"] for r in rows] == ["list", "list", "list", "create"]
    assert PATIENT not in json.dumps(rows)


def test_account_and_key_administration_is_recorded(tmp_path: Path, monkeypatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    assert main(["users", "add", "--email", "Nurse@Clinic.test", "--password",
                 "a long enough password 42"] + data) == 0
    assert main(["users", "add", "--email", "nurse@clinic.test", "--password",
                 "a long enough password 42"] + data) == 1          # exists: refused
    assert main(["users", "list"] + data) == 0                     # reading: not recorded
    assert main(["users", "disable", "--email", "nurse@clinic.test"] + data) == 0
    assert main(["keys", "rotate"] + data) == 0
    rows = _rows(tmp_path / "data")
    assert [(r["action"], r["status"], r["auth_kind"]) for r in rows] == [
        ("user-add", 0, "cli"), ("user-add", 1, "cli"), ("user-disable", 0, "cli"),
        ("key-rotate", 0, "cli")]
    assert rows[0]["detail"] == "account=nurse@clinic.test"
    assert "password" not in json.dumps(rows)
    capsys.readouterr()
    assert main(["audit", "verify"] + data) == 0


def test_row_hash_is_the_documented_hmac_over_json_for_any_text() -> None:
    """The fast path (orjson, a reused keyed HMAC) hashes exactly the bytes of the documented
    form, HMAC-SHA256(key, prev_hash + "\\n" + json.dumps(fields, compact, ASCII)): chains
    written before it still verify. Random text covers control characters, DEL, quotes,
    backslashes and non-ASCII."""
    import hashlib
    import hmac
    import random

    rnd = random.Random(1234)
    alphabet = [chr(i) for i in range(0x80)] + ["é", "\u2028", "😀", "\u00a0", "ß"]
    for i in range(3000):
        key = bytes(rnd.randrange(256) for _ in range(rnd.choice((16, 64))))
        row = {f: "".join(rnd.choice(alphabet) for _ in range(rnd.randrange(12)))
               if rnd.random() < 0.8 else None for f in audit.FIELDS}
        row["id"] = rnd.choice((i, 2**70 + i))
        row["status"] = rnd.choice((200, 404, 0))
        prev = hashlib.sha256(str(i).encode()).hexdigest()
        payload = json.dumps([row.get(f) for f in audit.FIELDS], separators=(",", ":"),
                             ensure_ascii=True)
        want = hmac.new(key, f"{prev}\n{payload}".encode("ascii"), hashlib.sha256).hexdigest()
        assert audit.row_hash(key, prev, row) == want, row


def test_row_time_is_the_standard_iso_form_of_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """utc_now_iso formats the date once per second; it must still write exactly what
    datetime's isoformat writes (rows are compared as text by `audit list --since`)."""
    from datetime import datetime, timezone

    for t in (0.0, 1_700_000_000.5, 1_799_999_999.999999, 1_764_522_000.000001,
              1_764_522_001.25, 4_102_444_799.75):
        monkeypatch.setattr(audit.time, "time", lambda t=t: t)
        got = audit.utc_now_iso()
        want = datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="microseconds")
        # datetime rounds to the microsecond where the float is not exact; the trail
        # truncates: at most one microsecond apart, same text form.
        assert len(got) == len(want) == 32 and got[:20] == want[:20], (got, want)
        assert abs(datetime.fromisoformat(got) - datetime.fromisoformat(want)).total_seconds() \
            <= 1e-6, (got, want)
    monkeypatch.undo()
    now = datetime.now(timezone.utc)
    assert abs((datetime.fromisoformat(audit.utc_now_iso()) - now).total_seconds()) < 1


def test_server_made_request_ids_are_distinct_hex() -> None:
    from medmitra.ops.logs import request_id_from

    ids = [request_id_from(None) for _ in range(1000)] + [request_id_from("bad id!")]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert request_id_from("client-id.1") == "client-id.1"


def test_token_route_action_reads_the_grant_type_from_a_dict_or_a_callable() -> None:
    from medmitra.ops.audit import action_for

    asked: list[int] = []

    def args(grant: str):
        def get() -> dict:
            asked.append(1)
            return {"grant_type": grant}
        return get

    assert action_for("POST", "/auth/v1/token", args("refresh_token")) == "token-refresh"
    assert action_for("POST", "/auth/v1/token", args("password")) == "sign-in"
    assert action_for("POST", "/auth/v1/token", {"grant_type": "refresh_token"}) == \
        "token-refresh"
    assert action_for("POST", "/auth/v1/token", None) == "sign-in"
    assert len(asked) == 2
    # Other routes never ask for the query.
    assert action_for("GET", "/cases/cases/<case_id:str>", args("x")) == "view"
    assert len(asked) == 2


def test_a_large_flush_lets_the_event_loop_run_between_slices_of_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chaining a batch is Python on the event loop (~11 us a row); a busy server's batch
    chained in one go kept requests waiting. Other tasks must run between slices."""
    from medmitra.db.setup import close_db, open_db

    settings = make_settings(tmp_path)
    key = audit.load_or_create_key(settings.data_path)
    ticks = 0
    seen: list[int] = []
    real_hash = audit.row_hash

    def counting_hash(*args: Any) -> str:
        seen.append(ticks)
        return real_hash(*args)

    monkeypatch.setattr(audit, "row_hash", counting_hash)

    async def go() -> None:
        nonlocal ticks
        await open_db(settings)
        try:
            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0)

            task = asyncio.create_task(ticker())
            n = audit.HASH_SLICE * 8
            await audit.append_rows([{"ts": audit.utc_now_iso(), "action": "view",
                                      "status": 200} for _ in range(n)], key)
            task.cancel()
        finally:
            await close_db()

    asyncio.run(go())
    assert len(seen) == audit.HASH_SLICE * 8
    # Each slice of rows is hashed within one turn of the loop, and the ticker ran between
    # every two slices.
    slices = [seen[i:i + audit.HASH_SLICE] for i in range(0, len(seen), audit.HASH_SLICE)]
    assert all(len(set(s)) == 1 for s in slices)
    assert all(a[0] < b[0] for a, b in zip(slices, slices[1:]))
    assert main(["audit", "verify", "--data-dir", str(settings.data_path)]) == 0


def test_the_head_file_is_written_off_the_event_loop_in_commit_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medmitra.db.setup import close_db, open_db

    settings = make_settings(tmp_path)
    data = settings.data_path
    key = audit.load_or_create_key(data)
    writers: list[int] = []
    real_write = audit._write_head

    def recording_write(path: Path, head: tuple[int, str]) -> None:
        writers.append(threading.get_ident())
        real_write(path, head)

    monkeypatch.setattr(audit, "_write_head", recording_write)

    async def go() -> int:
        await open_db(settings)
        try:
            # Concurrent appends commit one after another; the last commit's head must be
            # the one left in the file.
            await asyncio.gather(*(audit.append_rows(
                [{"ts": audit.utc_now_iso(), "action": "view", "status": 200}] * (i + 1),
                key, data / audit.HEAD_FILE) for i in range(6)))
            return threading.get_ident()
        finally:
            await close_db()

    loop_thread = asyncio.run(go())
    audit.wait_for_head()
    assert len(writers) == 6 and loop_thread not in writers
    rows = _rows(data)
    assert len(rows) == 21
    assert audit.read_head(data / audit.HEAD_FILE) == (rows[-1]["id"], rows[-1]["hash"])
    assert main(["audit", "verify", "--data-dir", str(data)]) == 0
