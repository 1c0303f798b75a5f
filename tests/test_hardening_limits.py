"""Issue 11, memory, connections and fairness: small body caps on JSON routes enforced while
reading (before auth), a header deadline, a keep-alive timeout and a connection cap, a
per-user limit of waiting analyses with a fair claim across owners (SQLite and
PostgreSQL), and big unpaged lists read off the event loop.

The figures the issue asks for are printed by the slow tests (run with -s to see them):
RSS peak above idle under 6 parallel 110 MiB anonymous bodies, /health with 1,000 idle
sockets open, the queue position of user B's case while user A is at the limit."""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

import docfactory as df
from conftest import ROOT, TEST_SECRET, free_port, make_settings, make_user
from medmitra.db.models import Case, Job
from medmitra.jobs import queue

pytestmark = [pytest.mark.e2e]

MiB = 1024 * 1024
PATIENT = {"patient_name": "Ravi Kumar", "patient_age": "61", "patient_gender": "male"}


# -- a real server process ------------------------------------------------------------------

class Proc:
    def __init__(self, tmp_path: Path, nofile: int | None = None, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "server.log"
        full = {k: v for k, v in os.environ.items() if not k.startswith("MEDMITRA_")}
        full.update({"MEDMITRA_STORAGE_DATA_DIR": str(tmp_path / "data"),
                     "MEDMITRA_SERVER_PORT": str(self.port), "MEDMITRA_LLM_WORKERS": "0",
                     "MEDMITRA_AUTH_JWT_SECRET": TEST_SECRET,
                     "MEDMITRA_STORAGE_MIN_FREE_BYTES": "0"}, **env)
        config = tmp_path / "empty.toml"
        config.write_text("", encoding="utf-8")
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "medmitra", "serve", "--config", str(config)],
                cwd=ROOT, env=full, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=None if nofile is None else (
                    lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)    # polling a process that is starting
        raise AssertionError("server did not start")

    def status(self, key: str) -> int:
        """A /proc/<pid>/status figure in bytes (VmRSS now, VmHWM the peak)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def proc_factory(tmp_path: Path):
    started: list[Proc] = []

    def start(nofile: int | None = None, **env: str) -> Proc:
        p = Proc(tmp_path, nofile, **env)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def _send_body(url: str, method: str, path: str, total: int, chunked: bool,
               headers: dict[str, str]) -> str:
    """Push ``total`` bytes (or until the server stops reading); the status line seen."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}",
            "Content-Type: application/json", *[f"{k}: {v}" for k, v in headers.items()]]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}")
    block = b"[" + b" " * (1 * MiB - 2) + b"]"
    sent = 0
    try:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        while sent < total:
            part = block[: min(len(block), total - sent)]
            s.sendall(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
            sent += len(part)
        if chunked:
            s.sendall(b"0\r\n\r\n")
    except OSError:
        pass                        # the server refused and closed: what we want
    try:
        return s.recv(200).split(b"\r\n", 1)[0].decode(errors="replace")
    except OSError:
        return "closed"
    finally:
        s.close()


# -- 8. bounded memory before authentication ------------------------------------------------

def test_json_body_over_the_small_cap_is_413_even_when_authenticated(start_server, tmp_path,
                                                                    alice):
    # Before: JSON routes read bodies up to request_max_bytes (120 MiB). The cap is Sanic's
    # HTTP protocol's, so a real socket server.
    server = start_server(make_settings(tmp_path))
    with server.client(alice.token) as c:
        r = c.post("/cases/create_case", data=PATIENT,
                   files=[("lab_files", ("labs.csv", df.lab_csv(), "text/csv"))])
        case_id = r.json()["case"]["case_id"]
        big = b'{"case_summary": "' + b"x" * (2 * MiB) + b'"}'
        r = c.put(f"/cases/cases/{case_id}", content=big,
                  headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        r = c.post("/auth/v1/token", params={"grant_type": "password"}, content=big)
        assert r.status_code == 413
        # Uploads keep their own (larger) cap.
        r = c.post("/cases/upload", data={"case_id": case_id, "category": "lab"},
                   files=[("file", ("big.csv", df.lab_csv() + b"\n" * (2 * MiB), "text/csv"))])
        assert r.status_code == 201, r.text


@pytest.mark.slow
def test_six_parallel_anonymous_110_mib_bodies_keep_memory_flat(proc_factory, capsys):
    # Before: six parallel unauthenticated bodies took the server's RSS above 1 GiB.
    p = proc_factory()
    user = make_user()
    with httpx.Client(base_url=p.url, timeout=30,
                      headers={"Authorization": f"Bearer {user.token}"}) as c:
        case_id = c.post("/cases/create_case", data=PATIENT).json()["case"]["case_id"]
        for _ in range(20):                       # warm the routes first
            c.get("/cases/all_cases")
    time.sleep(0.5)
    idle = p.status("VmRSS")
    targets = [("PUT", f"/cases/cases/{case_id}", False), ("POST", f"/cases/analyze/{case_id}", True),
               ("POST", "/auth/v1/token?grant_type=password", False),
               ("PUT", f"/cases/cases/{case_id}", True), ("POST", "/auth/v1/signup", True),
               ("POST", f"/cases/analyze/{case_id}", False)]
    answers: list[str] = []
    threads = [threading.Thread(target=lambda m=m, path=path, ch=ch: answers.append(
        _send_body(p.url, m, path, 110 * MiB, ch, {}))) for m, path, ch in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    peak = p.status("VmHWM")
    with capsys.disabled():
        print(f"\n[limits] RSS idle {idle / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB, "
              f"peak above idle {(peak - idle) / MiB:.1f} MiB under 6 x 110 MiB anonymous "
              f"bodies; answers {sorted(answers)}")
    assert all("413" in a or a == "closed" or a == "" for a in answers), answers
    assert peak - idle < 50 * MiB
    assert httpx.get(f"{p.url}/health", timeout=10).status_code == 200


# -- 9. idle and slow connections -----------------------------------------------------------

def _fd_room(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 200 and hard >= n + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n + 200, hard))
    elif soft < n + 200:
        pytest.skip(f"needs {n + 200} file descriptors, the hard limit is {hard}")


@pytest.mark.slow
@pytest.mark.parametrize("idle", [1000, 1200])
def test_a_thousand_idle_sockets_do_not_make_health_fail(proc_factory, capsys, idle):
    # Before: with the common default of 1,024 open files per process, idle sockets took
    # every descriptor and the server could not accept /health (1,200 here; 1,000 leaves
    # it a few dozen).
    _fd_room(idle)
    p = proc_factory(nofile=1024)
    socks = []
    try:
        for _ in range(idle):
            s = socket.socket()
            s.settimeout(10)
            s.connect(("127.0.0.1", p.port))
            socks.append(s)
        time.sleep(0.5)
        ok = 0
        for _ in range(20):
            try:
                ok += httpx.get(f"{p.url}/health", timeout=5).status_code == 200
            except httpx.TransportError:
                pass
        with capsys.disabled():
            print(f"\n[limits] /health with {idle:,} idle sockets open (1,024 files per "
                  f"process): {ok}/20 succeeded")
        assert ok == 20
    finally:
        for s in socks:
            s.close()


@pytest.mark.slow
def test_slow_loris_head_is_cut_at_the_header_deadline(proc_factory):
    # Before: a head trickled one byte at a time kept its connection for minutes.
    p = proc_factory(MEDMITRA_SERVER_HEADER_TIMEOUT_S="2", MEDMITRA_SERVER_KEEP_ALIVE_TIMEOUT_S="2")
    s = socket.create_connection(("127.0.0.1", p.port), timeout=2)
    t0 = time.monotonic()
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    closed_after = None
    try:
        while time.monotonic() - t0 < 30:
            s.sendall(b"X")
            time.sleep(0.5)
            try:
                s.setblocking(False)
                data = s.recv(4096)
                s.setblocking(True)
                if data == b"" or data.startswith(b"HTTP/1.1 408"):
                    closed_after = time.monotonic() - t0
                    break
            except BlockingIOError:
                s.setblocking(True)
    except OSError:
        closed_after = time.monotonic() - t0
    finally:
        s.close()
    assert closed_after is not None and closed_after < 8, closed_after
    # An idle keep-alive connection is closed after its timeout too.
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.recv(100).startswith(b"HTTP/1.1 200")
    t0 = time.monotonic()
    while s.recv(65536):
        pass
    assert time.monotonic() - t0 < 8
    s.close()


@pytest.mark.slow
def test_busy_connections_beyond_the_cap_get_a_clear_503(proc_factory):
    p = proc_factory(MEDMITRA_SERVER_MAX_CONNECTIONS="16")
    user = make_user()
    busy = []
    try:
        for _ in range(16):
            # An upload whose body is still arriving: a connection busy with a request.
            s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
            s.sendall((f"POST /cases/create_case HTTP/1.1\r\nHost: x\r\n"
                       f"Authorization: Bearer {user.token}\r\n"
                       f"Content-Type: multipart/form-data; boundary=b\r\n"
                       f"Content-Length: 100000\r\n\r\n--b\r\n").encode())
            busy.append(s)
        time.sleep(1.0)
        r = httpx.get(f"{p.url}/health", timeout=10)
        assert r.status_code == 503
        assert "max_connections" in r.json()["detail"]
    finally:
        for s in busy:
            s.close()
    time.sleep(1.0)
    assert httpx.get(f"{p.url}/health", timeout=10).status_code == 200


# -- 10. per-user limit of waiting analyses, fair claim ------------------------------------

def test_per_user_queue_limit_answers_429_and_others_go_first(start_server, tmp_path, capsys):
    # Before: one user could queue any number of analyses, and everyone else waited
    # behind all of them (first in, first out).
    server = start_server(make_settings(tmp_path, jobs={"max_queued_per_user": 3}))
    a, b = make_user(), make_user()
    with server.client(a.token) as ca, server.client(b.token) as cb:
        a_cases = []
        for i in range(3):
            r = ca.post("/cases/create_case", data={**PATIENT, "patient_name": f"A {i}"})
            assert r.status_code == 201
            a_cases.append(r.json()["case"]["case_id"])
        # Re-analysing a case that is already waiting replaces its run: allowed.
        assert ca.post(f"/cases/analyze/{a_cases[0]}").status_code == 200
        r = ca.post("/cases/create_case", data={**PATIENT, "patient_name": "A 3"})
        assert r.status_code == 201               # new cases are always stored and queued
        fourth = r.json()["case"]["case_id"]
        r = ca.post(f"/cases/analyze/{fourth}")
        assert r.status_code == 429, r.text
        assert "limit 3" in r.json()["detail"]
        r = ca.post("/cases/upload", data={"case_id": fourth, "category": "lab"},
                    files=[("file", ("labs.csv", df.lab_csv(), "text/csv"))])
        assert r.status_code == 429
        assert ca.get(f"/cases/files/{fourth}").json()["files"] == []     # nothing stored
        r = cb.post("/cases/create_case", data={**PATIENT, "patient_name": "B 0"})
        b_case = r.json()["case"]["case_id"]
        pos = cb.get(f"/cases/cases/{b_case}").json()["analysis"]["queue_position"]
        a_positions = sorted(ca.get(f"/cases/cases/{cid}").json()["analysis"]["queue_position"]
                             for cid in [*a_cases, fourth])
    with capsys.disabled():
        print(f"\n[limits] user A at the limit with {len(a_positions)} waiting: user B's "
              f"case is at queue position {pos} (A's: {a_positions})")
    assert pos == 2                  # behind A's first, ahead of A's other three
    assert a_positions == [1, 3, 4, 5]


async def _case(user: str) -> Case:
    now = datetime.now(timezone.utc)
    return await Case.create(case_id=str(uuid.uuid4()), user_id=user, patient_name="P",
                             patient_age=40, patient_gender="female", status="processing",
                             created_at=now, updated_at=now)


async def fair_order_scenario() -> None:
    """30 jobs of user A queued first, then one each of B and C: claims go A, B, C, A..."""
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    a_jobs = [await queue.enqueue(await _case(a), {}, max_attempts=3) for _ in range(30)]
    b_job = await queue.enqueue(await _case(b), {}, max_attempts=3)
    c_job = await queue.enqueue(await _case(c), {}, max_attempts=3)
    status = await queue.analysis_status(b_job.case_id)
    assert status["queue_position"] == 2
    assert (await queue.analysis_status(c_job.case_id))["queue_position"] == 3
    assert (await queue.analysis_status(a_jobs[1].case_id))["queue_position"] == 4
    first = await queue.claim(queue.new_owner(), 60)
    assert first.id == a_jobs[0].id
    # A has one running now: B and C go before A's second.
    assert (await queue.claim(queue.new_owner(), 60)).id == b_job.id
    assert (await queue.claim(queue.new_owner(), 60)).id == c_job.id
    assert (await queue.claim(queue.new_owner(), 60)).id == a_jobs[1].id
    # Concurrent claimers still never share a job.
    owners = [queue.new_owner() for _ in range(40)]
    got = await asyncio.gather(*(queue.claim(o, 60) for o in owners))
    ids = [j.id for j in got if j is not None]
    assert len(ids) == len(set(ids)) == 28
    assert await Job.filter(state="queued").count() == 0


def test_fair_claim_round_robin_by_owner(run_db):
    # Before: claims went strictly by job id, so user A's 30 went before B's and C's one.
    # Runs on SQLite and on a throwaway PostgreSQL server (FOR UPDATE SKIP LOCKED path).
    run_db(fair_order_scenario)


# -- 11. big unpaged lists off the event loop -------------------------------------------------

@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl as an outside client")
def test_big_unpaged_list_does_not_stall_other_requests(start_server, tmp_path, capsys):
    # Before: the unpaged list was read and joined on the event loop; three parallel reads
    # of ~30 MiB stalled every other request for about as long as one read took.
    server = start_server(make_settings(tmp_path))
    user = make_user()
    long_text = "Breathless on exertion, orthopnoea, ankle swelling. " * 380   # ~20 KB

    async def fill() -> None:
        now = datetime.now(timezone.utc)
        await Case.bulk_create([Case(case_id=str(uuid.uuid4()), user_id=user.id,
                                     patient_name=f"Patient {i}", patient_age=50,
                                     patient_gender="female", case_summary=long_text,
                                     status="completed", created_at=now, updated_at=now)
                                for i in range(1500)])

    server.run(fill(), timeout=120)
    with server.client(user.token) as c:
        assert c.get("/cases/all_cases", params={"limit": 1}).json()["total"] == 1500

    def fetch() -> float:
        # A client process of its own (curl): the test process's GIL is the server's alone.
        t0 = time.perf_counter()
        out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                              "-H", f"Authorization: Bearer {user.token}",
                              f"{server.url}/cases/all_cases"],
                             capture_output=True, text=True, timeout=120)
        assert out.stdout == "200", out
        return time.perf_counter() - t0

    one_read_s = fetch()

    async def probe(stop: threading.Event) -> float:
        worst = 0.0
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            worst = max(worst, time.perf_counter() - t - 0.005)
        return worst

    stop = threading.Event()
    lag = asyncio.run_coroutine_threadsafe(probe(stop), server.loop)
    time.sleep(0.1)

    readers = [threading.Thread(target=fetch) for _ in range(3)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(120)
    stop.set()
    worst = lag.result(30)
    with capsys.disabled():
        print(f"\n[limits] unpaged list of 1,500 long cases: one read {one_read_s:.3f} s; "
              f"worst event-loop stall during 3 parallel reads {worst:.3f} s")
    # The loop may be held only briefly compared with a read (writing the ~30 MiB response
    # still happens on the loop, ~0.2 s here), and never for a read's length: on the loop,
    # the read itself stalled everything for 1.6 s.
    assert worst < max(one_read_s / 2, 0.5), (worst, one_read_s)
