"""Case API benchmark (issue 13 item 1: GET case >= 0.50 and the 100-case list >= 0.35 of a
bare Sanic route, same run, one worker each).

Starts, in one run and on this machine:
  1. a bare Sanic app (one route returning a constant JSON), single process;
  2. the MedMitra server (single process, no analysis workers) on a fresh data dir with
     100 cases;
then drives each with wrk (50 connections, 2 threads), the routes in turn for several
rounds, and prints requests/s and latency percentiles (medians over the rounds), with the
ratio of each case route to the bare route: the median and each round's (their spread
shows how much the machine's other load moved the figures). Each round starts one route
later than the one before, so every route is measured at every place in a round equally
often when --rounds is a multiple of the number of routes: in a fixed order, a route's
place alone moved its ratio (two identical servers, measured 3rd and 4th in each round:
0.59 and 0.64; another pair 1st and 4th: 0.56 and 0.69). Last, it measures the
server's peak RSS growth while one 50 MiB DICOM file is uploaded (streamed to disk).

Usage: .venv/bin/python bench/api_bench.py [--duration 5] [--rounds 3] [--connections 50]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

from binary_bench import tree_cpu_s   # CPU seconds of a process and its children
from load import free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BARE_APP = """
from sanic import Sanic
from sanic.response import json
app = Sanic("bare")
app.config.ACCESS_LOG = False
@app.get("/")
async def root(request):
    return json({"message": "MedMitra Backend API is running!"})
if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(__import__("sys").argv[1]), single_process=True,
            access_log=False, motd=False)
"""


def wait_up(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


# With two or more cores, the servers run on one core and wrk on another, so a route's
# requests/s is what one core serves and does not move with how the scheduler happened to
# share the cores between wrk and the server in that run.
PIN = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
SERVER_CPU, LOAD_CPU = "1", "0"


def pinned(cmd: list[str], cpu: str) -> list[str]:
    return ["taskset", "-c", cpu, *cmd] if PIN else cmd


def wrk(url: str, duration_s: int, connections: int, token: str | None,
        pid: int | None = None) -> dict[str, float]:
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{duration_s}s", "--latency", url]
    if token:
        cmd[1:1] = ["-H", f"Authorization: Bearer {token}"]
    cmd = pinned(cmd, LOAD_CPU)
    cpu0 = tree_cpu_s(pid) if pid is not None else 0.0
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    cpu = tree_cpu_s(pid) - cpu0 if pid is not None else 0.0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    done = int(re.search(r"(\d+) requests in", out).group(1))

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out)
        val, unit = float(m.group(1)), m.group(2)
        return val / 1000 if unit == "us" else val * 1000 if unit == "s" else val

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p50_ms": pct("50"), "p99_ms": pct("99"),
            # The server's CPU per request: unlike req/s, it does not move when the
            # machine's other load (or the VM's neighbours) takes time from the server.
            "cpu_us": 1e6 * cpu / max(done, 1) if pid is not None else 0.0,
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": errors.group(1) if errors else ""}


def profile(pid: int, name: str, load, top: int) -> None:
    """Sample the server with py-spy while ``load()`` runs; print the functions with the
    most samples, by own time (the frame on top) and by inclusive time (anywhere on the
    stack). Idle samples (the event loop waiting in select/epoll) are counted apart."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    with tempfile.NamedTemporaryFile(suffix=".txt") as out:
        rec = subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "250",
                                "--format", "raw", "--output", out.name, "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)   # py-spy attaches
        load()
        rec.send_signal(signal.SIGINT)
        rec.wait(30)
        own: dict[str, int] = {}
        incl: dict[str, int] = {}
        total = idle = 0
        for line in Path(out.name).read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack:
                continue
            n = int(count)
            # "func (file.py:123)" -> "func (file.py)": one entry per function, not per line
            frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
            total += n
            if frames[-1].startswith(("select (", "poll (", "_run_once (", "run_once (")):
                idle += n
                continue
            own[frames[-1]] = own.get(frames[-1], 0) + n
            for f in set(frames):
                incl[f] = incl.get(f, 0) + n
    busy = max(total - idle, 1)
    print(f"\nprofile of {name}: {total} samples, {100 * idle / max(total, 1):.0f}% idle "
          f"(event loop waiting); shares below are of the {busy} busy samples")
    for title, table in (("own time", own), ("inclusive", incl)):
        print(f"  top {top} by {title}:")
        for frame, n in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            print(f"    {100 * n / busy:5.1f}%  {frame}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def make_dicom(size_bytes: int, path: Path) -> None:
    """A valid DICOM file of about size_bytes (uint16 pixel data), written without
    holding a second copy in memory."""
    import numpy as np
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    side = int((size_bytes / 2) ** 0.5)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.Rows, ds.Columns = "CT", side, side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(side * side, dtype=np.uint16) % 4096).tobytes()
    ds.save_as(path, enforce_file_format=True)


