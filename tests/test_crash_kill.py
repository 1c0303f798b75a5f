"""Crash-kill: a real server process is SIGKILLed at random moments while clients create
cases with files, upload, delete and analyse (one analysis worker, the real model), then
restarted on the same data dir. After every restart:

- ``PRAGMA integrity_check`` is ``ok``;
- every ``case_files`` row has its bytes (right size) under ``files/<2hex>/<file_id>`` and
  every stored byte file has a row; nothing is left in ``tmp/``;
- every case (and uploaded file) acknowledged with 201 before the kill exists, and every
  acknowledged delete stayed deleted;
- once the queue drains, no case is left ``processing``.

Rounds: ``MEDMITRA_CRASH_ROUNDS`` (CI default 3; scripts/fuzz-full.sh runs 20). Random but
seeded (``MEDMITRA_CRASH_SEED``): a failing round is reproducible from the printed seed.
Model work is kept tiny (16-token answers, one attempt, a 1 s stage limit) so the queue
drains in seconds; the kill still lands in the middle of real model calls.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

import docfactory as df
from conftest import free_port, kill_group, spawn_server, wait_healthy
from medmitra.auth.jwt import issue_token


ROUNDS = int(os.environ.get("MEDMITRA_CRASH_ROUNDS", "3"))   # ~20 s a round
SEED = int(os.environ.get("MEDMITRA_CRASH_SEED", "20260601"))
SECRET = "crash-kill-secret-" + "k" * 40
START_TIMEOUT_S = 180.0
DRAIN_TIMEOUT_S = 240.0
# Each round may wait for a start and a drain; the final restart once more.
pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.timeout((ROUNDS + 1) * (START_TIMEOUT_S + DRAIN_TIMEOUT_S))]
# The kill lands this long after the round's traffic starts (uniform).
KILL_AFTER_S = (0.05, 2.5)
# Per-round work is small: every queued analysis costs real model time before the drain.
OPS_PER_ROUND = (3, 8)
NEW_CASES_PER_ROUND = 2
OLD_CASES_TOUCHED_PER_ROUND = 1
HTTP_TIMEOUT_S = 20.0
FAST_LLM = {f"MEDMITRA_LLM_MAX_TOKENS_{k}": "16" for k in (
    "LAB", "RADIOLOGY", "SUMMARY", "SOAP", "DIAGNOSIS", "DIFFERENTIAL", "RECOMMENDATIONS")}


# ------------------------------------------------------------------ server processes

SERVER_ENV = {"MEDMITRA_AUTH_JWT_SECRET": SECRET, "MEDMITRA_STORAGE_MIN_FREE_BYTES": "0",
              "MEDMITRA_LLM_WORKERS": "1", "MEDMITRA_JOBS_POLL_S": "0.1",
              "MEDMITRA_JOBS_HEARTBEAT_S": "0.5", "MEDMITRA_JOBS_LEASE_S": "5",
              "MEDMITRA_JOBS_MAX_ATTEMPTS": "1", "MEDMITRA_LLM_STAGE_TIMEOUT_S": "1",
              "MEDMITRA_LLM_N_CTX": "1024", **FAST_LLM}


# ------------------------------------------------------------------ the world model

@dataclass
class Ledger:
    """What the server acknowledged; only acknowledged facts are checked."""
    cases: dict[str, bool] = field(default_factory=dict)       # case_id -> still exists
    files: dict[str, str] = field(default_factory=dict)        # file_id -> case_id
    deleted_files: set[str] = field(default_factory=set)
    # Deletes sent but not answered (the kill came first): either outcome is correct.
    pending_cases: set[str] = field(default_factory=set)
    pending_files: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def live_cases(self) -> list[str]:
        with self.lock:
            return [c for c, alive in self.cases.items() if alive]


def _small_file(rng: random.Random) -> tuple[str, tuple[str, bytes, str]]:
    kind = rng.choice(["csv", "pdf", "png", "txt"])
    if kind == "csv":
        return "lab_files", ("labs.csv", df.lab_csv(), "text/csv")
    if kind == "pdf":
        return "lab_files", ("report.pdf", df.text_pdf(), "application/pdf")
    if kind == "txt":
        return "lab_files", ("notes.txt", b"Hemoglobin 9.1 g/dL 13.5-17.5\n", "text/plain")
    return "radiology_files", ("chest.png", df.xray_png(64, 64), "image/png")


def traffic(url: str, token: str, rng: random.Random, ledger: Ledger,
            stop: threading.Event, errors: list[str]) -> None:
    """Random operations until the server dies (a transport error), ``stop`` or the
    round's budget. Only a few cases are touched, so only a few analyses get queued."""
    h = {"Authorization": f"Bearer {token}"}
    old = ledger.live_cases()
    touched = set(rng.sample(old, min(OLD_CASES_TOUCHED_PER_ROUND, len(old))))
    created = 0
    with httpx.Client(base_url=url, headers=h, timeout=HTTP_TIMEOUT_S) as c:
        for _ in range(rng.randint(*OPS_PER_ROUND)):
            if stop.is_set():
                return
            live = [cid for cid in ledger.live_cases() if cid in touched]
            ops = ["upload", "delete", "delete_file", "analyze"] if live else []
            if created < NEW_CASES_PER_ROUND:
                ops += ["create", "create"]
            if not ops:
                return
            op = rng.choice(ops)
            try:
                if op == "create":
                    files = [_small_file(rng) for _ in range(rng.randint(0, 3))]
                    r = c.post("/cases/create_case", data={
                        "patient_name": "Crash Test", "patient_age": str(rng.randint(0, 99)),
                        "patient_gender": "female"}, files=files or None)
                    if r.status_code == 201:
                        body = r.json()
                        created += 1
                        touched.add(body["case"]["case_id"])
                        with ledger.lock:
                            ledger.cases[body["case"]["case_id"]] = True
                            for f in body["uploaded_files"]:
                                ledger.files[f["file_id"]] = body["case"]["case_id"]
                    else:
                        errors.append(f"create -> {r.status_code} {r.text[:200]}")
                elif op == "upload":
                    case_id = rng.choice(live)
                    field_name, part = _small_file(rng)
                    r = c.post("/cases/upload", files=[("file", part)], data={
                        "case_id": case_id,
                        "category": "lab" if field_name == "lab_files" else "radiology"})
                    if r.status_code == 201:
                        with ledger.lock:
                            for f in r.json()["files"]:
                                ledger.files[f["file_id"]] = case_id
                    elif r.status_code != 404:   # deleted meanwhile by an unacked delete
                        errors.append(f"upload -> {r.status_code} {r.text[:200]}")
                elif op == "delete":
                    case_id = rng.choice(live)
                    with ledger.lock:
                        ledger.pending_cases.add(case_id)
                    r = c.delete(f"/cases/cases/{case_id}")
                    if r.status_code == 200:
                        with ledger.lock:
                            ledger.cases[case_id] = False
                            ledger.pending_cases.discard(case_id)
                    else:
                        errors.append(f"delete -> {r.status_code} {r.text[:200]}")
                elif op == "delete_file":
                    with ledger.lock:
                        candidates = [f for f, cid in ledger.files.items()
                                      if cid in touched and ledger.cases.get(cid)
                                      and f not in ledger.deleted_files]
                    if not candidates:
                        continue
                    fid = rng.choice(candidates)
                    with ledger.lock:
                        ledger.pending_files.add(fid)
                    r = c.delete(f"/cases/file/{fid}")
                    if r.status_code == 200:
                        with ledger.lock:
                            ledger.deleted_files.add(fid)
                            ledger.pending_files.discard(fid)
                    else:
                        errors.append(f"delete_file -> {r.status_code} {r.text[:200]}")
                else:
                    r = c.post(f"/cases/analyze/{rng.choice(live)}", json={})
                    if r.status_code != 200:
                        errors.append(f"analyze -> {r.status_code} {r.text[:200]}")
            except httpx.TransportError:
                return   # the server was killed: the round is over


