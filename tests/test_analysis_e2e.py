"""Offline analysis end to end with the real tiny GGUF model through llama-cpp-python:
real server, real queue, real extraction (PDF text, OCR, CSV, DICOM), real decoding.

Output budgets are lowered (llm.max_tokens_*) so a case takes seconds on 2 cores; the
model writes nonsense either way, the tests prove the machinery and the shapes.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

import docfactory as df
from conftest import (MODEL_PATH, Served, cli_token, free_port, kill_group, make_settings,
                      make_user, spawn_server, wait_healthy)

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.skipif(not MODEL_PATH.is_file(),
                                                   reason="default model not installed")]

# Small output budgets keep a real analysis to seconds; schema bounds keep JSON complete.
# (Differential and recommendations need room for their minimum 3 items.)
FAST_LLM = {"max_tokens_lab": 96, "max_tokens_radiology": 96, "max_tokens_summary": 96,
            "max_tokens_soap": 128, "max_tokens_diagnosis": 96,
            "max_tokens_differential": 200, "max_tokens_recommendations": 200, "n_ctx": 2048}

SCORE_FIELDS = ("case_summary_confidence_score", "soap_confidence_score",
                "diagnosis_confidence_score", "overall_confidence_score")


def _settings(tmp_path: Path, workers: int) -> Any:
    return make_settings(tmp_path, llm={**FAST_LLM, "workers": workers, "threads": 1},
                         jobs={"lease_s": 30, "heartbeat_s": 1})


def _wait_done(client: httpx.Client, case_id: str, timeout_s: float = 900) -> dict:
    """Poll until the case leaves `processing` (a bounded wait on a real analysis)."""
    deadline = time.monotonic() + timeout_s
    body: dict = {}
    while time.monotonic() < deadline:
        body = client.get(f"/cases/cases/{case_id}").json()
        if body["case"]["status"] != "processing":
            return body
        time.sleep(0.5)
    raise AssertionError(f"case still processing after {timeout_s} s: {body.get('analysis')}")


def _create(client: httpx.Client, files: list[tuple[str, tuple[str, bytes, str]]],
            summary: str | None = "Fatigue and pallor for three weeks.") -> dict:
    data = {"patient_name": "Test Patient", "patient_age": "58", "patient_gender": "female"}
    if summary is not None:
        data["case_summary"] = summary
    r = client.post("/cases/create_case", data=data, files=files)
    assert r.status_code == 201, r.text
    return r.json()


def test_full_case_reaches_completed_with_every_field(start_server, tmp_path: Path) -> None:
    from medmitra.clinical import icd10

    server: Served = start_server(_settings(tmp_path, workers=1))
    user = make_user()
    files = [
        ("lab_files", ("cbc.pdf", df.text_pdf(df.DEFAULT_LAB_LINES), "application/pdf")),
        ("lab_files", ("cbc.csv", df.lab_csv(), "text/csv")),
        ("lab_files", ("report-photo.png", df.report_photo_png(), "image/png")),
        ("radiology_files", ("chest.png", df.xray_png(), "image/png")),
        ("radiology_files", ("chest.dcm", df.dicom(), "application/dicom")),
    ]
    with server.client(user.token) as c:
        created = _create(c, files)
        case_id = created["case"]["case_id"]
        body = _wait_done(c, case_id)

    assert body["case"]["status"] == "completed", body["analysis"]
    a = body["analysis"]
    assert a["state"] == "completed" and a["error"] is None and a["progress"] == 1.0
    assert a["attempts"] >= 1 and a["started_at"] and a["finished_at"]

    flat, nested = body["ai_insights"], body["insights"]
    for key in ("comprehensive_summary", "doctor_notes", "lab_summary", "radiology_summary",
                "soap_subjective", "soap_objective", "soap_assessment", "soap_plan",
                "primary_diagnosis", "diagnosis_description", "generated_at"):
        assert isinstance(flat[key], str), key
    assert isinstance(flat["key_findings"], list) and isinstance(flat["supporting_evidence"], list)
    assert isinstance(flat["patient_context"], dict)
    for key in SCORE_FIELDS:   # null where the section was abstained
        assert flat[key] is None or (isinstance(flat[key], (int, float))
                                     and 0.0 <= flat[key] <= 1.0), key
    scores = [flat[k] for k in SCORE_FIELDS[:3] if flat[k] is not None]
    if scores:
        assert flat["overall_confidence_score"] == pytest.approx(sum(scores) / len(scores))
    else:
        assert flat["overall_confidence_score"] is None
    # The ICD code is a real ICD-10-CM code or null, never passed through unchecked.
    code = flat["icd_code"]
    assert code is None or (icd10.is_valid(code) and flat["diagnosis_description"]
                            == icd10.title(code))
    assert (code is None) == (nested["primary_diagnosis"]["icd_reason"] is not None)
    assert flat["case_id"] == case_id and flat["doctor_notes"].startswith("Fatigue")
    # Patient context is copied from the case; the model never saw the name.
    assert flat["patient_context"] == {"name": "Test Patient", "age": 58, "gender": "female"}
    model_written = {k: v for k, v in nested.items() if k != "case_summary"}
    assert "Test Patient" not in json.dumps(model_written)

    assert set(nested) >= {"case_summary", "soap_note", "primary_diagnosis",
                           "differential_diagnoses", "investigation_recommendations",
                           "treatment_recommendations", "overall_confidence_score",
                           "generated_at", "model"}
    assert "SmolLM2" in nested["model"]
    # Every stage either produced an accepted answer or abstained with its reason.
    for stage, st in nested["stages"].items():
        assert st["status"] in ("ok", "retried", "abstained"), stage
        assert (st["reason"] is not None) == (st["status"] == "abstained"), stage
    _assert_no_junk(nested)
    if nested["stages"]["differential"]["status"] == "abstained":
        assert nested["differential_diagnoses"] == []
    else:  # those no fact supports are left out (clinical/grounding.py)
        assert 1 <= len(nested["differential_diagnoses"]) <= 5
    # The facts: every parsed lab row, every abnormal one a key finding.
    labs = nested["labs"]
    hb_rows = [r for r in labs if r["analyte"] == "Hemoglobin"]
    assert len(hb_rows) >= 2 and all(r["flag"] == "low" for r in hb_rows)
    assert {r["page"] for r in hb_rows if r["page"] is not None} == {1}
    assert nested["lab_counts"]["rows_parsed"] == len(labs)
    for r in labs:
        if r["flag"] in ("low", "high"):
            assert any(f.startswith(f"{r['analyte']} {r['value']}")
                       for f in flat["key_findings"]), r
    for d in nested["differential_diagnoses"]:
        assert set(d) >= {"condition", "probability", "reasoning", "distinguishing_factors"}
        assert 0.0 <= d["probability"] <= 1.0 and isinstance(d["distinguishing_factors"], list)
    for inv in nested["investigation_recommendations"]:
        assert inv["urgency"] in ("urgent", "routine", "follow-up")
    for t in nested["treatment_recommendations"]:
        assert isinstance(t["precautions"], list)

    by_name = {f["file_name"]: f for f in body["files"]}
    assert "Hemoglobin" in by_name["cbc.pdf"]["text_data"]
    csv_summary = json.loads(by_name["cbc.csv"]["ai_summary"])
    hb = {k.lower(): v for k, v in csv_summary["lab_values"].items()}["hemoglobin"]
    assert hb["value"] == "9.1" and hb["status"] == "abnormal"   # deterministic flag wins
    assert [r["flag"] for r in csv_summary["labs"] if r["analyte"] == "Hemoglobin"] == ["low"]
    # OCR read the photographed report.
    assert "hemoglobin" in (by_name["report-photo.png"]["text_data"] or "").lower()
    for name in ("chest.png", "chest.dcm"):
        rad = json.loads(by_name[name]["ai_summary"])
        assert set(rad) >= {"findings", "impressions", "summary", "key_abnormalities",
                            "confidence_score"}
        # No vision model is configured: the record says so and claims nothing.
        assert rad["confidence_score"] is None and "not read" in rad["findings"].lower()
    assert "Modality" in by_name["chest.dcm"]["text_data"]
    assert "DOE" not in (by_name["chest.dcm"]["text_data"] or "")


def _assert_no_junk(nested: dict) -> None:
    """No stored model-written text is junk by the filter's own rules."""
    from medmitra.clinical import junk

    for section in ("soap_note", "primary_diagnosis", "differential_diagnoses",
                    "investigation_recommendations", "treatment_recommendations"):
        for field, text in junk.text_fields(nested[section]):
            # supporting_evidence is the cited facts' own text, not model-written.
            if text and text != "Not available." and field not in ("icd_code", "urgency",
                                                                   "supporting_evidence"):
                assert junk.junk_reason(text, field) is None, (section, field, text)


