"""The server on PostgreSQL instead of SQLite, chosen by configuration alone
(``database.url`` / MEDMITRA_DATABASE_URL): migrations, the case API with every list filter,
the durable job queue (FOR UPDATE SKIP LOCKED between concurrent claimers and processes)
and the local auth API, each against a throwaway PostgreSQL server (tests/pg.py).

Skips, with the reason, only where no PostgreSQL server can be started. One server (or one
``asyncio.run`` with the database open) at a time: tortoise's connection is process-global.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from medmitra.auth import users
from medmitra.cli import main
from medmitra.db.models import CaseFile, Insight, Job
from medmitra.db.setup import available_migrations, close_db, open_db
from medmitra.jobs import queue
from tests import docfactory as df
from tests.conftest import User, make_settings, make_user, queued_jobs
from tests.pg import pg_server, pg_url  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.e2e]

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 30.0
TABLES = {"schema_version", "cases", "case_files", "ai_insights", "jobs", "auth_signing_keys",
          "auth_users", "auth_sessions", "auth_refresh_tokens", "auth_flow_codes",
          "audit_log", "auth_api_tokens"}
PATIENT = {"patient_name": "  Asha Rao  ", "patient_age": " 52 ", "patient_gender": "female",
           "case_summary": "Fatigue and breathlessness for three weeks"}


# -- helpers -----------------------------------------------------------------------------

def latest() -> int:
    return max(v for v, _, _ in available_migrations("postgres"))


def pg(sql: str, url: str, *args: Any) -> list[dict[str, Any]]:
    """Run one statement on its own asyncpg connection (outside the server's pool)."""
    import asyncpg

    async def go() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(url)
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()
    return asyncio.run(go())


def ts(value: Any) -> datetime:
    assert isinstance(value, str) and value.endswith("+00:00"), value
    return datetime.fromisoformat(value)


def create(client: httpx.Client, files: list = (), **fields: str) -> dict[str, Any]:
    r = client.post("/cases/create_case", data={**PATIENT, **fields}, files=list(files) or None)
    assert r.status_code == 201, r.text
    return r.json()


def lab(name: str, data: bytes, ctype: str = "application/octet-stream"):
    return ("lab_files", (name, data, ctype))


def rad(name: str, data: bytes, ctype: str = "application/octet-stream"):
    return ("radiology_files", (name, data, ctype))


def db(server: Any, query: Any) -> Any:
    """Await an ORM query on the server's loop (its connection pool lives there)."""
    async def run() -> Any:
        return await query
    return server.run(run())


def stored_files(server: Any) -> list[Path]:
    return sorted(p for p in (server.settings.data_path / "files").rglob("*") if p.is_file())


@pytest.fixture
def pg_app(pg_url: str, start_server: Callable[..., Any], tmp_path: Path) -> Any:  # noqa: F811
    """A real server (no analysis workers) on a fresh PostgreSQL database. pg_url comes
    first so the database outlives the server (fixtures are torn down in reverse)."""
    server = start_server(make_settings(tmp_path, database={"url": pg_url}))
    assert not server.settings.is_sqlite
    return server


# -- migrations --------------------------------------------------------------------------

def test_migrate_creates_the_schema_and_is_idempotent(pg_url, tmp_path, monkeypatch,  # noqa: F811
                                                      capsys) -> None:
    monkeypatch.setenv("MEDMITRA_DATABASE_URL", pg_url)
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n', encoding="utf-8")
    assert main(["migrate", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"schema version {latest()}" in out
    assert "postgres@" not in out            # the credentials part of the URL is not printed

    tables = {r["table_name"] for r in pg(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
        pg_url)}
    assert tables == TABLES
    first = pg('SELECT "version", "name", "applied_at" FROM "schema_version" ORDER BY 1', pg_url)
    assert [(r["version"], r["name"]) for r in first] == [
        (v, name) for v, name, _ in available_migrations("postgres")]
    assert [r["version"] for r in first][:3] == [1, 2, 3]
    # Every column the models map exists, with the migration's type.
    cols = {(r["table_name"], r["column_name"]): r["data_type"] for r in pg(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'public'", pg_url)}
    from medmitra.db import auth_models, flow_models, models
    for mod in (models, auth_models, flow_models):
        for model in vars(mod).values():
            meta = getattr(model, "_meta", None)
            if meta is None or getattr(meta, "abstract", False) or not meta.db_table:
                continue
            for column in meta.fields_db_projection.values():
                assert (meta.db_table, column) in cols, (meta.db_table, column)
    assert cols[("cases", "created_at")] == "timestamp with time zone"
    assert cols[("jobs", "options")] == "jsonb"
    indexes = {r["indexname"] for r in pg(
        "SELECT indexname FROM pg_indexes WHERE schemaname = 'public'", pg_url)}
    assert {"idx_jobs_state_id", "idx_cases_user_created", "idx_auth_sessions_user"} <= indexes

    # Again: nothing is applied twice, nothing fails.
    assert main(["migrate", "--config", str(config)]) == 0
    assert f"schema version {latest()}" in capsys.readouterr().out
    again = pg('SELECT "version", "name", "applied_at" FROM "schema_version" ORDER BY 1',
               pg_url)
    assert again == first


def test_nodes_starting_together_migrate_once(pg_url, tmp_path) -> None:  # noqa: F811
    """Several nodes started at once on an empty database: one applies each migration,
    the others wait for it and find nothing left to do; all of them start."""
    env = {**os.environ, "MEDMITRA_DATABASE_URL": pg_url}
    procs = [subprocess.Popen([sys.executable, "-m", "medmitra", "migrate", "--data-dir",
                               str(tmp_path / f"node{i}")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    try:
        outs = [p.communicate(timeout=WAIT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert f"schema version {latest()}" in out
    rows = pg('SELECT "version" FROM "schema_version" ORDER BY 1', pg_url)
    assert [r["version"] for r in rows] == [v for v, _, _ in available_migrations("postgres")]


def test_failed_migration_leaves_the_previous_version(pg_url, tmp_path,  # noqa: F811
                                                      monkeypatch) -> None:
    """Each migration runs in one transaction with its schema_version row: a failing one
    leaves no half-made tables and no version row behind."""
    from medmitra.db import setup

    broken = tmp_path / "migrations"
    broken.mkdir()
    for _, _, path in setup.available_migrations("postgres"):
        (broken / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    (broken / "0999_broken.postgres.sql").write_text(
        'CREATE TABLE "half_made" ("id" INT);\nSELECT no_such_function();\n', encoding="utf-8")
    before = latest()
    monkeypatch.setattr(setup, "MIGRATIONS_DIR", broken)
    settings = make_settings(tmp_path, database={"url": pg_url})

    async def run() -> None:
        await open_db(settings, migrate=False)
        try:
            with pytest.raises(Exception, match="no_such_function"):
                await setup.apply_migrations(settings)
            assert await setup.current_version() == before
        finally:
            await close_db()
    asyncio.run(run())
    tables = {r["table_name"] for r in pg(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
        pg_url)}
    assert tables == TABLES


# -- the case API ------------------------------------------------------------------------

def test_case_flows_on_postgres(pg_app, alice: User, bob: User) -> None:
    server = pg_app
    uploads = [lab("cbc.csv", df.lab_csv(), "text/csv"),
               lab("report.pdf", df.text_pdf(), "application/pdf"),
               rad("chest.png", df.xray_png(), "image/png"),
               rad("scan.dcm", df.dicom(), "application/dicom")]
    with server.client(alice.token) as c:
        # create with files (multipart)
        body = create(c, uploads)
        case, files = body["case"], body["uploaded_files"]
        assert (case["patient_name"], case["patient_age"], case["status"]) == \
            ("Asha Rao", 52, "processing")
        assert case["created_at"] == case["updated_at"]
        assert abs(ts(case["created_at"]) - datetime.now(timezone.utc)) < timedelta(minutes=1)
        assert [(f["file_name"], f["file_type"], f["file_category"]) for f in files] == [
            ("cbc.csv", "text/csv", "lab"), ("report.pdf", "application/pdf", "lab"),
            ("chest.png", "image/png", "radiology"), ("scan.dcm", "application/dicom",
                                                      "radiology")]
        assert all(f["uploaded_at"] == case["created_at"] for f in files)
        assert httpx.get(files[2]["file_url"]).content == df.xray_png()

        # get by UUID and by integer id: the same case, files in order, a queued analysis
        got = c.get(f"/cases/cases/{case['case_id']}")
        assert got.status_code == 200, got.text
        got = got.json()
        assert got["case"] == case
        assert c.get(f"/cases/cases/{case['id']}").json()["case"] == case
        strip = [{k: v for k, v in f.items() if k != "file_url"} for f in files]
        assert [{k: v for k, v in f.items() if k != "file_url"} for f in got["files"]] == strip
        assert got["ai_insights"] is None and got["insights"] is None
        a = got["analysis"]
        assert (a["state"], a["queue_position"], a["attempts"], a["progress"]) == \
            ("queued", 1, 0, 0.0)
        assert a["started_at"] is None and a["error"] is None

        # insights (JSONB columns) render flat and nested
        now = datetime.now(timezone.utc)
        nested = {"case_summary": {"comprehensive_summary": "Anaemia.", "key_findings": ["Hb 9.1"],
                                   "confidence_score": 0.8},
                  "soap_note": {"subjective": "S", "plan": "P"},
                  "primary_diagnosis": {"primary_diagnosis": "Iron deficiency anaemia",
                                        "icd_code": "D50.9"},
                  "overall_confidence_score": 0.7}
        server.run(Insight.create(case_id=case["id"], data=nested,
                                  model={"name": "SmolLM2-135M"},
                                  stages=[{"stage": "soap_note", "duration_s": 1.5}],
                                  generated_at=now, created_at=now, updated_at=now))
        got = c.get(f"/cases/cases/{case['case_id']}").json()
        flat, nest = got["ai_insights"], got["insights"]
        assert flat["comprehensive_summary"] == "Anaemia."
        assert flat["key_findings"] == ["Hb 9.1"]
        assert (flat["icd_code"], flat["soap_plan"]) == ("D50.9", "P")
        assert ts(flat["generated_at"]) == now
        assert nest["model"] == "SmolLM2-135M" and nest["timings"] == {"soap_note": 1.5}

        # update
        r = c.put(f"/cases/cases/{case['case_id']}",
                  json={"patient_name": " Asha R. ", "patient_age": 53, "status": "completed"})
        assert r.status_code == 200, r.text
        new = r.json()["case"]
        assert (new["patient_name"], new["patient_age"], new["status"]) == \
            ("Asha R.", 53, "completed")
        assert ts(new["updated_at"]) > ts(case["updated_at"])
        assert c.get(f"/cases/cases/{case['id']}").json()["case"] == new

        # analyze: earlier runs cancelled, options stored as JSONB
        r = c.post(f"/cases/analyze/{case['case_id']}",
                   json={"includeDifferentialDiagnosis": False, "confidenceThreshold": 0.5})
        assert r.status_code == 200, r.text
        assert r.json()["case"]["status"] == "processing"
        jobs = db(server, Job.filter(case_id=case["id"]).order_by("id").values("state", "options"))
        assert [j["state"] for j in jobs] == ["cancelled", "queued"]
        assert jobs[1]["options"] == {"include_differential": False, "confidence_threshold": 0.5}

        # upload: one file by UUID, several by integer id
        r = c.post("/cases/upload", data={"case_id": case["case_id"], "category": "lab"},
                   files={"file": ("photo.png", df.report_photo_png(), "image/png")})
        assert r.status_code == 201, r.text
        photo = r.json()["file"]
        r = c.post("/cases/upload", data={"case_id": str(case["id"])},
                   files=[("files", ("a.pdf", df.text_pdf(), "application/pdf")),
                          ("files", ("c.jpg", df.jpeg(), "image/jpeg"))])
        assert r.status_code == 201, r.text
        many = r.json()["files"]
        listed = c.get(f"/cases/files/{case['case_id']}").json()["files"]
        assert [f["file_id"] for f in listed] == \
            [f["file_id"] for f in files] + [photo["file_id"]] + [f["file_id"] for f in many]
        assert c.get(f"/cases/file/{photo['id']}").json()["file"]["file_id"] == photo["file_id"]
        assert len(stored_files(server)) == 7
        # queued behind nothing else of this database: position 1 again after re-queueing
        assert c.get(f"/cases/cases/{case['id']}").json()["analysis"]["queue_position"] == 1

        # isolation: another user sees nothing of it
        with server.client(bob.token) as other:
            assert other.get(f"/cases/cases/{case['case_id']}").status_code == 404
            assert other.get(f"/cases/cases/{case['id']}").status_code == 404
            assert other.put(f"/cases/cases/{case['id']}",
                             json={"status": "failed"}).status_code == 404
            assert other.post(f"/cases/analyze/{case['id']}").status_code == 404
            assert other.get(f"/cases/files/{case['case_id']}").status_code == 404
            assert other.get(f"/cases/file/{photo['file_id']}").status_code == 404
            assert other.delete(f"/cases/file/{photo['id']}").status_code == 404
            assert other.delete(f"/cases/cases/{case['case_id']}").status_code == 404
            r = other.get("/cases/all_cases")
            assert r.status_code == 200 and r.json()["total"] == 0
        # ids beyond PostgreSQL's INT range are just not found (not a 500)
        assert c.get("/cases/cases/99999999999").status_code == 404
        assert c.get("/cases/file/999999999999999999").status_code == 404

        # delete a file, then the case
        r = c.delete(f"/cases/file/{photo['file_id']}")
        assert r.status_code == 200, r.text
        assert c.get(f"/cases/file/{photo['file_id']}").status_code == 404
        assert httpx.get(photo["file_url"]).status_code == 404
        assert len(stored_files(server)) == 6
        r = c.delete(f"/cases/cases/{case['case_id']}")
        assert r.status_code == 200, r.text
        assert c.get(f"/cases/cases/{case['case_id']}").status_code == 404
        assert c.get("/cases/all_cases").json()["total"] == 0
    for model in (CaseFile, Insight, Job):
        assert db(server, model.filter(case_id=case["id"]).count()) == 0
    assert stored_files(server) == []
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["database"] == {"status": "ok"}


def test_analysis_runs_to_completion_on_postgres(pg_url, start_server, tmp_path,  # noqa: F811
                                                 monkeypatch, alice: User) -> None:
    """A worker node on PostgreSQL: claims the job, extracts the files, writes insights and
    the file summaries, and finishes the job and the case in one transaction."""
    from medmitra.llm.runtime import FakeRuntime

    settings = make_settings(tmp_path, database={"url": pg_url},
                             llm={"workers": 1, "threads": 1},
                             jobs={"poll_s": 0.05, "heartbeat_s": 0.2, "lease_s": 2})
    server = start_server(settings, runtime_factory=FakeRuntime)
    with server.client(alice.token) as c:
        case = create(c, [lab("cbc.csv", df.lab_csv(), "text/csv"),
                          rad("chest.png", df.xray_png(), "image/png")])["case"]
        deadline = time.monotonic() + WAIT_S
        while True:
            got = c.get(f"/cases/cases/{case['case_id']}").json()
            if got["analysis"]["state"] in ("completed", "failed"):
                break
            assert time.monotonic() < deadline, got["analysis"]
            time.sleep(0.05)     # polling the API, as a client would
    a = got["analysis"]
    assert (a["state"], a["progress"], a["attempts"], a["error"]) == ("completed", 1.0, 1, None)
    assert ts(a["finished_at"]) >= ts(a["started_at"])
    assert got["case"]["status"] == "completed"
    assert got["insights"]["model"] == "fake-model"
    assert got["ai_insights"]["case_id"] == case["case_id"]
    assert set(got["insights"]["timings"]) >= {"extract", "soap_note", "compile"}
    labf, radf = got["files"]
    assert "Hemoglobin" in labf["text_data"]
    assert json.loads(labf["ai_summary"]) and json.loads(radf["ai_summary"])
    [job] = db(server, Job.filter(case_id=case["id"]).values("state", "lease_owner"))
    assert job == {"state": "completed", "lease_owner": None}


def test_case_view_is_one_snapshot_on_postgres(pg_server, pg_app, alice: User,  # noqa: F811
                                               monkeypatch) -> None:
    """GET case reads the case, its files, insights and job as one snapshot: a delete
    committed by another node between those SELECTs is not half seen."""
    from medmitra.db import reads

    server = pg_app
    with server.client(alice.token) as c:
        case = create(c, [lab("cbc.csv", df.lab_csv(), "text/csv")])["case"]
        real_dollar = reads._dollar
        seen: list[str] = []

        def dollar_then_delete(sql: str) -> str:
            seen.append(sql)
            if len(seen) == 2:     # after the case row was read, before its files are
                pg_server.psql(server.settings.database_url,
                               f'DELETE FROM "case_files" WHERE "case_id" = {case["id"]}')
            return real_dollar(sql)
        monkeypatch.setattr(reads, "_dollar", dollar_then_delete)
        got = c.get(f"/cases/cases/{case['case_id']}").json()
        monkeypatch.setattr(reads, "_dollar", real_dollar)
        assert len(seen) == 4
        assert [f["file_name"] for f in got["files"]] == ["cbc.csv"]     # the snapshot
        assert c.get(f"/cases/cases/{case['case_id']}").json()["files"] == []   # and now


PEOPLE = [  # name, age, gender, summary (created in this order)
    ("Ravi Kumar", 34, "male", "Chest pain on exertion"),
    ("asha rao", 52, "female", "Fatigue"),
    ("Meena Iyer", 71, "FEMALE", None),
    ("Zubin Shah", 8, "male", "Fever with rash, suspected DENGUE"),
    ("Émile Ōta", 40, "other", "Ünusual rash"),
]


def test_list_filters_sorting_and_paging_on_postgres(pg_app) -> None:
    server = pg_app
    alice, bob = make_user(), make_user()
    with server.client(alice.token) as c:
        cases = [create(c, patient_name=n, patient_age=str(a), patient_gender=g,
                        case_summary=s or "")["case"] for n, a, g, s in PEOPLE]
        r = c.put(f"/cases/cases/{cases[1]['case_id']}", json={"status": "completed"})
        cases[1] = r.json()["case"]
    with server.client(bob.token) as c:
        create(c, patient_name="Ravi Kumar")      # never in alice's lists

    def names(params: dict[str, str]) -> list[str]:
        r = cl.get("/cases/all_cases", params=params)
        assert r.status_code == 200, (params, r.text)
        body = r.json()
        assert set(body) == {"cases", "total", "page", "limit"}
        for item in body["cases"]:
            assert item["user_id"] == alice.id
            ts(item["created_at"])
        return [x["patient_name"] for x in body["cases"]]

    by_created = [x["patient_name"] for x in cases]
    by_updated = [x["patient_name"] for x in sorted(cases, key=lambda x: ts(x["updated_at"]))]
    sort_keys = {"created_at": by_created, "updated_at": by_updated,
                 "patient_name": sorted(by_created, key=str.lower),
                 "patient_age": [p[0] for p in sorted(PEOPLE, key=lambda p: p[1])]}
    with server.client(alice.token) as cl:
        body = cl.get("/cases/all_cases").json()
        assert (body["total"], body["page"], body["limit"]) == (5, 1, 5)
        assert [x["case_id"] for x in body["cases"]] == [x["case_id"] for x in reversed(cases)]
        assert body["cases"] == list(reversed(cases))   # the same JSON as create/update gave

        # each sort field, both ways, in both spellings
        for field, ascending in sort_keys.items():
            assert names({"sort_by": field, "sort_order": "asc"}) == ascending, field
            assert names({"sortBy": field, "sortOrder": "DESC"}) == ascending[::-1], field

        expectations: list[tuple[dict[str, str], list[str]]] = [
            ({"page": "1", "limit": "2"}, ["Émile Ōta", "Zubin Shah"]),
            ({"page": "2", "limit": "2"}, ["Meena Iyer", "asha rao"]),
            ({"page": "3", "limit": "2"}, ["Ravi Kumar"]),
            ({"page": "4", "limit": "2"}, []),
            ({"page": "2", "pageSize": "3", "sort_by": "patient_age", "sort_order": "asc"},
             ["asha rao", "Meena Iyer"]),
            ({"status": "completed"}, ["asha rao"]),
            ({"status": "processing", "sort_by": "patient_age", "sort_order": "asc"},
             ["Zubin Shah", "Ravi Kumar", "Émile Ōta", "Meena Iyer"]),
            ({"search": "ASHA"}, ["asha rao"]),                # ILIKE: any case
            ({"search": "dengue"}, ["Zubin Shah"]),            # in the summary too
            ({"search": "émile"}, ["Émile Ōta"]),              # beyond ASCII as well
            ({"search": "ünusual"}, ["Émile Ōta"]),
            ({"search": "%"}, []),                             # wildcards are literal
            ({"search": "_"}, []),
            ({"search": "a_r"}, []),
            ({"search": "\\"}, []),
            ({"min_age": "34", "max_age": "52"}, ["Émile Ōta", "asha rao", "Ravi Kumar"]),
            ({"minAge": "60"}, ["Meena Iyer"]),
            ({"maxAge": "8"}, ["Zubin Shah"]),
            ({"gender": "female"}, ["Meena Iyer", "asha rao"]),   # case-insensitive
            ({"patientGender": "MALE"}, ["Zubin Shah", "Ravi Kumar"]),
            ({"gender": "female", "min_age": "60", "search": "meena"}, ["Meena Iyer"]),
        ]
        for params, expected in expectations:
            assert names(params) == expected, params
            body = cl.get("/cases/all_cases", params=params).json()
            if "limit" in params or "pageSize" in params:
                assert body["total"] == 5, params
                assert body["limit"] == int(params.get("limit") or params["pageSize"])
                assert body["page"] == int(params["page"])
            else:
                assert body["total"] == len(expected), params

        # date range on created_at: exact microsecond bounds are inclusive
        second, third = cases[1]["created_at"], cases[2]["created_at"]
        assert names({"start_date": second, "end_date": third}) == ["Meena Iyer", "asha rao"]
        assert names({"startDate": third}) == ["Émile Ōta", "Zubin Shah", "Meena Iyer"]
        assert names({"endDate": second}) == ["asha rao", "Ravi Kumar"]
        just_after = (ts(second) + timedelta(microseconds=1)).isoformat()
        assert names({"start_date": just_after, "end_date": third}) == ["Meena Iyer"]
        day = ts(cases[0]["created_at"]).date()
        assert len(names({"end_date": day.isoformat()})) == 5     # a bare date: whole day
        before = (day - timedelta(days=1)).isoformat()
        assert names({"end_date": before}) == []
        assert len(names({"start_date": f"{before}T00:00:00Z"})) == 5
        # the same instant written with another offset
        local = ts(third).astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat()
        assert names({"start_date": local}) == ["Émile Ōta", "Zubin Shah", "Meena Iyer"]

        # bad values still answer 400, not a database error
        # (PostgreSQL refuses NUL in any text parameter: it must not get that far)
        for params in ({"sort_by": "id; DROP TABLE cases"}, {"min_age": "x"},
                       {"start_date": "yesterday"}, {"status": "lost"},
                       {"search": "asha\x00"}, {"gender": "female\x00"}):
            assert cl.get("/cases/all_cases", params=params).status_code == 400, params


# -- the job queue -----------------------------------------------------------------------

# The queue's tests run on SQLite and PostgreSQL alike in tests/test_queue.py (conftest's
# run_db); here only what exists on PostgreSQL alone.

@pytest.mark.parametrize("run_db", ["postgres"], indirect=True)
def test_claim_skips_a_job_another_node_has_locked(run_db) -> None:
    """FOR UPDATE SKIP LOCKED: while another node's transaction holds the oldest job's row,
    a claim takes the next one at once instead of waiting for (or sharing) it."""
    import asyncpg

    async def body() -> None:
        first, second = await queued_jobs(2)
        other_node = await asyncpg.connect(run_db.url)
        try:
            tx = other_node.transaction()
            await tx.start()
            await other_node.execute('SELECT 1 FROM "jobs" WHERE "id" = $1 FOR UPDATE', first.id)
            owner = queue.new_owner()
            got = await asyncio.wait_for(queue.claim(owner, 60), WAIT_S)
            assert got is not None and got.id == second.id
            assert await asyncio.wait_for(queue.claim(owner, 60), WAIT_S) is None
            await tx.rollback()
        finally:
            await other_node.close()
        got = await queue.claim(queue.new_owner(), 60)
        assert got is not None and got.id == first.id
    run_db(body)


# -- local auth --------------------------------------------------------------------------

EMAIL = "doctor@clinic.test"
PASSWORD = "correct horse battery"


def test_local_auth_sign_in_and_refresh_on_postgres(pg_url, start_server, tmp_path,  # noqa: F811
                                                     capsys) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n\n'
                      f'[database]\nurl = "{pg_url}"\n', encoding="utf-8")
    assert main(["users", "add", "--email", "Doctor@Clinic.test", "--password", PASSWORD,
                 "--config", str(config)]) == 0
    assert main(["users", "add", "--email", EMAIL, "--password", PASSWORD,
                 "--config", str(config)]) == 1                         # already registered
    assert main(["users", "add", "--email", "nurse@clinic.test", "--password", PASSWORD,
                 "--config", str(config)]) == 0
    assert main(["users", "disable", "--email", "nurse@clinic.test",
                 "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["users", "list", "--config", str(config)]) == 0
    listing = capsys.readouterr().out
    assert EMAIL in listing and "nurse@clinic.test" in listing

    server = start_server(make_settings(
        tmp_path, database={"url": pg_url},
        auth={"rate_limit_per_min": 100000, "refresh_reuse_window_s": 0}))
    # a user made through the module as well
    server.run(users.create_user("second@clinic.test", PASSWORD))
    headers = {"apikey": "local-anon-key"}

    def sign_in(c: httpx.Client, email: str, password: str = PASSWORD) -> httpx.Response:
        return c.post("/auth/v1/token", params={"grant_type": "password"},
                      json={"email": email, "password": password}, headers=headers)

    def refresh(c: httpx.Client, token: str) -> httpx.Response:
        return c.post("/auth/v1/token", params={"grant_type": "refresh_token"},
                      json={"refresh_token": token}, headers=headers)

    with server.client() as c:
        r = sign_in(c, " DOCTOR@clinic.test ")
        assert r.status_code == 200, r.text
        first = r.json()
        assert first["user"]["email"] == EMAIL and first["token_type"] == "bearer"
        assert ts(first["user"]["last_sign_in_at"])
        me = c.get("/auth/v1/user", headers={"Authorization": f"Bearer {first['access_token']}",
                                               **headers})
        assert me.status_code == 200 and me.json()["id"] == first["user"]["id"]
        auth = {"Authorization": f"Bearer {first['access_token']}"}
        assert c.get("/cases/all_cases", headers=auth).status_code == 200

        assert sign_in(c, EMAIL, "wrong password!").status_code == 400
        for odd in ("doctor\x00@clinic.test", "doctor@clinic.test\x00"):
            r = sign_in(c, odd)     # PostgreSQL would refuse the NUL: a plain wrong sign-in
            assert r.status_code == 400 and r.json()["error_code"] == "invalid_credentials"
        r = sign_in(c, "nurse@clinic.test")
        assert r.status_code == 400 and r.json()["error_code"] == "user_banned"
        assert sign_in(c, "second@clinic.test").status_code == 200

        r = refresh(c, first["refresh_token"])
        assert r.status_code == 200, r.text
        second = r.json()
        assert second["refresh_token"] != first["refresh_token"]
        assert second["user"]["id"] == first["user"]["id"]
        assert c.get("/cases/all_cases", headers={
            "Authorization": f"Bearer {second['access_token']}"}).status_code == 200
        # Replayed outside the (zero) reuse window: the whole session is revoked.
        r = refresh(c, first["refresh_token"])
        assert r.status_code == 400 and r.json()["error_code"] == "refresh_token_already_used"
        r = refresh(c, second["refresh_token"])
        assert r.status_code == 400 and r.json()["error_code"] == "refresh_token_not_found"
        assert c.get("/cases/all_cases", headers={
            "Authorization": f"Bearer {second['access_token']}"}).status_code == 401
    rows = pg('SELECT "revoke_reason" FROM "auth_sessions" WHERE "user_id" = $1', pg_url,
              first["user"]["id"])
    assert rows == [{"revoke_reason": "refresh_token_reuse"}]

