"""Mixed-traffic load run: N concurrent clients for T seconds against one server.

Each client loops over a weighted mix of create (with a small file), list, get, update,
delete, download and upload, as one of a few users. Every answer other than the expected
status is an error; transport failures are errors too. At the end it prints, per
operation, requests, errors, p50 and p99 latency, and (``--json``) writes the same figures.
The run is bounded: it stops after ``--duration`` seconds (requests in flight are awaited
with a timeout) or ``--max-requests``, whichever comes first.

Without ``--url`` it starts its own server process (``python -m medmitra serve``, one
analysis worker with the default model, so analyses run in the background) on a fresh data
dir, and checks the server log for "database is locked" afterwards.

Usage:
  .venv/bin/python bench/load.py                       # 50 clients, 60 s, own server
  .venv/bin/python bench/load.py --clients 50 --duration 15 --url http://127.0.0.1:8000 \\
      --secret <the server's auth.jwt_secret>
Exit status: 0 when there were no errors, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from medmitra.auth.jwt import issue_token  # noqa: E402

USERS = 5
HTTP_TIMEOUT_S = 30.0
# Requests still in flight when the time is up get this long to finish.
DRAIN_S = 30.0
START_TIMEOUT_S = 180.0
# (operation, weight): reads dominate, as in a clinic.
MIX = [("list", 30), ("get", 25), ("create", 12), ("update", 10), ("download", 10),
       ("upload", 5), ("delete", 5), ("analyze", 3)]
CSV = (b"Test Name,Result,Units,Reference Range,Flag\r\n"
       b"Hemoglobin,9.1,g/dL,13.5-17.5,L\r\nWBC,7.2,10^3/uL,4.0-11.0,\r\n")


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)

    def record(self, op: str, seconds: float, ok: bool, detail: str = "") -> None:
        self.latencies.setdefault(op, []).append(seconds)
        if not ok:
            self.errors[op] = self.errors.get(op, 0) + 1
            if len(self.samples) < 20:
                self.samples.append(f"{op}: {detail}"[:300])

    def summary(self) -> dict:
        ops = {}
        for op, lat in sorted(self.latencies.items()):
            ops[op] = {"requests": len(lat), "errors": self.errors.get(op, 0),
                       "p50_ms": round(_pct(lat, 50) * 1000, 1),
                       "p99_ms": round(_pct(lat, 99) * 1000, 1)}
        every = [x for lat in self.latencies.values() for x in lat]
        return {"requests": len(every), "errors": sum(self.errors.values()),
                "p50_ms": round(_pct(every, 50) * 1000, 1),
                "p99_ms": round(_pct(every, 99) * 1000, 1),
                "operations": ops, "error_samples": self.samples}


def _pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


class Client:
    """One simulated user session; keeps track of the cases and files it made."""

    def __init__(self, http: httpx.AsyncClient, token: str, rng: random.Random,
                 stats: Stats):
        self.http, self.rng, self.stats = http, rng, stats
        self.h = {"Authorization": f"Bearer {token}"}
        self.cases: list[str] = []
        self.file_urls: dict[str, list[str]] = {}   # case_id -> signed links of its files

    async def call(self, op: str, method: str, url: str, expect: tuple[int, ...],
                   **kw) -> httpx.Response | None:
        started = time.perf_counter()
        try:
            r = await self.http.request(method, url, headers=kw.pop("headers", self.h), **kw)
        except httpx.HTTPError as exc:
            self.stats.record(op, time.perf_counter() - started, False, repr(exc))
            return None
        ok = r.status_code in expect
        self.stats.record(op, time.perf_counter() - started, ok,
                          f"{r.status_code} {r.text[:200]}")
        return r if ok else None

    async def step(self) -> None:
        ops, weights = zip(*MIX)
        op = self.rng.choices(ops, weights)[0]
        if not self.cases and op not in ("list", "create"):
            op = "create"
        if op == "create":
            r = await self.call("create", "POST", "/cases/create_case", (201,), data={
                "patient_name": f"Load {self.rng.randint(1, 10**6)}",
                "patient_age": str(self.rng.randint(0, 99)), "patient_gender": "female",
                "case_summary": "load test"},
                files=[("lab_files", ("labs.csv", CSV, "text/csv"))])
            if r is not None:
                body = r.json()
                self.cases.append(body["case"]["case_id"])
                self.file_urls[body["case"]["case_id"]] = [
                    f["file_url"] for f in body["uploaded_files"]]
        elif op == "list":
            await self.call("list", "GET", "/cases/all_cases", (200,),
                            params={"limit": "20", "page": "1"})
        elif op == "get":
            await self.call("get", "GET", f"/cases/cases/{self.rng.choice(self.cases)}", (200,))
        elif op == "update":
            await self.call("update", "PUT", f"/cases/cases/{self.rng.choice(self.cases)}",
                            (200,), json={"case_summary": f"note {self.rng.random():.6f}"})
        elif op == "download":
            links = [u for urls in self.file_urls.values() for u in urls]
            if links:
                await self.call("download", "GET", self.rng.choice(links), (200,), headers={})
        elif op == "upload":
            case_id = self.rng.choice(self.cases)
            r = await self.call("upload", "POST", "/cases/upload", (201,),
                                data={"case_id": case_id, "category": "lab"},
                                files=[("file", ("more.csv", CSV, "text/csv"))])
            if r is not None:
                self.file_urls[case_id] += [f["file_url"] for f in r.json()["files"]]
        elif op == "analyze":
            await self.call("analyze", "POST", f"/cases/analyze/{self.rng.choice(self.cases)}",
                            (200,), json={})
        elif op == "delete":
            case_id = self.cases.pop(self.rng.randrange(len(self.cases)))
            # Its files go with it: their links are dropped before the delete is sent.
            self.file_urls.pop(case_id, None)
            await self.call("delete", "DELETE", f"/cases/cases/{case_id}", (200,))


async def run_load(url: str, tokens: list[str], clients: int, duration_s: float,
                   seed: int, max_requests: int) -> dict:
    stats = Stats()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    deadline = time.monotonic() + duration_s
    async with httpx.AsyncClient(base_url=url, timeout=HTTP_TIMEOUT_S, limits=limits) as http:
        async def one(i: int) -> None:
            client = Client(http, tokens[i % len(tokens)], random.Random(seed * 1000 + i), stats)
            while time.monotonic() < deadline and \
                    sum(len(v) for v in stats.latencies.values()) < max_requests:
                await client.step()

        started = time.monotonic()
        tasks = [asyncio.create_task(one(i)) for i in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=duration_s + DRAIN_S)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for t in done:
            if t.exception() is not None:
                stats.record("client", 0.0, False, repr(t.exception()))
        elapsed = time.monotonic() - started
    out = stats.summary()
    out.update({"clients": clients, "duration_s": round(elapsed, 2),
                "requests_per_s": round(out["requests"] / max(elapsed, 1e-9), 1),
                "stuck_clients": len(pending)})
    if pending:
        out["errors"] += len(pending)
    return out


def print_summary(s: dict) -> None:
    print(f"load: {s['clients']} clients, {s['duration_s']} s: {s['requests']} requests "
          f"({s['requests_per_s']}/s), {s['errors']} errors, p50 {s['p50_ms']} ms, "
          f"p99 {s['p99_ms']} ms")
    print(f"  {'operation':10s} {'requests':>9s} {'errors':>7s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for op, o in s["operations"].items():
        print(f"  {op:10s} {o['requests']:9d} {o['errors']:7d} {o['p50_ms']:8.1f} "
              f"{o['p99_ms']:8.1f}")
    for line in s["error_samples"]:
        print(f"  error: {line}")


# ------------------------------------------------------------------ own server

def free_port() -> int:
    """A loopback port free now (the benchmarks' and tests' servers bind it next)."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(data: Path, log: Path, secret: str, port: int,
                 extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDMITRA_")}
    env.update({"MEDMITRA_STORAGE_DATA_DIR": str(data), "MEDMITRA_SERVER_PORT": str(port),
                "MEDMITRA_AUTH_JWT_SECRET": secret, "MEDMITRA_LLM_WORKERS": "1",
                "MEDMITRA_STORAGE_MIN_FREE_BYTES": "0",
                # A few users making hundreds of analyses in seconds: the per-user queue
                # limit (429, tested on its own) would turn most of them into refusals.
                "MEDMITRA_JOBS_MAX_QUEUED_PER_USER": "100000"})
    env.update(extra_env or {})
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "medmitra", "serve"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, *, model: bool = True) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early with {proc.returncode}")
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            if r.status_code == 200 and (not model or r.json()["model"]["state"] == "ready"):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not become ready")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="server to load (default: start one)")
    ap.add_argument("--secret", help="the server's JWT secret, to mint user tokens")
    ap.add_argument("--token", action="append", default=[], help="a user token (repeatable)")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds")
    ap.add_argument("--max-requests", type=int, default=2_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="write the summary to this file")
    args = ap.parse_args(argv)

    proc, log, tmp = None, None, None
    url, secret = args.url, args.secret
    if url is None:
        tmp = tempfile.TemporaryDirectory(prefix="medmitra-load-")
        secret = "load-secret-" + uuid.uuid4().hex * 2
        log, port = Path(tmp.name) / "server.log", free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(Path(tmp.name) / "data", log, secret, port)
        wait_ready(url, proc)
    try:
        tokens = list(args.token)
        if secret:
            tokens += [issue_token(secret, user_id=str(uuid.uuid4()), expires_in_s=86400)
                       for _ in range(USERS)]
        if not tokens:
            ap.error("give --secret or --token when using --url")
        summary = asyncio.run(run_load(url, tokens, args.clients, args.duration, args.seed,
                                       args.max_requests))
        if log is not None:
            summary["database_locked"] = log.read_text(errors="replace").count(
                "database is locked")
            summary["errors"] += summary["database_locked"]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if tmp is not None:
            tmp.cleanup()
    print_summary(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
