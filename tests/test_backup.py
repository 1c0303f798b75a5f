"""Backup, verify and restore (issue 12 part 1) on a real SQLite file and real servers.

The proof test takes a backup with the CLI, in its own process as an operator would, while
20 clients create cases with files and two analyses run; it restores the backup into a
new data dir, starts a server on it and finds every case acknowledged before the backup
began, every file byte-identical, integrity_check ok and no orphan. Corrupted backups (a
flipped byte, a missing file, an edited manifest) are refused by verify and by restore.

MEDMITRA_OPS_FULL=1 (scripts/ops-full.sh) makes the proof test run longer and bigger.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

import docfactory as df
from conftest import (MODEL_PATH, ROOT, TEST_SECRET, Served, free_port, make_settings, make_user,
                      wait_healthy, database_at_version)
from medmitra.cli import main
from medmitra.llm.runtime import FakeRuntime
from medmitra.ops.backup import MANIFEST, make_backup, verify_backup
from tests.pg import pg_server, pg_url  # noqa: F401  (fixtures)

FULL = os.environ.get("MEDMITRA_OPS_FULL") == "1"


def _create(c: httpx.Client, i: int, files: list[tuple[str, tuple[str, bytes, str]]]) -> dict:
    r = c.post("/cases/create_case", data={"patient_name": f"Backup Patient {i}",
                                           "patient_age": str(20 + i % 70),
                                           "patient_gender": "female"}, files=files)
    assert r.status_code == 201, r.text
    return r.json()


def _files(i: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    # Distinct bytes per case so a file swapped between cases would be caught.
    csv = df.lab_csv() + f"Case marker,{i},,,\r\n".encode()
    return [("lab_files", (f"cbc-{i}.csv", csv, "text/csv")),
            ("radiology_files", (f"cxr-{i}.png", df.xray_png(64 + i % 7, 64), "image/png"))]


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _data_dir_state(data: Path) -> dict[str, Any]:
    """Rows and stored files of a data dir (read with plain sqlite3)."""
    conn = sqlite3.connect(data / "medmitra.sqlite3")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        cases = {r[0]: r[1] for r in conn.execute('SELECT "case_id", "patient_name" FROM cases')}
        rows = {r[0]: r[1] for r in conn.execute('SELECT "file_id", "sha256" FROM case_files')}
    finally:
        conn.close()
    stored = {p.name: p for p in (data / "files").glob("*/*")}
    return {"cases": cases, "rows": rows, "stored": stored}


OWNERS: dict[str, Any] = {}


@pytest.fixture
def populated(start_app, tmp_path: Path) -> tuple[Served, dict[str, bytes]]:
    """A running server (no workers) with 4 cases of two users, 8 files. OWNERS maps each
    case to its user."""
    server = start_app(make_settings(tmp_path, audit={"durability": "ack"}))
    sent: dict[str, bytes] = {}
    OWNERS.clear()
    for user in (make_user(), make_user()):
        with server.client(user.token) as c:
            for i in range(2):
                files = _files(i)
                out = _create(c, i, files)
                OWNERS[out["case"]["case_id"]] = user
                for f, (_, (_, content, _)) in zip(out["uploaded_files"], files):
                    sent[f["file_id"]] = content
    return server, sent


def test_backup_verify_restore_round_trip(populated, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    server, sent = populated
    data = server.settings.data_path
    dest = tmp_path / "bk"
    assert main(["backup", "--to", str(dest), "--data-dir", str(data), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "backup written to" in out and "4 case(s), 8 file(s)" in out
    manifest = json.loads((dest / MANIFEST).read_text())
    assert manifest["counts"]["cases"] == 4 and manifest["counts"]["case_files"] == 8
    assert manifest["schema_version"] >= 3 and manifest["database"]["kind"] == "sqlite"
    # The signing keys and the audit key (tests configure the JWT secret: no jwt_secret file).
    secrets = {e["path"] for e in manifest["secrets"]}
    assert "secrets/audit_key" in secrets
    assert any(p.startswith("secrets/auth_keys/") for p in secrets)
    assert manifest["counts"]["audit_log"] >= 4
    # The trail is in a file of its own (ops/audit_store.py), copied and listed too.
    assert manifest["audit_database"]["path"] == "audit.sqlite3"
    assert (dest / "audit.sqlite3").is_file()
    assert main(["backup", "verify", str(dest), "--quiet"]) == 0
    assert "backup ok" in capsys.readouterr().out

    target = tmp_path / "restored"
    assert main(["restore", str(dest), "--data-dir", str(target), "--quiet"]) == 0
    assert "restored into" in capsys.readouterr().out
    state = _data_dir_state(target)
    assert len(state["cases"]) == 4
    assert set(state["rows"]) == set(sent) == set(state["stored"])
    for fid, content in sent.items():
        assert state["stored"][fid].read_bytes() == content
        assert state["rows"][fid] == _sha(content)
    assert not (target / ".restore-partial").exists()
    # The audit trail comes back with its key: its chain still verifies.
    assert main(["audit", "verify", "--data-dir", str(target)]) == 0
    assert "audit trail ok" in capsys.readouterr().out

    # A server starts on the restored dir and serves the files with the same bytes.
    with serve(target) as url:
        for cid, user in OWNERS.items():
            with httpx.Client(base_url=url, timeout=30,
                              headers={"Authorization": f"Bearer {user.token}"}) as c:
                files = c.get(f"/cases/cases/{cid}").json()["files"]
                assert len(files) == 2
                for f in files:
                    assert httpx.get(f["file_url"]).content == sent[f["file_id"]]


def test_flipped_byte_and_missing_file_are_refused(populated, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    server, _ = populated
    dest = tmp_path / "bk"
    make_backup(server.settings, dest)
    assert verify_backup(dest)[1] == []

    stored = sorted((dest / "files").glob("*/*"))
    victim = stored[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    problems = verify_backup(dest)[1]
    assert problems == [f"checksum mismatch: {victim.relative_to(dest).as_posix()}"]
    target = tmp_path / "t1"
    assert main(["backup", "verify", str(dest), "--quiet"]) == 1
    assert main(["restore", str(dest), "--data-dir", str(target), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "nothing was restored" in err
    assert not target.exists() or not any(target.iterdir())

    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))            # repaired: verifies again
    assert verify_backup(dest)[1] == []
    stored[1].unlink()
    problems = verify_backup(dest)[1]
    assert f"missing: {stored[1].relative_to(dest).as_posix()}" in problems
    assert main(["restore", str(dest), "--data-dir", str(target), "--quiet"]) == 1
    assert "missing" in capsys.readouterr().err
    assert not target.exists() or not any(target.iterdir())


def test_corrupted_database_or_manifest_is_refused(populated, tmp_path: Path) -> None:
    server, _ = populated
    dest = tmp_path / "bk"
    make_backup(server.settings, dest)
    db = dest / "medmitra.sqlite3"
    raw = bytearray(db.read_bytes())
    raw[-100] ^= 0xFF
    db.write_bytes(bytes(raw))
    assert "checksum mismatch: medmitra.sqlite3" in verify_backup(dest)[1]
    raw[-100] ^= 0xFF
    db.write_bytes(bytes(raw))
    trail = dest / "audit.sqlite3"
    kept = trail.read_bytes()
    trail.write_bytes(kept[:-1] + bytes([kept[-1] ^ 0xFF]))
    assert verify_backup(dest)[1] == ["checksum mismatch: audit.sqlite3"]
    trail.unlink()
    assert verify_backup(dest)[1] == ["missing: audit.sqlite3"]
    trail.write_bytes(kept)
    manifest = (dest / MANIFEST).read_text()
    (dest / MANIFEST).write_text(manifest.replace('"cases": 4', '"cases": 5'))
    from medmitra.ops.backup import BackupError
    with pytest.raises(BackupError, match="manifest was changed"):
        verify_backup(dest)
    (dest / MANIFEST).write_text(manifest)
    (dest / "files" / "zz").mkdir()
    (dest / "files" / "zz" / "extra").write_bytes(b"x")
    assert verify_backup(dest)[1] == ["not in the manifest: files/zz/extra"]


def test_restore_refuses_non_empty_dir_unless_forced(populated, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    server, sent = populated
    dest = tmp_path / "bk"
    make_backup(server.settings, dest)
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    assert main(["restore", str(dest), "--data-dir", str(target), "--quiet"]) == 1
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert main(["restore", str(dest), "--data-dir", str(target), "--force", "--quiet"]) == 0
    aside = [p for p in target.iterdir() if p.name.startswith(".pre-restore-")]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "keep me"
    assert set(_data_dir_state(target)["stored"]) == set(sent)


def test_restore_refuses_a_newer_schema(populated, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    server, _ = populated
    live = sqlite3.connect(server.settings.data_path / "medmitra.sqlite3")
    with live:
        live.execute("INSERT INTO schema_version VALUES (9999, 'from_the_future', "
                     "'2030-01-01T00:00:00+00:00')")
    live.close()
    dest = tmp_path / "bk"
    make_backup(server.settings, dest)
    target = tmp_path / "t"
    assert main(["restore", str(dest), "--data-dir", str(target), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "newer schema (version 9999)" in err
    assert not target.exists() or not any(target.iterdir())


def test_restore_runs_migrations_forward(tmp_path: Path, capsys) -> None:
    """A backup of a data dir at schema version 1 comes back at the newest version."""
    from medmitra.db import setup as dbsetup

    settings = make_settings(tmp_path)
    database_at_version(settings, 1)
    dest = tmp_path / "bk"
    assert make_backup(settings, dest).manifest["schema_version"] == 1
    target = tmp_path / "t"
    assert main(["restore", str(dest), "--data-dir", str(target), "--quiet"]) == 0
    newest = max(v for v, _, _ in dbsetup.available_migrations("sqlite"))
    assert f"schema version {newest}, migrated forward: 2" in capsys.readouterr().out


def test_restore_of_a_trail_kept_in_the_database_moves_it_to_its_own_file(
        tmp_path: Path, capsys) -> None:
    """A backup made before migration 0008 holds the audit rows in the database: restored,
    they move to audit.sqlite3 and their chain still verifies."""
    from test_audit import _legacy_rows

    from medmitra.ops import audit
    from medmitra.ops.audit_store import AUDIT_DB_NAME, MOVE_OUT_VERSION

    settings = make_settings(tmp_path)
    database_at_version(settings, MOVE_OUT_VERSION - 1)
    data = settings.data_path
    (data / AUDIT_DB_NAME).unlink()
    _legacy_rows(data / "medmitra.sqlite3", audit.load_or_create_key(data), 5)
    dest = tmp_path / "bk"
    manifest = make_backup(settings, dest).manifest
    assert "audit_database" not in manifest and manifest["counts"]["audit_log"] == 5
    target = tmp_path / "t"
    assert main(["restore", str(dest), "--data-dir", str(target), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["audit", "verify", "--data-dir", str(target)]) == 0
    assert "audit trail ok: 5 rows" in capsys.readouterr().out
    conn = sqlite3.connect(target / AUDIT_DB_NAME)
    try:
        assert conn.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0] == 5
    finally:
        conn.close()


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    from medmitra.ops.backup import prune

    for stamp in ("20260101", "20260102", "20260103"):
        d = tmp_path / f"medmitra-{stamp}"
        d.mkdir()
        (d / MANIFEST).write_text("{}")
    (tmp_path / ".medmitra-x.partial-1").mkdir()
    removed = prune(tmp_path, keep=2)
    assert [p.name for p in removed] == ["medmitra-20260101"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".medmitra-x.partial-1", "medmitra-20260102", "medmitra-20260103"]


def test_server_makes_scheduled_backups(start_app, tmp_path: Path) -> None:
    # every_h is in hours; 0.0003 h is about 1.1 s. Wait for three backups; two are kept.
    server = start_app(make_settings(tmp_path, backup={"every_h": 0.0003, "keep": 2}))
    seen: set[float] = set()
    deadline = time.monotonic() + 90
    while len(seen) < 3 and time.monotonic() < deadline:
        if server.app.ctx.last_backup_at is not None:
            seen.add(server.app.ctx.last_backup_at)
        time.sleep(0.05)
    assert len(seen) >= 3
    done = sorted((server.settings.data_path / "backups").glob("medmitra-*"))
    assert len(done) == 2, done
    assert server.app.ctx.last_backup_at is not None
    assert verify_backup(done[-1])[1] == []
    with server.client() as c:
        r = c.get("/metrics")
    assert "medmitra_backup_last_success_timestamp_seconds" in r.text


def test_postgresql_backup_holds_files_and_keys_and_says_pg_dump(
        pg_url, start_app, tmp_path: Path, capsys) -> None:  # noqa: F811
    settings = make_settings(tmp_path, database={"url": pg_url})
    server = start_app(settings)
    user = make_user()
    sent = {}
    with server.client(user.token) as c:
        files = _files(1)
        out = _create(c, 1, files)
        for f, (_, (_, content, _)) in zip(out["uploaded_files"], files):
            sent[f["file_id"]] = content
    result = make_backup(settings, tmp_path / "bk")
    m = result.manifest
    assert m["database"]["kind"] == "postgres" and "pg_dump" in m["database"]["note"]
    assert any("pg_dump" in w for w in result.warnings)
    assert m["counts"]["cases"] == 1 and len(m["files"]) == 2 and m["schema_version"] >= 5
    assert verify_backup(tmp_path / "bk")[1] == []
    from medmitra.ops.restore import restore_backup

    target = settings.replace("storage", data_dir=str(tmp_path / "restored"))
    restore_backup(tmp_path / "bk", target)
    for fid, content in sent.items():
        assert (tmp_path / "restored" / "files" / fid[:2] / fid).read_bytes() == content


# -- the proof: a backup while clients write and analyses run ---------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_backup_during_writes_restores_every_acknowledged_case(start_server, tmp_path: Path
                                                                ) -> None:
    real_model = MODEL_PATH.is_file()
    settings = make_settings(tmp_path, llm={"workers": 2, "threads": 1, "n_ctx": 2048,
                                            "max_tokens_lab": 64, "max_tokens_radiology": 64,
                                            "max_tokens_summary": 64, "max_tokens_soap": 64,
                                            "max_tokens_diagnosis": 64,
                                            "max_tokens_differential": 200,
                                            "max_tokens_recommendations": 200},
                             jobs={"lease_s": 30, "heartbeat_s": 1})
    server = start_server(settings, **({} if real_model else {"runtime_factory": FakeRuntime}))
    data = settings.data_path
    n_clients = 20
    rounds_after = 30 if FULL else 2
    acked: dict[str, dict[str, bytes]] = {}   # case_id -> {file_id: bytes}
    lock = threading.Lock()
    backup_started = threading.Event()
    backup_done = threading.Event()
    errors: list[str] = []
    users = [make_user() for _ in range(n_clients)]

    def client(k: int) -> None:
        i = after = 0
        try:
            with server.client(users[k].token) as c:
                while True:
                    # Keep writing until the backup is over, and a few rounds past it.
                    if backup_done.is_set():
                        after += 1
                        if after > rounds_after:
                            return
                    elif not backup_started.is_set() and i >= 200:
                        return   # the backup never started: the test fails below
                    files = _files(k * 1000 + i)
                    out = _create(c, k * 1000 + i, files)
                    with lock:
                        acked[out["case"]["case_id"]] = {
                            f["file_id"]: content for f, (_, (_, content, _))
                            in zip(out["uploaded_files"], files)}
                    i += 1
        except Exception as exc:  # surfaced below
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    # Let every client acknowledge a few cases and two analyses start.
    deadline = time.monotonic() + 60
    need = (5 if FULL else 1) * n_clients
    while time.monotonic() < deadline and (len(acked) < need or _running(server) < 2):
        time.sleep(0.05)
    assert len(acked) >= need and not errors, errors
    with lock:
        before = {cid: files for cid, files in acked.items()}
    running_at_backup = _running(server)
    backup_started.set()
    dest = tmp_path / "backup"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "medmitra", "backup", "--to", str(dest),
                           "--data-dir", str(data)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "MEDMITRA_AUTH_JWT_SECRET":
                                            settings.auth.jwt_secret})
    backup_s = time.monotonic() - t0
    backup_done.set()
    for t in threads:
        t.join(120)
    assert proc.returncode == 0, proc.stderr
    assert not errors, errors
    written_during = sum(1 for cid in acked if cid not in before)
    assert written_during > 0, "no case was written while the backup ran"
    assert running_at_backup >= 1

    assert verify_backup(dest)[1] == []
    target = tmp_path / "restored"
    assert main(["restore", str(dest), "--data-dir", str(target), "--quiet"]) == 0

    state = _data_dir_state(target)
    # No orphan: every row has its file, every stored file its row.
    assert set(state["rows"]) == set(state["stored"])
    for cid, files in before.items():
        assert cid in state["cases"], f"acknowledged case {cid} missing from the backup"
        for fid, content in files.items():
            assert state["stored"][fid].read_bytes() == content
    # Cases acknowledged during the backup may or may not be in it, but never half.
    for cid, files in acked.items():
        if cid in state["cases"]:
            assert all(fid in state["rows"] for fid in files)

    # A server on the restored dir serves the cases, and file links give the same bytes.
    owner = {cid: users[int(files_k) // 1000] for cid, files_k in _case_index(target).items()}
    sample = list(before)[:: max(1, len(before) // (15 if FULL else 5))]
    with serve(target) as url:
        for cid in sample:
            with httpx.Client(base_url=url, timeout=30, headers={
                    "Authorization": f"Bearer {owner[cid].token}"}) as c:
                body = c.get(f"/cases/cases/{cid}").json()
                assert body["case"]["case_id"] == cid
                assert {f["file_id"] for f in body["files"]} == set(before[cid])
                for f in body["files"]:
                    assert httpx.get(f["file_url"]).content == before[cid][f["file_id"]]
    print(f"\nbackup of {len(state['cases'])} cases / {len(state['stored'])} files took "
          f"{backup_s:.2f} s; {written_during} cases acknowledged while it ran; "
          f"{running_at_backup} analyses running when it began")


@contextlib.contextmanager
def serve(data: Path) -> Iterator[str]:
    """`medmitra serve` on a data dir, in its own process (as after a real restore)."""
    port = free_port()
    env = {**os.environ, "MEDMITRA_STORAGE_DATA_DIR": str(data),
           "MEDMITRA_SERVER_PORT": str(port), "MEDMITRA_LLM_WORKERS": "0",
           "MEDMITRA_AUTH_JWT_SECRET": TEST_SECRET, "MEDMITRA_STORAGE_MIN_FREE_BYTES": "0",
           "MEDMITRA_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "medmitra", "serve"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=60)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _running(server: Served) -> int:
    pool = server.app.ctx.pool
    return sum(1 for w in pool.status()["workers"] if w["state"] == "busy") if pool else 0


def _case_index(data: Path) -> dict[str, int]:
    """case_id -> the client's running number (from the patient name 'Backup Patient N')."""
    conn = sqlite3.connect(data / "medmitra.sqlite3")
    try:
        return {cid: int(name.rsplit(" ", 1)[1])
                for cid, name in conn.execute('SELECT "case_id", "patient_name" FROM cases')}
    finally:
        conn.close()
