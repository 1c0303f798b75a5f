"""Issue 11, data at rest, logs, headers and no 500s: private files whatever the umask,
an access log without queries or tokens, no caching of patient data, links from a trusted
base, a narrower trust mode, and 400 (never 500) for hostile query values and bodies."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

import docfactory as df
from conftest import ROOT, TEST_SECRET, free_port, make_settings, make_user
from medmitra.config import ConfigError

pytestmark = [pytest.mark.e2e]

PATIENT = {"patient_name": "Asha Rao", "patient_age": "52", "patient_gender": "female",
           "case_summary": "Breathless on exertion"}


def create_case(c: httpx.Client) -> dict[str, Any]:
    r = c.post("/cases/create_case", data=PATIENT,
               files=[("lab_files", ("labs.csv", df.lab_csv(), "text/csv"))])
    assert r.status_code == 201, r.text
    return r.json()


def modes(root: Path) -> dict[str, int]:
    out = {}
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            out[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return out


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)          # the common default that made files world-readable
    try:
        yield
    finally:
        os.umask(old)


# -- 12. private files ------------------------------------------------------------------------

def test_data_dir_database_and_uploads_are_private_whatever_the_umask(
        start_server, tmp_path, alice, loose_umask):
    # Before: 0755 directories and 0644 files, readable by every local account.
    server = start_server(make_settings(tmp_path))
    with server.client(alice.token) as c:
        create_case(c)
    data = server.settings.data_path
    found = modes(data)
    assert "medmitra.sqlite3" in found and "medmitra.sqlite3-wal" in found
    assert any(k.startswith("files/") and k.count("/") == 2 for k in found)
    loose = {k: oct(v) for k, v in found.items() if v & 0o077}
    assert loose == {}


def test_existing_loose_install_is_tightened_at_start_with_a_log_line(
        start_server, tmp_path, loose_umask, caplog):
    from medmitra.cli import main

    settings = make_settings(tmp_path)
    data = settings.data_path
    assert main(["migrate", "--data-dir", str(data)]) == 0
    stored = data / "files" / "ab" / str(uuid.uuid4())    # what an older version left
    stored.parent.mkdir(parents=True)
    stored.write_bytes(b"lab report")
    for path in [data, *data.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    caplog.set_level("WARNING", logger="medmitra.filemodes")
    start_server(settings)
    assert {k: oct(v) for k, v in modes(data).items() if v & 0o077} == {}
    assert any("tightened the permissions" in r.getMessage() for r in caplog.records)


# -- 13. access log: route templates, never queries or tokens ----------------------------------

def _serve(tmp_path: Path, **env: str) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = tmp_path / "server.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MEDMITRA_")}
    full_env.update({"MEDMITRA_STORAGE_DATA_DIR": str(tmp_path / "data"),
                     "MEDMITRA_SERVER_PORT": str(port), "MEDMITRA_LLM_WORKERS": "0",
                     "MEDMITRA_AUTH_JWT_SECRET": TEST_SECRET,
                     "MEDMITRA_STORAGE_MIN_FREE_BYTES": "0"}, **env)
    config = tmp_path / "empty.toml"
    config.write_text("", encoding="utf-8")
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "medmitra", "serve", "--config",
                                 str(config)], cwd=ROOT, env=full_env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url, log
        except httpx.TransportError:
            pass
        time.sleep(0.2)    # polling a process that is starting
    raise AssertionError("server did not start")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_access_log_holds_route_templates_not_queries_or_signed_links(tmp_path):
    # Before: with server.access_log = true Sanic logged every full URL: ?search=<patient
    # name> and the signed download token.
    proc, url, log = _serve(tmp_path, MEDMITRA_SERVER_ACCESS_LOG="true")
    try:
        user = make_user()
        h = {"Authorization": f"Bearer {user.token}"}
        with httpx.Client(base_url=url, headers=h, timeout=30) as c:
            body = create_case(c)
            link = body["uploaded_files"][0]["file_url"]
            link_token = link.rsplit("/", 1)[1]
            assert c.get("/cases/all_cases", params={"search": "Asha Rao"}).status_code == 200
            assert httpx.get(link, timeout=10).status_code == 200
            case_uuid = body["case"]["case_id"]
            assert c.get(f"/cases/cases/{case_uuid}").status_code == 200
    finally:
        _stop(proc)
    text = log.read_text()
    assert "GET /cases/all_cases 200" in text
    assert "GET /files/download/<token:str> 200 -" in text
    # (Case UUIDs are opaque ids the service log names on purpose.)
    for secret in ("Asha", "search=", link_token, user.token):
        assert secret not in text, secret


# -- 14. no caching of patient data ---------------------------------------------------------

def test_api_responses_are_not_cached_and_not_sniffed(server, alice):
    # Before: no Cache-Control and no nosniff on the JSON API answers.
    with server.client(alice.token) as c:
        body = create_case(c)
        case_id = body["case"]["case_id"]
        file_id = body["uploaded_files"][0]["file_id"]
        answers = [c.get("/cases/all_cases"), c.get(f"/cases/cases/{case_id}"),
                   c.get(f"/cases/files/{case_id}"), c.get(f"/cases/file/{file_id}"),
                   c.put(f"/cases/cases/{case_id}", json={"patient_age": 53}),
                   c.get("/cases/cases/999999"), c.get("/cases/all_cases",
                                                       headers={"Authorization": "Bearer x"})]
        for r in answers:
            assert r.headers.get("cache-control") == "no-store", (r.request.url, r.headers)
            assert r.headers.get("x-content-type-options") == "nosniff"
        # The public key set keeps its own caching.
        jwks = c.get("/auth/v1/.well-known/jwks.json")
        assert "max-age" in jwks.headers["cache-control"]


# -- 15. links from a trusted base ---------------------------------------------------------

def test_file_links_ignore_a_foreign_host_header(start_server, tmp_path, alice):
    # Before: Host: evil.example made file_url point at evil.example.
    server = start_server(make_settings(tmp_path))     # a real socket: its own address
    with server.client(alice.token) as c:
        body = create_case(c)
        case_id = body["case"]["case_id"]
        r = c.get(f"/cases/cases/{case_id}", headers={"Host": "evil.example"})
        url = r.json()["files"][0]["file_url"]
        assert "evil.example" not in url
        port = server.url.rsplit(":", 1)[1]
        assert url.startswith(f"http://127.0.0.1:{port}/files/download/")
        assert httpx.get(url, timeout=10).status_code == 200
        # This machine's own names are kept (a clinician typed them).
        r = c.get(f"/cases/cases/{case_id}", headers={"Host": f"localhost:{port}"})
        assert r.json()["files"][0]["file_url"].startswith(f"http://localhost:{port}/")


def test_configured_public_url_is_used_for_links(start_server, tmp_path, alice):
    server = start_server(make_settings(tmp_path, server={
        "public_url": "http://clinic-server:8000/"}))
    with server.client(alice.token) as c:
        body = create_case(c)
        assert body["uploaded_files"][0]["file_url"].startswith(
            "http://clinic-server:8000/files/download/")


# -- 16. trust mode is narrower -------------------------------------------------------------

def test_trust_mode_refuses_cors_wildcard_at_start(start_server, tmp_path):
    with pytest.raises(ConfigError) as err:
        start_server(make_settings(tmp_path, auth={"trust_user_id": True}))
    assert "auth.trust_user_id" in str(err.value) and "server.cors_origins" in str(err.value)


@pytest.mark.slow
def test_serve_with_trust_mode_and_cors_wildcard_exits_with_both_keys(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[auth]\ntrust_user_id = true\n[server]\ncors_origins = "*"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDMITRA_")}
    out = subprocess.run([sys.executable, "-m", "medmitra", "serve", "--config", str(config),
                          "--data-dir", str(tmp_path / "d"), "--port", "0"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "auth.trust_user_id" in out.stderr and "server.cors_origins" in out.stderr


def test_trust_mode_accepts_only_canonical_non_nil_uuids(start_server, tmp_path):
    server = start_server(make_settings(tmp_path, auth={"trust_user_id": True},
                                       server={"cors_origins": "http://frontend.clinic"}))
    uid = str(uuid.uuid4())
    with server.client() as c:
        assert c.get("/cases/all_cases", headers={"Authorization": f"Bearer {uid}"}
                     ).status_code == 200
        assert c.get("/cases/all_cases", params={"user_id": uid}).status_code == 200
        for spelling in (str(uuid.UUID(int=0)), uid.replace("-", ""), "{" + uid + "}",
                         f"urn:uuid:{uid}", uid.upper().replace("-", "")):
            r = c.get("/cases/all_cases", headers={"Authorization": f"Bearer {spelling}"})
            assert r.status_code == 401, spelling
            r = c.get("/cases/all_cases", params={"user_id": spelling})
            assert r.status_code == 401, spelling


# -- 17. no 500s ---------------------------------------------------------------------------

HOSTILE_QUERIES = [
    {"page": "--1"}, {"limit": "--1"}, {"min_age": "--1"}, {"max_age": "--5"},
    {"page": "-"}, {"minAge": "--1"}, {"pageSize": "--1"},
    {"start_date": "9999-12-31T23:59:59-23:59"}, {"end_date": "9999-12-31T23:59:59-23:59"},
    {"start_date": "0001-01-01T00:00:00+23:59"}, {"endDate": "0001-01-01T00:00:00+23:59"},
    {"end_date": "9999-12-31"},
]


@pytest.mark.parametrize("query", HOSTILE_QUERIES, ids=lambda q: "&".join(
    f"{k}={v}" for k, v in q.items()))
def test_hostile_list_queries_answer_400_not_500(server, alice, query):
    # Before: each of these answered 500 (int("--1"), a date past the range in UTC).
    with server.client(alice.token) as c:
        r = c.get("/cases/all_cases", params=query)
    if query == {"end_date": "9999-12-31"}:
        assert r.status_code == 200                    # the last day itself is fine
        return
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["detail"] == body["error"] and body["detail"]


def test_deeply_nested_json_and_non_string_user_id_answer_400(server, alice):
    # Before: 50,000 nested "[" (RecursionError) and {"user_id": 5} answered 500.
    with server.client(alice.token) as c:
        case_id = create_case(c)["case"]["case_id"]
        nested = b"[" * 50_000
        for method, path in (("PUT", f"/cases/cases/{case_id}"),
                             ("POST", f"/cases/analyze/{case_id}")):
            r = c.request(method, path, content=nested,
                          headers={"Content-Type": "application/json"})
            assert r.status_code == 400, r.text
        r = c.put(f"/cases/cases/{case_id}", json={"user_id": 5, "patient_age": 60})
        assert r.status_code == 400 and "user_id" in r.json()["detail"]
        assert c.get(f"/cases/cases/{case_id}").json()["case"]["patient_age"] == 52
        r = c.post("/auth/v1/token", params={"grant_type": "password"}, content=nested)
        assert r.status_code == 400
