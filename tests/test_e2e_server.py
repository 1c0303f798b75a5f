"""End to end: the server started exactly as the README starts it (scripts/serve.sh), on a
loopback port, driven over HTTP; then stopped with SIGTERM and restarted on the same data."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import cli_token, free_port, kill_group, spawn_server, wait_healthy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_readme_server_end_to_end(tmp_path: Path) -> None:
    data, port, log = tmp_path / "data", free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    proc = spawn_server(data, port, log, cmd=["scripts/serve.sh"], MEDMITRA_LLM_WORKERS="1")
    try:
        health = wait_healthy(url, proc)
        assert health["database"]["status"] == "ok"
        banner = log.read_text()
        assert f"http://localhost:{port}/" in banner and str(data) in banner
        user = str(uuid.uuid4())
        h = {"Authorization": f"Bearer {cli_token(data, user)}"}
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
        kill_group(proc)

    proc = spawn_server(data, port, log, MEDMITRA_LLM_WORKERS="1")
    try:
        wait_healthy(url, proc)
        r = httpx.get(f"{url}/cases/cases/{case_id}", headers=h, timeout=10)
        assert r.status_code == 200 and r.json()["case"]["patient_name"] == "E2E Patient"
        assert r.json()["files"][0]["file_size"] == len(csv)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
