"""Every case route of the contract (api.md sections 3, 4 and 6) against the app (in process):
the success shape field by field, list filters, integer and UUID ids, and what create,
update, analyze, upload and delete do to the rows and to the bytes on disk."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from conftest import Served, User, make_settings, make_user, serve_in_process
from medmitra import contract
from medmitra.db.models import Case, CaseFile, Insight, Job
from tests import docfactory as df

PATIENT = {"patient_name": "  Asha Rao  ", "patient_age": " 52 ", "patient_gender": "female",
           "case_summary": "Fatigue and breathlessness for three weeks"}

# The output shapes are declared once, in the contract; these tests hold the server to it.
CASE_KEYS = set(contract.CASE_FIELDS)
FILE_KEYS = set(contract.FILE_FIELDS)
ANALYSIS_KEYS = set(contract.ANALYSIS_FIELDS)
FLAT_INSIGHT_KEYS = set(contract.FLAT_INSIGHT_FIELDS)


# -- helpers -----------------------------------------------------------------------------

def ts(value: Any) -> datetime:
    """A contract timestamp: ISO 8601, UTC, written with the +00:00 offset."""
    assert isinstance(value, str) and value.endswith("+00:00"), value
    dt = datetime.fromisoformat(value)
    assert dt.utcoffset() == timedelta(0)
    return dt


def fetch(server: Served, url: str) -> httpx.Response:
    """GET with no Authorization header, as a browser tab opening file_url."""
    with server.client() as c:
        return c.get(url)


def is_uuid(value: Any) -> bool:
    return isinstance(value, str) and str(uuid.UUID(value)) == value


def create(client: httpx.Client, files: list[tuple[str, tuple[str, bytes, str]]] = (),
           **fields: str) -> dict[str, Any]:
    data = {**PATIENT, **fields}
    r = client.post("/cases/create_case", data=data, files=list(files) or None)
    assert r.status_code == 201, r.text
    return r.json()


def stored_path(server: Any, file_id: str) -> Path:
    return server.settings.data_path / "files" / file_id[:2] / file_id


def stored_files(server: Any) -> list[Path]:
    return sorted(p for p in (server.settings.data_path / "files").rglob("*") if p.is_file())


def lab(name: str, data: bytes, ctype: str = "application/octet-stream"):
    return ("lab_files", (name, data, ctype))


def rad(name: str, data: bytes, ctype: str = "application/octet-stream"):
    return ("radiology_files", (name, data, ctype))


def check_case(case: dict[str, Any], owner: str) -> None:
    assert set(case) == CASE_KEYS
    assert isinstance(case["id"], int) and not isinstance(case["id"], bool) and case["id"] > 0
    assert is_uuid(case["case_id"])
    assert case["doctor_id"] == case["user_id"] == owner
    assert isinstance(case["patient_age"], int)
    assert case["status"] in ("processing", "completed", "failed")
    assert ts(case["created_at"]) <= ts(case["updated_at"])


def check_file(f: dict[str, Any], server: Any, case_uuid: str) -> None:
    assert set(f) == FILE_KEYS
    assert isinstance(f["id"], int) and f["id"] > 0
    assert is_uuid(f["file_id"])
    assert f["case_id"] == case_uuid
    assert isinstance(f["file_type"], str) and f["file_type"]
    assert f["file_url"].startswith(f"{server.url}/files/download/")
    assert f["upload_date"] == f["uploaded_at"]
    ts(f["uploaded_at"])


# -- root and create ---------------------------------------------------------------------

def test_root_answers_like_the_original(server) -> None:
    r = fetch(server, server.url + "/")
    assert r.status_code == 200
    assert r.json() == {"message": "MedMitra Backend API is running!"}


def test_create_case_with_files_shape_field_by_field(server, alice) -> None:
    uploads = [lab("cbc.csv", df.lab_csv(), "text/csv"),
               lab("report.pdf", df.text_pdf(), "application/pdf"),
               rad("chest.png", df.xray_png(), "image/png"),
               rad("scan.dcm", df.dicom(), "application/dicom")]
    with server.client(alice.token) as c:
        body = create(c, uploads)
    assert set(body) == {"message", "case", "uploaded_files"}
    assert body["message"] == "Case created successfully"
    case = body["case"]
    check_case(case, alice.id)
    assert case["patient_name"] == "Asha Rao"          # trimmed
    assert case["patient_age"] == 52
    assert case["patient_gender"] == "female"
    assert case["case_summary"] == PATIENT["case_summary"]
    assert case["status"] == "processing"
    assert case["created_at"] == case["updated_at"]
    assert abs(ts(case["created_at"]) - datetime.now(timezone.utc)) < timedelta(minutes=1)

    files = body["uploaded_files"]
    expected = [("cbc.csv", "text/csv", "lab", df.lab_csv()),
                ("report.pdf", "application/pdf", "lab", df.text_pdf()),
                ("chest.png", "image/png", "radiology", df.xray_png()),
                ("scan.dcm", "application/dicom", "radiology", df.dicom())]
    assert len(files) == len(expected)
    assert len({f["file_id"] for f in files}) == len(files)
    for f, (name, mime, category, data) in zip(files, expected):
        check_file(f, server, case["case_id"])
        assert (f["file_name"], f["file_type"], f["file_category"]) == (name, mime, category)
        assert f["file_size"] == len(data)
        assert f["text_data"] is None and f["ai_summary"] is None
        assert f["uploaded_at"] == case["created_at"]
        # The bytes live under a path made of the file id only.
        assert stored_path(server, f["file_id"]).read_bytes() == data
        # file_url downloads the same bytes with no Authorization header at all.
        r = fetch(server, f["file_url"])
        assert r.status_code == 200
        assert r.content == data
        assert r.headers["content-type"].split(";")[0] == mime
    assert len(stored_files(server)) == 4
    assert list((server.settings.data_path / "tmp").iterdir()) == []


def test_create_case_without_files_or_summary(server, alice) -> None:
    with server.client(alice.token) as c:
        body = create(c, case_summary="")
    assert body["uploaded_files"] == []
    assert body["case"]["case_summary"] is None
    assert stored_files(server) == []


def test_user_id_field_naming_the_caller_is_accepted(server, alice) -> None:
    with server.client(alice.token) as c:
        body = create(c, user_id=alice.id.upper())
        assert body["case"]["user_id"] == alice.id
        r = c.get("/cases/all_cases", params={"user_id": alice.id})
    assert r.status_code == 200 and r.json()["total"] == 1


def test_png_declared_as_pdf_is_stored_as_png(server, alice) -> None:
    with server.client(alice.token) as c:
        body = create(c, [lab("scan.pdf", df.report_photo_png(), "application/pdf")])
    f = body["uploaded_files"][0]
    assert (f["file_type"], f["file_category"], f["file_name"]) == ("image/png", "lab", "scan.pdf")


def test_two_files_with_the_same_name_are_both_kept(server, alice) -> None:
    with server.client(alice.token) as c:
        body = create(c, [lab("r.csv", df.lab_csv()), lab("r.csv", df.lab_csv(bom=True))])
    a, b = body["uploaded_files"]
    assert a["file_name"] == b["file_name"] == "r.csv"
    assert a["file_id"] != b["file_id"]
    assert stored_path(server, a["file_id"]).read_bytes() == df.lab_csv()
    assert stored_path(server, b["file_id"]).read_bytes() == df.lab_csv(bom=True)


# -- get case ----------------------------------------------------------------------------

def test_get_case_before_analysis(server, alice) -> None:
    with server.client(alice.token) as c:
        created = create(c, [lab("cbc.csv", df.lab_csv()), rad("chest.png", df.xray_png())])
        case_uuid = created["case"]["case_id"]
        r = c.get(f"/cases/cases/{case_uuid}")
        assert r.status_code == 200
        body = r.json()
        by_int = c.get(f"/cases/cases/{created['case']['id']}").json()
    assert set(body) == {"case", "files", "ai_insights", "insights", "analysis"}
    assert body["case"] == created["case"]
    assert by_int["case"] == created["case"]
    assert body["ai_insights"] is None and body["insights"] is None
    strip = [{k: v for k, v in f.items() if k != "file_url"} for f in created["uploaded_files"]]
    assert [{k: v for k, v in f.items() if k != "file_url"} for f in body["files"]] == strip
    for f in body["files"]:
        check_file(f, server, case_uuid)
    a = body["analysis"]
    assert set(a) == ANALYSIS_KEYS
    assert a["state"] == "queued"
    assert a["stage"] is None and a["error"] is None
    assert a["progress"] == 0.0
    assert isinstance(a["queue_position"], int) and a["queue_position"] == 1
    assert a["started_at"] is None and a["finished_at"] is None
    assert a["attempts"] == 0


NESTED = {
    "case_summary": {"comprehensive_summary": "Anaemia with hyperglycaemia.",
                     "key_findings": ["Hb 9.1 g/dL", "Glucose 240 mg/dL"],
                     "patient_context": {"age": 52, "gender": "female"},
                     "doctor_notes": "Fatigue", "lab_summary": "Low Hb",
                     "radiology_summary": "Clear lungs", "confidence_score": 0.8},
    "soap_note": {"subjective": "S", "objective": "O", "assessment": "A", "plan": "P",
                  "confidence_score": 0.6},
    "primary_diagnosis": {"primary_diagnosis": "Iron deficiency anaemia", "icd_code": "D50.9",
                          "description": "Low iron", "confidence_score": 0.7,
                          "supporting_evidence": ["Hb 9.1 g/dL"]},
    "differential_diagnoses": [], "investigation_recommendations": [],
    "treatment_recommendations": [], "overall_confidence_score": 0.7,
}


def test_get_case_renders_insights_flat_and_nested(server, alice) -> None:
    with server.client(alice.token) as c:
        case = create(c)["case"]
        now = datetime.now(timezone.utc)
        server.run(Insight.create(case_id=case["id"], data=NESTED,
                                  model={"name": "SmolLM2-135M", "file": "x.gguf"}, stages=[],
                                  generated_at=now, created_at=now, updated_at=now))
        body = c.get(f"/cases/cases/{case['case_id']}").json()
    flat, nested = body["ai_insights"], body["insights"]
    assert set(flat) == FLAT_INSIGHT_KEYS
    assert flat["case_id"] == case["case_id"]
    assert flat["comprehensive_summary"] == "Anaemia with hyperglycaemia."
    assert flat["key_findings"] == ["Hb 9.1 g/dL", "Glucose 240 mg/dL"]
    assert flat["patient_context"] == {"age": 52, "gender": "female"}
    assert (flat["soap_subjective"], flat["soap_plan"]) == ("S", "P")
    assert (flat["primary_diagnosis"], flat["icd_code"]) == ("Iron deficiency anaemia", "D50.9")
    assert flat["supporting_evidence"] == ["Hb 9.1 g/dL"]
    assert flat["overall_confidence_score"] == 0.7
    for key in ("generated_at", "created_at", "updated_at"):
        assert ts(flat[key]) == now
    assert nested["case_summary"] == NESTED["case_summary"]
    assert nested["primary_diagnosis"]["icd_code"] == "D50.9"
    assert nested["model"] == "SmolLM2-135M"
    assert nested["generated_at"] == flat["generated_at"]


def test_get_case_answer_is_kept_only_while_nothing_changes(server, alice, bob) -> None:
    """GET case keeps its rendered answer per user and case while the database is
    unchanged (services.cases.case_parts); every change shows at once, the file links are
    made per request (from this request's Host), and another user still gets a 404."""
    with server.client(alice.token) as c:
        case = create(c, files=[lab("cbc.csv", b"test,value\nHb,9.1\n", "text/csv")])["case"]
        url = f"/cases/cases/{case['case_id']}"
        first = c.get(url)
        again = c.get(url)
        assert first.status_code == again.status_code == 200
        assert first.headers["content-type"] == "application/json"
        assert first.json()["case"] == again.json()["case"]
        # The same answer through the integer id, and from another Host naming this
        # machine: the link follows the request, the rest is the kept answer.
        port = server.url.rsplit(":", 1)[1]
        other_host = c.get(url, headers={"Host": f"localhost:{port}"}).json()
        assert other_host["files"][0]["file_url"].startswith(f"http://localhost:{port}/")
        assert first.json()["files"][0]["file_url"].startswith(server.url)
        assert {k: v for k, v in other_host.items() if k != "files"} == \
            {k: v for k, v in first.json().items() if k != "files"}
        by_int = c.get(f"/cases/cases/{case['id']}").json()
        assert by_int["case"] == first.json()["case"]

        # Not theirs: 404, while alice's answer is kept.
        with server.client(bob.token) as b:
            assert b.get(url).status_code == 404

        # A change through the API shows in the next read.
        r = c.put(url, json={"patient_name": "Asha R. Rao"})
        assert r.status_code == 200, r.text
        assert c.get(url).json()["case"]["patient_name"] == "Asha R. Rao"
        # So does a write that bypasses the API (the pipeline's, through the ORM).
        now = datetime.now(timezone.utc)
        server.run(Insight.create(case_id=case["id"], data=NESTED,
                                  model={"name": "SmolLM2-135M", "file": "x.gguf"}, stages=[],
                                  generated_at=now, created_at=now, updated_at=now))
        body = c.get(url).json()
        assert body["insights"]["case_summary"] == NESTED["case_summary"]
        assert body["ai_insights"]["icd_code"] == "D50.9"
        # And a deleted file leaves the answer.
        fid = body["files"][0]["file_id"]
        assert c.delete(f"/cases/file/{fid}").status_code == 200
        assert c.get(url).json()["files"] == []


def test_list_answer_is_kept_only_while_nothing_changes(server, alice, bob) -> None:
    """The case list keeps its answer per user and query while the database is unchanged
    (services.cases.list_cases_body); every change shows in the next poll, another query
    gets its own answer, and another user's list never holds alice's cases."""
    with server.client(alice.token) as c, server.client(bob.token) as b:
        first = create(c, patient_name="Kept One")["case"]
        r1, r2 = c.get("/cases/all_cases"), c.get("/cases/all_cases")
        assert r1.status_code == r2.status_code == 200
        assert r1.headers["content-type"] == "application/json"
        assert r1.content == r2.content and r1.json()["total"] == 1
        # Bob's list at the same database state is his own (empty), then alice's again.
        assert b.get("/cases/all_cases").json() == {"cases": [], "total": 0, "page": 1,
                                                     "limit": 0}
        assert c.get("/cases/all_cases").content == r1.content
        # Another query is another answer, not the kept one.
        paged = c.get("/cases/all_cases", params={"limit": 5}).json()
        assert (paged["total"], paged["limit"]) == (1, 5)
        assert c.get("/cases/all_cases", params={"search": "nobody"}).json()["cases"] == []

        def names() -> list[str]:
            return [x["patient_name"] for x in c.get("/cases/all_cases").json()["cases"]]

        # A new case, an update through the API, a write that bypasses the API (the
        # pipeline's, through the ORM) and a delete each show in the next poll.
        second = create(c, patient_name="Kept Two")["case"]
        assert sorted(names()) == ["Kept One", "Kept Two"]
        r = c.put(f"/cases/cases/{first['case_id']}", json={"patient_name": "Kept Renamed"})
        assert r.status_code == 200, r.text
        assert sorted(names()) == ["Kept Renamed", "Kept Two"]
        server.run(Case.filter(id=second["id"]).update(status="completed"))
        statuses = {x["patient_name"]: x["status"]
                    for x in c.get("/cases/all_cases").json()["cases"]}
        assert statuses["Kept Two"] == "completed"
        assert c.delete(f"/cases/cases/{second['case_id']}").status_code == 200
        assert names() == ["Kept Renamed"]
        assert b.get("/cases/all_cases").json()["total"] == 0


# -- update, analyze ---------------------------------------------------------------------

def test_update_case_changes_fields_and_moves_updated_at(server, alice) -> None:
    with server.client(alice.token) as c:
        case = create(c)["case"]
        r = c.put(f"/cases/cases/{case['case_id']}",
                  json={"patient_name": " Asha R. ", "patient_age": 53, "patient_gender": "F",
                        "case_summary": "Now with fever", "status": "completed"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"message", "case"}
        assert body["message"] == "Case updated successfully"
        new = body["case"]
        check_case(new, alice.id)
        assert (new["patient_name"], new["patient_age"], new["patient_gender"],
                new["case_summary"], new["status"]) == ("Asha R.", 53, "F", "Now with fever",
                                                        "completed")
        assert new["created_at"] == case["created_at"]
        assert ts(new["updated_at"]) > ts(case["updated_at"])
        assert c.get(f"/cases/cases/{case['case_id']}").json()["case"] == new

        # A partial update by integer id touches only what it names.
        r = c.put(f"/cases/cases/{case['id']}", json={"case_summary": None})
        assert r.status_code == 200, r.text
        newer = r.json()["case"]
    assert newer["case_summary"] is None
    assert {k: newer[k] for k in ("patient_name", "patient_age", "status")} == \
        {"patient_name": "Asha R.", "patient_age": 53, "status": "completed"}
    assert ts(newer["updated_at"]) > ts(new["updated_at"])


def test_analyze_queues_a_fresh_run(server, alice) -> None:
    with server.client(alice.token) as c:
        case = create(c)["case"]
        c.put(f"/cases/cases/{case['case_id']}", json={"status": "failed"})
        r = c.post(f"/cases/analyze/{case['case_id']}",
                   json={"includeDifferentialDiagnosis": False, "includeTreatmentSuggestions": True,
                         "confidenceThreshold": 0.5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"message", "case"}
        assert body["message"] == "Case analysis started successfully"
        assert body["case"]["status"] == "processing"
        assert ts(body["case"]["updated_at"]) > ts(case["updated_at"])
        # No body at all is fine too, and by integer id.
        assert c.post(f"/cases/analyze/{case['id']}").status_code == 200
        analysis = c.get(f"/cases/cases/{case['case_id']}").json()["analysis"]
    jobs = server.run(Job.filter(case_id=case["id"]).order_by("id").values("state", "options"))
    assert [j["state"] for j in jobs] == ["cancelled", "cancelled", "queued"]
    assert jobs[1]["options"] == {"include_differential": False, "include_treatment": True,
                                  "confidence_threshold": 0.5}
    assert jobs[2]["options"] == {}
    assert analysis["state"] == "queued" and analysis["queue_position"] == 1


# -- upload ------------------------------------------------------------------------------

def test_upload_one_file_and_many(server, alice) -> None:
    with server.client(alice.token) as c:
        case = create(c, [lab("cbc.csv", df.lab_csv())])["case"]
        c.put(f"/cases/cases/{case['case_id']}", json={"status": "completed"})
        r = c.post("/cases/upload", data={"case_id": case["case_id"], "category": "lab"},
                   files={"file": ("photo.png", df.report_photo_png(), "image/png")})
        assert r.status_code == 201, r.text
        body = r.json()
        assert set(body) == {"message", "file", "files"}
        assert body["message"] == "File uploaded successfully"
        assert body["files"] == [body["file"]]
        f = body["file"]
        check_file(f, server, case["case_id"])
        assert (f["file_name"], f["file_type"], f["file_category"], f["file_size"]) == \
            ("photo.png", "image/png", "lab", len(df.report_photo_png()))
        assert fetch(server, f["file_url"]).content == df.report_photo_png()

        # Repeated ``files`` with no category, by integer case id: category from content.
        r = c.post("/cases/upload", data={"case_id": str(case["id"])},
                   files=[("files", ("a.pdf", df.text_pdf(), "application/pdf")),
                          ("files", ("b.dcm", df.dicom(), "application/dicom")),
                          ("files", ("c.jpg", df.jpeg(), "image/jpeg"))])
        assert r.status_code == 201, r.text
        many = r.json()["files"]
        assert r.json()["file"] == many[0]
        assert [(x["file_type"], x["file_category"]) for x in many] == [
            ("application/pdf", "lab"), ("application/dicom", "radiology"),
            ("image/jpeg", "radiology")]
        got = c.get(f"/cases/cases/{case['case_id']}").json()
    assert got["case"]["status"] == "processing"          # re-analysis queued
    assert ts(got["case"]["updated_at"]) > ts(case["updated_at"])
    assert got["analysis"]["state"] == "queued"
    assert [x["file_id"] for x in got["files"]][1:] == [f["file_id"]] + [x["file_id"] for x in many]
    assert len(stored_files(server)) == 5


# -- files list, file get, file delete ---------------------------------------------------

def test_files_list_and_single_file(server, alice) -> None:
    with server.client(alice.token) as c:
        created = create(c, [lab("cbc.csv", df.lab_csv()), rad("chest.png", df.xray_png())])
        case = created["case"]
        listed = c.get(f"/cases/files/{case['case_id']}")
        assert listed.status_code == 200
        assert set(listed.json()) == {"files"}
        files = listed.json()["files"]
        assert [f["file_id"] for f in files] == [f["file_id"] for f in created["uploaded_files"]]
        assert c.get(f"/cases/files/{case['id']}").json()["files"][1]["file_id"] == \
            files[1]["file_id"]
        for f in files:
            for ident in (f["file_id"], str(f["id"])):
                r = c.get(f"/cases/file/{ident}")
                assert r.status_code == 200
                assert set(r.json()) == {"file"}
                one = r.json()["file"]
                check_file(one, server, case["case_id"])
                assert {k: v for k, v in one.items() if k != "file_url"} == \
                    {k: v for k, v in f.items() if k != "file_url"}
                assert fetch(server, one["file_url"]).status_code == 200


def test_delete_file_removes_row_and_bytes(server, alice) -> None:
    with server.client(alice.token) as c:
        created = create(c, [lab("cbc.csv", df.lab_csv()), rad("chest.png", df.xray_png())])
        case = created["case"]
        first, second = created["uploaded_files"]
        path = stored_path(server, first["file_id"])
        assert path.is_file()
        r = c.delete(f"/cases/file/{first['file_id']}")
        assert r.status_code == 200
        assert r.json() == {"message": "File deleted successfully"}
        assert not path.exists()
        assert c.get(f"/cases/file/{first['file_id']}").status_code == 404
        assert fetch(server, first["file_url"]).status_code == 404
        after = c.get(f"/cases/cases/{case['case_id']}").json()
        assert [f["file_id"] for f in after["files"]] == [second["file_id"]]
        assert ts(after["case"]["updated_at"]) > ts(case["updated_at"])
        # By integer id with the (optional) matching case_id.
        r = c.delete(f"/cases/file/{second['id']}", params={"case_id": case["case_id"]})
        assert r.status_code == 200
    assert stored_files(server) == []
    assert server.run(CaseFile.filter(case_id=case["id"]).count()) == 0


def test_delete_case_removes_rows_and_bytes(server, alice) -> None:
    with server.client(alice.token) as c:
        keep = create(c, [lab("keep.csv", df.lab_csv())])
        gone = create(c, [lab("cbc.csv", df.lab_csv()), rad("chest.dcm", df.dicom())])
        case = gone["case"]
        now = datetime.now(timezone.utc)
        server.run(Insight.create(case_id=case["id"], data=NESTED, model={}, stages=[],
                                  generated_at=now, created_at=now, updated_at=now))
        r = c.delete(f"/cases/cases/{case['case_id']}")
        assert r.status_code == 200
        assert r.json() == {"message": "Case deleted successfully"}
        assert c.get(f"/cases/cases/{case['case_id']}").status_code == 404
        assert c.get(f"/cases/files/{case['case_id']}").status_code == 404
        for f in gone["uploaded_files"]:
            assert c.get(f"/cases/file/{f['file_id']}").status_code == 404
            assert fetch(server, f["file_url"]).status_code == 404
        # The integer id works for delete too.
        other = create(c)["case"]
        assert c.delete(f"/cases/cases/{other['id']}").status_code == 200
        remaining = c.get("/cases/all_cases").json()["cases"]
    assert [x["case_id"] for x in remaining] == [keep["case"]["case_id"]]
    for model in (CaseFile, Insight, Job):
        assert server.run(model.filter(case_id=case["id"]).count()) == 0
    assert stored_files(server) == [stored_path(server, keep["uploaded_files"][0]["file_id"])]


# -- listing -----------------------------------------------------------------------------

PEOPLE = [  # name, age, gender, summary
    ("Ravi Kumar", 34, "male", "Chest pain on exertion"),
    ("asha rao", 52, "female", "Fatigue"),
    ("Meena Iyer", 71, "female", None),
    ("Zubin Shah", 8, "male", "Fever with rash, suspected DENGUE"),
]


@pytest.fixture(scope="module")
def list_owner() -> User:
    return make_user()


@pytest.fixture(scope="module")
def listed(tmp_path_factory, list_owner) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
    """One server for the read-only list tests: the owner's four cases (oldest first) and
    one case of another user's."""
    settings = make_settings(tmp_path_factory.mktemp("list"))
    with serve_in_process(settings, start_workers=False) as server:
        alice, bob = list_owner, make_user()
        out = []
        with server.client(alice.token) as c:
            for name, age, gender, summary in PEOPLE:
                out.append(create(c, patient_name=name, patient_age=str(age),
                                  patient_gender=gender, case_summary=summary or "")["case"])
            c.put(f"/cases/cases/{out[1]['case_id']}", json={"status": "completed"})
        with server.client(bob.token) as c:
            create(c, patient_name="Ravi Kumar")
        yield server, out


def names(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return [c["patient_name"] for c in r.json()["cases"]]


def test_list_defaults_newest_first_with_totals(listed, list_owner) -> None:
    server, cases = listed
    alice = list_owner
    with server.client(alice.token) as c:
        r = c.get("/cases/all_cases")
    body = r.json()
    assert set(body) == {"cases", "total", "page", "limit"}
    assert [x["case_id"] for x in body["cases"]] == [x["case_id"] for x in reversed(cases)]
    assert (body["total"], body["page"], body["limit"]) == (4, 1, 4)
    for item in body["cases"]:
        check_case(item, alice.id)
    assert body["cases"][2]["status"] == "completed"


@pytest.mark.parametrize("params, expected", [
    ({"page": "1", "limit": "2"}, ["Zubin Shah", "Meena Iyer"]),
    ({"page": "2", "limit": "2"}, ["asha rao", "Ravi Kumar"]),
    ({"page": "3", "limit": "2"}, []),
    ({"status": "completed"}, ["asha rao"]),
    ({"status": "processing", "sort_by": "patient_age", "sort_order": "asc"},
     ["Zubin Shah", "Ravi Kumar", "Meena Iyer"]),
    ({"search": "ASHA"}, ["asha rao"]),
    ({"search": "dengue"}, ["Zubin Shah"]),             # in the summary, any case
    ({"search": "%"}, []),                               # LIKE wildcards are literal
    ({"search": "_"}, []),
    ({"search": "a_r"}, []),
    ({"min_age": "34", "max_age": "52"}, ["asha rao", "Ravi Kumar"]),
    ({"minAge": "60"}, ["Meena Iyer"]),
    ({"gender": "FEMALE"}, ["Meena Iyer", "asha rao"]),
    ({"patientGender": "male"}, ["Zubin Shah", "Ravi Kumar"]),
    ({"sort_by": "patient_name", "sort_order": "asc"},
     ["asha rao", "Meena Iyer", "Ravi Kumar", "Zubin Shah"]),
    ({"sortBy": "patient_age", "sortOrder": "desc"},
     ["Meena Iyer", "asha rao", "Ravi Kumar", "Zubin Shah"]),
    ({"sort_by": "created_at", "sort_order": "asc", "pageSize": "3"},
     ["Ravi Kumar", "asha rao", "Meena Iyer"]),
    ({"sort_by": "updated_at"}, ["asha rao", "Zubin Shah", "Meena Iyer", "Ravi Kumar"]),
])
def test_list_filters_sorting_and_aliases(listed, list_owner, params, expected) -> None:
    server, _ = listed
    alice = list_owner
    with server.client(alice.token) as c:
        r = c.get("/cases/all_cases", params=params)
    assert names(r) == expected
    body = r.json()
    if "limit" in params or "pageSize" in params:
        assert body["limit"] == int(params.get("limit") or params["pageSize"])
        assert body["total"] == 4
        assert body["page"] == int(params.get("page", "1"))
    else:
        assert body["total"] == len(expected)


def test_list_date_range_on_created_at(listed, list_owner) -> None:
    server, cases = listed
    alice = list_owner
    second, third = cases[1]["created_at"], cases[2]["created_at"]
    with server.client(alice.token) as c:
        assert names(c.get("/cases/all_cases", params={"start_date": second,
                                                       "end_date": third})) == \
            ["Meena Iyer", "asha rao"]
        assert names(c.get("/cases/all_cases", params={"startDate": third})) == \
            ["Zubin Shah", "Meena Iyer"]
        assert names(c.get("/cases/all_cases", params={"endDate": second})) == \
            ["asha rao", "Ravi Kumar"]
        # A bare date as end_date includes that whole day; one before it excludes all.
        day = ts(cases[0]["created_at"]).date()
        assert len(names(c.get("/cases/all_cases", params={"end_date": day.isoformat()}))) == 4
        before = (day - timedelta(days=1)).isoformat()
        assert names(c.get("/cases/all_cases", params={"end_date": before})) == []
        assert names(c.get("/cases/all_cases", params={"start_date": f"{before}T00:00:00Z"})) \
            == [x["patient_name"] for x in reversed(cases)]