def test_a_name_in_a_pdf_header_never_reaches_the_model_or_the_output(tmp_path: Path) -> None:
    """The real model, in-process, with every message it is sent recorded."""
    from medmitra.config import LLMSettings
    from medmitra.llm.llama import LlamaRuntime
    from medmitra.pipeline.extract import extract_file
    from medmitra.pipeline.stages import run_analysis
    from medmitra.pipeline.types import CaseInput

    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(df.text_pdf(["CITY DIAGNOSTICS LAB",
                                 "Patient: Ramesh Kumarswamy   Age/Sex: 45/M",
                                 "MRN: 77812-Q   DOB: 02/03/1981",
                                 *df.DEFAULT_LAB_LINES[1:]]))
    f = extract_file(pdf, file_id="f1", category="lab", mime="application/pdf",
                     file_name="kumarswamy-cbc.pdf")
    assert "Kumarswamy" in f.text and [r.test for r in f.lab_rows] == \
        ["Hemoglobin", "WBC", "Platelets"]          # the header line is not a lab row
    rt = LlamaRuntime(MODEL_PATH, n_ctx=2048, threads=1, seed=42)
    sent: list[str] = []
    real = rt.complete_json

    def spy(messages, schema, **kw):
        sent.append(json.dumps(messages))
        return real(messages, schema, **kw)

    rt.complete_json = spy
    try:
        case = CaseInput(case_id="c", patient_name="Sunita Devi", patient_age=45,
                         patient_gender="male",
                         doctor_notes="Sunita Devi reports fatigue. Seen with Ramesh Kumarswamy.",
                         files=[f])
        llm = LLMSettings(**{k: v for k, v in FAST_LLM.items()})
        result = run_analysis(case, rt, llm, progress=lambda s, x: None,
                              should_stop=lambda: False)
    finally:
        rt.close()
    assert sent
    for text in sent:
        for secret in ("Ramesh", "Kumarswamy", "Sunita", "Devi", "77812", "1981"):
            assert secret not in text, secret
    out = json.dumps({k: v for k, v in result.insights.items() if k != "case_summary"}) + \
        json.dumps(result.file_summaries)
    for secret in ("Ramesh", "Kumarswamy", "Sunita", "Devi"):
        assert secret not in out, secret


