"""End to end: the server started exactly as the README starts it (scripts/serve.sh), on a
loopback port, driven over HTTP; then stopped with SIGTERM and restarted on the same data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _start(cmd: list[str], data: Path, port: int, log: Path, **env: str) -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MEDMITRA_")}
    full_env.update({"MEDMITRA_STORAGE_DATA_DIR": str(data), "MEDMITRA_SERVER_PORT": str(port),
                     "MEDMITRA_LLM_WORKERS": "1"}, **env)
    with log.open("ab") as out:   # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_health(url: str, proc: subprocess.Popen, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early with {proc.returncode}")
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.2)   # polling a process that is starting, not covering a race
    raise AssertionError("server did not become healthy")


def _token(data: Path, user: str) -> str:
    out = subprocess.run([sys.executable, "-m", "medmitra", "token", "create", "--user-id", user,
                          "--data-dir", str(data)], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_readme_server_end_to_end(tmp_path: Path) -> None:
    data, port, log = tmp_path / "data", free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    proc = _start(["scripts/serve.sh"], data, port, log)
    try:
        health = _wait_health(url, proc)
        assert health["database"]["status"] == "ok"
        banner = log.read_text()
        assert f"http://localhost:{port}/" in banner and str(data) in banner
        user = str(uuid.uuid4())
        h = {"Authorization": f"Bearer {_token(data, user)}"}
        csv = b"test,value,unit,reference_range\nHemoglobin,9.1,g/dL,13.5-17.5\n"
        r = httpx.post(f"{url}/cases/create_case", headers=h, timeout=30,
                       data={"patient_name": "E2E Patient", "patient_age": "61",
                             "patient_gender": "female", "case_summary": "fatigue"},
                       files=[("lab_files", ("labs.csv", csv, "text/csv"))])
        assert r.status_code == 201, r.text
        case_id = r.json()["case"]["case_id"]
        file_url = r.json()["uploaded_files"][0]["file_url"]
        assert httpx.get(file_url, timeout=10).content == csv
        assert httpx.get(f"{url}/cases/all_cases", headers=h).json()["total"] == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        # Nothing printed above DEBUG may carry the patient's name or notes.
        text = log.read_text()
        assert "E2E Patient" not in text and "fatigue" not in text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    proc = _start([sys.executable, "-m", "medmitra", "serve"], data, port, log)
    try:
        _wait_health(url, proc)
        r = httpx.get(f"{url}/cases/cases/{case_id}", headers=h, timeout=10)
        assert r.status_code == 200 and r.json()["case"]["patient_name"] == "E2E Patient"
        assert r.json()["files"][0]["file_size"] == len(csv)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