def add_analysed_case(api: str, headers: dict[str, str], data_dir: Path, answer: Path) -> str:
    """A new case with an ai_insights row holding the insights of a saved answer (written
    straight into the database, as the pipeline's last stage writes it); its case_id."""
    import json
    import sqlite3
    from datetime import datetime, timezone

    nested = json.loads(answer.read_text(encoding="utf-8"))["insights"]
    model = {"name": nested.pop("model", None) or "bench", "file": "bench.gguf"}
    stages = [{"stage": k, "duration_s": v} for k, v in (nested.pop("timings", None)
                                                           or {}).items()]
    nested.pop("generated_at", None)
    with httpx.Client(base_url=api, headers=headers, timeout=30) as c:
        r = c.post("/cases/create_case", data={"patient_name": "Bench Analysed",
                                               "patient_age": "61", "patient_gender": "male"})
        r.raise_for_status()
        case = r.json()["case"]
    now = datetime.now(timezone.utc).isoformat(sep=" ")
    db = sqlite3.connect(data_dir / "medmitra.sqlite3")
    try:
        db.execute('INSERT INTO "ai_insights" ("case_id", "data", "model", "stages", '
                   '"generated_at", "created_at", "updated_at") VALUES (?, ?, ?, ?, ?, ?, ?)',
                   (case["id"], json.dumps(nested), json.dumps(model), json.dumps(stages),
                    now, now, now))
        db.commit()
    finally:
        db.close()
    return case["case_id"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--rounds", type=int, default=6,
                    help="rounds of every route, each round in a rotated order (a multiple "
                         "of the number of routes, 6 or 7, puts each route at each place)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="then profile the server with py-spy during one more run of each "
                         "case route and print the N top functions (pip install py-spy)")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--insights", type=Path, metavar="FILE",
                    help="also read a case analysed with these insights: one answer that "
                         "bench/clinical_eval.py --dump DIR wrote (a real model's output)")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install wrk")
    tmp = Path(tempfile.mkdtemp(prefix="medmitra-bench-"))
    procs: list[subprocess.Popen] = []
    try:
        bare_port = free_port()
        (tmp / "bare.py").write_text(BARE_APP)
        bare_proc = subprocess.Popen(pinned([sys.executable, str(tmp / "bare.py"), str(bare_port)],
                                            SERVER_CPU),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(bare_proc)
        port = free_port()
        env = {**os.environ, "MEDMITRA_STORAGE_DATA_DIR": str(tmp / "data"),
               "MEDMITRA_SERVER_PORT": str(port), "MEDMITRA_LLM_WORKERS": "0",
               "MEDMITRA_LOG_LEVEL": "WARNING",
               # The bench's one user uploads many files; each upload queues an analysis.
               "MEDMITRA_JOBS_MAX_QUEUED_PER_USER": "1000000",
               "MEDMITRA_LIMITS_RADIOLOGY_MAX_BYTES": str(60 * 1024 * 1024)}
        server = subprocess.Popen(pinned([sys.executable, "-m", "medmitra", "serve"], SERVER_CPU),
                                  cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(server)
        bare, api = f"http://127.0.0.1:{bare_port}", f"http://127.0.0.1:{port}"
        wait_up(bare + "/")
        wait_up(api + "/health")
        user = str(uuid.uuid4())
        token = subprocess.run([sys.executable, "-m", "medmitra", "token", "create",
                                "--user-id", user, "--data-dir", str(tmp / "data")], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        h = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=api, headers=h, timeout=30) as c:
            first = None
            for i in range(100):
                r = c.post("/cases/create_case", data={"patient_name": f"Bench {i}",
                                                       "patient_age": str(20 + i % 60),
                                                       "patient_gender": "female"})
                r.raise_for_status()
                first = first or r.json()["case"]["case_id"]
        analysed = add_analysed_case(api, h, tmp / "data", args.insights) \
            if args.insights else None
        print(f"machine: {os.cpu_count()} cores; "
              f"{'servers on CPU ' + SERVER_CPU + ', wrk on CPU ' + LOAD_CPU + '; ' if PIN else ''}"
              f"wrk -t2 -c{args.connections} -d{args.duration}s, "
              f"{args.rounds} rounds (all routes in turn, each round starting one route later; "
              f"each ratio compares runs "
              f"seconds apart under the same machine load)")
        pids: dict[str, int] = {}   # the server of each route, where not `server`
        routes = {"bare GET /": (bare + "/", None),
                  "GET /cases/cases/{id}": (f"{api}/cases/cases/{first}", token),
                  "GET /cases/all_cases (100)": (f"{api}/cases/all_cases", token)}
        if analysed:
            routes["GET analysed case"] = (f"{api}/cases/cases/{analysed}", token)
        # Audit trail (ops/audit.py): the server above has it on ("batch", the default);
        # more servers on the same data dir read the same case with it in "ack" mode, off,
        # and off with /metrics off too (what auth, the read and the headers cost alone).
        for label, extra in (("ack", {"MEDMITRA_AUDIT_DURABILITY": "ack"}),
                             ("off", {"MEDMITRA_AUDIT_ENABLED": "false"}),
                             ("+metrics off", {"MEDMITRA_AUDIT_ENABLED": "false",
                                               "MEDMITRA_METRICS_ENABLED": "false"})):
            p2 = free_port()
            procs.append(subprocess.Popen(
                pinned([sys.executable, "-m", "medmitra", "serve"], SERVER_CPU), cwd=ROOT,
                env={**env, **extra, "MEDMITRA_SERVER_PORT": str(p2)},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_up(f"http://127.0.0.1:{p2}/health")
            routes[f"GET case, audit {label}"] = (
                f"http://127.0.0.1:{p2}/cases/cases/{first}", token)
            pids[f"GET case, audit {label}"] = procs[-1].pid
        pids["bare GET /"] = bare_proc.pid
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in routes}
        names = list(routes)
        for i in range(args.rounds):
            start = i % len(names)          # rotated: see the module docstring
            for name in names[start:] + names[:start]:
                url, tok = routes[name]
                runs[name].append(wrk(url, args.duration, args.connections, tok,
                                      pids.get(name, server.pid)))
        print(f"{'route':30} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>6} "
              f"{'ratio per round':>22} {'CPU us/req':>10} {'CPU ratio':>9}  errors")
        bare_runs = runs["bare GET /"]
        for name, rs in runs.items():
            ratios = [r["rps"] / b["rps"] for r, b in zip(rs, bare_runs)]
            med = statistics.median
            print(f"{name:30} {med(r['rps'] for r in rs):9.0f} "
                  f"{med(r['p50_ms'] for r in rs):8.2f} {med(r['p99_ms'] for r in rs):8.2f} "
                  f"{med(ratios):6.2f} {' '.join(f'{x:.2f}' for x in ratios):>22} "
                  f"{med(r['cpu_us'] for r in rs):10.1f} "
                  f"{med(b['cpu_us'] for b in bare_runs) / med(r['cpu_us'] for r in rs):9.2f}  "
                  f"non2xx={sum(r['non2xx'] for r in rs)} "
                  f"{'; '.join(str(r['socket_errors']) for r in rs if r['socket_errors'])}")

        for name, goal in (("GET /cases/cases/{id}", 0.50), ("GET /cases/all_cases (100)", 0.35)):
            ratios = [r["rps"] / b["rps"] for r, b in zip(runs[name], bare_runs)]
            cpu = statistics.median(b["cpu_us"] for b in bare_runs) / \
                statistics.median(r["cpu_us"] for r in runs[name])
            print(f"{name} / bare: median {statistics.median(ratios):.2f}, rounds "
                  f"{min(ratios):.2f}-{max(ratios):.2f} (goal >= {goal:.2f}); by server CPU "
                  f"per request {cpu:.2f}; load average "
                  f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        off = statistics.median(r["rps"] for r in runs["GET case, audit off"])
        for label, name in (("on (batch)", "GET /cases/cases/{id}"),
                            ("ack", "GET case, audit ack")):
            print(f"audit trail {label} / off on GET case: "
                  f"{statistics.median(r['rps'] for r in runs[name]) / off:.2f} (goal >= 0.90)")

        if args.profile:
            profile(bare_proc.pid, "bare GET /", lambda: wrk(
                bare + "/", args.duration, args.connections, None), args.profile)
            for name, (url, tok) in routes.items():
                if name != "bare GET /":
                    profile(pids.get(name, server.pid), name, lambda u=url, t=tok: wrk(
                        u, args.duration, args.connections, t), args.profile)

        # Peak RSS growth while streaming one 50 MiB DICOM upload.
        dcm = tmp / "big.dcm"
        make_dicom(50 * 1024 * 1024, dcm)
        with httpx.Client(base_url=api, headers=h, timeout=120) as c:
            for _ in range(3):   # warm the code path so its imports are not counted
                c.get(f"/cases/cases/{first}")
            idle = rss_kib(server.pid)
            peak = idle
            stop = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not stop.is_set():
                    peak = max(peak, rss_kib(server.pid))
                    time.sleep(0.005)

            t = threading.Thread(target=sample)
            t.start()
            with dcm.open("rb") as fh:
                r = c.post("/cases/upload", data={"case_id": first, "category": "radiology"},
                           files={"file": ("big.dcm", fh, "application/dicom")})
            stop.set()
            t.join()
            r.raise_for_status()
        size_mib = dcm.stat().st_size / 2**20
        print(f"upload of a {size_mib:.1f} MiB DICOM: idle RSS {idle / 1024:.1f} MiB, peak "
              f"{peak / 1024:.1f} MiB, growth {(peak - idle) / 1024:.1f} MiB "
              f"(goal < 20 MiB; ratio to file size {(peak - idle) / 1024 / size_mib:.2f})")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