def test_api_stays_responsive_while_two_analyses_run(start_server, tmp_path: Path) -> None:
    server: Served = start_server(_settings(tmp_path, workers=2))
    user = make_user()
    with server.client(user.token) as c:
        ids = [_create(c, [("lab_files", ("labs.csv", df.lab_csv(), "text/csv"))],
                       summary=None)["case"]["case_id"] for _ in range(2)]
        # Wait (bounded) until both are running, then use the API while they compute.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            states = [c.get(f"/cases/cases/{i}").json()["analysis"]["state"] for i in ids]
            if states == ["running", "running"]:
                break
            time.sleep(0.05)
        assert states == ["running", "running"], states
        slowest = 0.0
        for _ in range(40):
            t0 = time.perf_counter()
            h = c.get("/health", timeout=5)
            lst = c.get("/cases/all_cases", timeout=5)
            slowest = max(slowest, time.perf_counter() - t0)
            assert h.status_code == 200 and lst.status_code == 200
            assert lst.json()["total"] == 2
        workers = h.json()["workers"]
        assert len(workers) == 2
        # Both workers were busy with distinct jobs at some point of this test.
        print(f"slowest health+list pair while 2 analyses ran: {slowest * 1000:.1f} ms")
        for i in ids:
            assert _wait_done(c, i)["case"]["status"] == "completed"


PROCESS_ENV = {"MEDMITRA_LLM_WORKERS": "1", "MEDMITRA_LLM_MODEL_PATH": str(MODEL_PATH),
               "MEDMITRA_JOBS_LEASE_S": "30", "MEDMITRA_JOBS_HEARTBEAT_S": "1",
               **{f"MEDMITRA_LLM_{k.upper()}": str(v) for k, v in FAST_LLM.items()}}


def test_sigkill_during_analysis_then_restart_completes(tmp_path: Path) -> None:
    data, port, log = tmp_path / "data", free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    user = str(uuid.uuid4())
    token = cli_token(data, user)
    h = {"Authorization": f"Bearer {token}"}
    proc = spawn_server(data, port, log, **PROCESS_ENV)
    try:
        wait_healthy(url, proc, timeout_s=60)
        r = httpx.post(f"{url}/cases/create_case", headers=h, timeout=30,
                       data={"patient_name": "Kill Test", "patient_age": "40",
                             "patient_gender": "male"},
                       files=[("lab_files", ("labs.csv", df.lab_csv(), "text/csv"))])
        assert r.status_code == 201
        case_id = r.json()["case"]["case_id"]
        # Kill the moment the analysis is past its first model stage.
        deadline = time.monotonic() + 120
        stage = None
        while time.monotonic() < deadline:
            a = httpx.get(f"{url}/cases/cases/{case_id}", headers=h, timeout=10).json()["analysis"]
            stage = a["stage"]
            if a["state"] == "running" and stage not in (None, "extract"):
                break
            time.sleep(0.05)
        assert stage not in (None, "extract"), "analysis never got to a model stage"
    finally:
        kill_group(proc)

    proc = spawn_server(data, port, log, **PROCESS_ENV)
    try:
        wait_healthy(url, proc, timeout_s=60)
        with httpx.Client(base_url=url, headers=h, timeout=10) as c:
            body = _wait_done(c, case_id)
            assert body["case"]["status"] == "completed", body["analysis"]
            assert body["analysis"]["attempts"] == 2       # the killed run counted once
            assert body["insights"] is not None
            cases = c.get("/cases/all_cases").json()["cases"]
            assert all(x["status"] != "processing" for x in cases)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