# ------------------------------------------------------------------ invariants

def _db(data: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{data / 'medmitra.sqlite3'}?mode=ro", uri=True, timeout=30)


def check_store(data: Path, ledger: Ledger) -> dict[str, int]:
    """Integrity, rows <-> bytes, acknowledged writes; returns counts for the report."""
    with _db(data) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        rows = {fid: size for fid, size in db.execute(
            'SELECT "file_id", "file_size" FROM "case_files"')}
        cases = {cid for (cid,) in db.execute('SELECT "case_id" FROM "cases"')}
        file_case = dict(db.execute('SELECT f."file_id", c."case_id" FROM "case_files" f '
                                    'JOIN "cases" c ON c."id" = f."case_id"'))
    stored = {p.name: p for p in (data / "files").glob("*/*") if p.is_file()}
    for fid, size in rows.items():
        path = data / "files" / fid[:2] / fid
        assert path.is_file(), f"file row {fid} has no bytes"
        assert path.stat().st_size == size, f"file {fid}: {path.stat().st_size} != {size}"
    orphans = set(stored) - set(rows)
    assert not orphans, f"stored files without a row: {sorted(orphans)}"
    assert not any((data / "tmp").iterdir()), "unfinished uploads left in tmp/"
    with ledger.lock:
        # Unanswered deletes: settle them by what the server kept (both are correct).
        for cid in ledger.pending_cases:
            ledger.cases[cid] = cid in cases
        for fid in ledger.pending_files:
            if fid not in rows:
                ledger.deleted_files.add(fid)
        ledger.pending_cases.clear()
        ledger.pending_files.clear()
        for cid, alive in ledger.cases.items():
            state = "created but missing" if alive else "deleted but present"
            assert (cid in cases) == alive, f"case {cid}: acknowledged {state}"
        for fid, cid in ledger.files.items():
            if ledger.cases.get(cid) and fid not in ledger.deleted_files:
                assert file_case.get(fid) == cid, f"acknowledged file {fid} is missing"
            if fid in ledger.deleted_files:
                assert fid not in rows, f"deleted file {fid} came back"
    return {"cases": len(cases), "files": len(rows)}


def drain(data: Path, proc: subprocess.Popen) -> float:
    """Wait until no job is queued or running; then no case may be 'processing'."""
    started = time.monotonic()
    while True:
        assert proc.poll() is None, "server died while draining"
        with _db(data) as db:
            active = db.execute('SELECT COUNT(*) FROM "jobs" WHERE "state" IN '
                                "('queued', 'running')").fetchone()[0]
            if active == 0:
                stuck = db.execute('SELECT "case_id" FROM "cases" WHERE "status" = '
                                   "'processing'").fetchall()
                assert not stuck, f"cases left processing after the queue drained: {stuck}"
                return time.monotonic() - started
        assert time.monotonic() - started < DRAIN_TIMEOUT_S, f"{active} job(s) never finished"
        time.sleep(0.25)   # polling the worker's progress


# ------------------------------------------------------------------ the test

def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path, capsys) -> None:
    data, log = tmp_path / "data", tmp_path / "server.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    user = str(uuid.uuid4())
    token = issue_token(SECRET, user_id=user, email="crash@clinic.test", expires_in_s=86400)
    ledger = Ledger()
    master = random.Random(SEED)
    report: list[str] = []
    t_all = time.monotonic()
    for rnd in range(ROUNDS):
        rng = random.Random(master.getrandbits(64))
        proc = spawn_server(data, port, log, **SERVER_ENV)
        try:
            wait_healthy(url, proc, timeout_s=START_TIMEOUT_S, model=True)
            if rnd:   # the previous round ended in a kill: check what the restart found
                counts = check_store(data, ledger)
                drained_s = drain(data, proc)
                counts = check_store(data, ledger)
                report.append(f"round {rnd}: after restart {counts}, drained in {drained_s:.1f} s")
            stop, errors = threading.Event(), []
            worker = threading.Thread(target=traffic, args=(url, token, rng, ledger, stop,
                                                            errors), daemon=True)
            kill_after = rng.uniform(*KILL_AFTER_S)
            worker.start()
            worker.join(kill_after)
            kill_group(proc)
            stop.set()
            worker.join(HTTP_TIMEOUT_S + 5)
            assert not worker.is_alive()
            assert not errors, f"round {rnd}: unexpected answers: {errors}"
        finally:
            kill_group(proc)
    # Final restart: the last kill is recovered too.
    proc = spawn_server(data, port, log, **SERVER_ENV)
    try:
        wait_healthy(url, proc, timeout_s=START_TIMEOUT_S, model=True)
        check_store(data, ledger)
        drained_s = drain(data, proc)
        counts = check_store(data, ledger)
        report.append(f"final: {counts}, drained in {drained_s:.1f} s")
        # Acknowledged cases are reachable through the API, not only present in the file.
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                          timeout=HTTP_TIMEOUT_S) as c:
            for cid in ledger.live_cases():
                assert c.get(f"/cases/cases/{cid}").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        kill_group(proc)
    text = log.read_text(errors="replace")
    assert "database is locked" not in text
    assert "Crash Test" not in text   # no patient names above DEBUG
    with capsys.disabled():
        acked = len(ledger.cases)
        print(f"\n[crash] {ROUNDS} SIGKILL rounds (seed {SEED}) in "
              f"{time.monotonic() - t_all:.0f} s; {acked} cases acknowledged, "
              f"{sum(1 for a in ledger.cases.values() if not a)} deleted, "
              f"{len(ledger.files)} files acknowledged")
        for line in report:
            print(f"[crash]   {line}")
