"""Backup and restore benchmark (issue 12): a data dir of 1,000 cases with 2,000 files.

Starts the server (single process, no analysis workers), creates the cases through the API
(each with one lab CSV and one radiology PNG of incompressible pixels), then times, on this
machine and in this run:
  - baseline: a plain recursive copy of the data dir (shutil.copytree);
  - `medmitra backup` (VACUUM INTO + hashed copies + manifest) while the server runs;
  - `medmitra backup verify`;
  - `medmitra restore` into a new data dir (verify + copy + re-hash + migrate);
and prints sizes, times and each time's ratio to the baseline copy.

Usage: .venv/bin/python bench/ops_bench.py [--cases 1000] [--image-kib 96]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.api_bench import free_port, wait_up  # noqa: E402


def png(seed: int, kib: int) -> bytes:
    """A grey PNG whose pixels are random (does not compress): about kib KiB."""
    side = int((kib * 1024) ** 0.5)
    raw = b"".join(b"\x00" + os.urandom(side) for _ in range(side))
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))
    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 1))
            + chunk(b"IEND", b""))


def csv(i: int) -> bytes:
    return ("Test Name,Result,Units,Reference Range,Flag\r\n"
            f"Hemoglobin,{9 + i % 7}.{i % 10},g/dL,13.5-17.5,\r\n"
            f"WBC,{4 + i % 9}.1,10^3/uL,4.0-11.0,\r\nCase,{i},,,\r\n").encode()


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--image-kib", type=int, default=96)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="medmitra-opsbench-"))
    data = tmp / "data"
    port = free_port()
    env = {**os.environ, "MEDMITRA_STORAGE_DATA_DIR": str(data),
           "MEDMITRA_SERVER_PORT": str(port), "MEDMITRA_LLM_WORKERS": "0",
           "MEDMITRA_LOG_LEVEL": "WARNING"}
    server = subprocess.Popen([sys.executable, "-m", "medmitra", "serve"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        api = f"http://127.0.0.1:{port}"
        wait_up(api + "/health")
        token = subprocess.run([sys.executable, "-m", "medmitra", "token", "create",
                                "--user-id", str(uuid.uuid4()), "--data-dir", str(data)],
                               cwd=ROOT, capture_output=True, text=True, check=True
                               ).stdout.strip()
        t0 = time.perf_counter()

        def create(i: int) -> None:
            with httpx.Client(base_url=api, timeout=60,
                              headers={"Authorization": f"Bearer {token}"}) as c:
                r = c.post("/cases/create_case",
                           data={"patient_name": f"Bench {i}", "patient_age": "40",
                                 "patient_gender": "male"},
                           files=[("lab_files", (f"lab-{i}.csv", csv(i), "text/csv")),
                                  ("radiology_files", (f"img-{i}.png",
                                                       png(i, args.image_kib), "image/png"))])
                r.raise_for_status()

        with ThreadPoolExecutor(4) as ex:
            list(ex.map(create, range(args.cases)))
        made_s = time.perf_counter() - t0
        n_files = sum(1 for _ in (data / "files").glob("*/*"))
        data_bytes = du(data)
        print(f"machine: {os.cpu_count()} cores; {args.cases} cases, {n_files} files, data dir "
              f"{data_bytes / 1e6:.1f} MB (made in {made_s:.1f} s through the API)")

        t0 = time.perf_counter()
        shutil.copytree(data, tmp / "plain-copy")
        base_s = time.perf_counter() - t0
        shutil.rmtree(tmp / "plain-copy")
        py = [sys.executable, "-m", "medmitra"]
        backup = tmp / "backup"
        backup_s = timed(py + ["backup", "--to", str(backup), "--data-dir", str(data),
                               "--quiet"])
        verify_s = timed(py + ["backup", "verify", str(backup), "--quiet"])
        restore_s = timed(py + ["restore", str(backup), "--data-dir", str(tmp / "restored"),
                                "--quiet"])
        rows = [("plain copy (baseline)", base_s, data_bytes),
                ("medmitra backup (server running)", backup_s, du(backup)),
                ("medmitra backup verify", verify_s, du(backup)),
                ("medmitra restore", restore_s, du(tmp / "restored"))]
        print(f"{'step':36} {'seconds':>8} {'MB':>9} {'MB/s':>7} {'ratio':>6}")
        for name, s, size in rows:
            print(f"{name:36} {s:8.2f} {size / 1e6:9.1f} {size / 1e6 / s:7.1f} "
                  f"{s / base_s:6.2f}")
        db = backup / "medmitra.sqlite3"
        print(f"backup database {db.stat().st_size / 1e6:.2f} MB, manifest "
              f"{(backup / 'manifest.json').stat().st_size / 1e3:.0f} kB")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
