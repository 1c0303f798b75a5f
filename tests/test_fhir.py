"""FHIR R4 export (issue 12 part 4): GET /cases/cases/{id}/fhir and `medmitra export`.

Every bundle is validated with the fhir.resources package (its R4B models: since version
7 the package carries R4 as R4B, identical for the resources exported here), for a case
without insights and for one analysed by the worker pool.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import docfactory as df
from conftest import Served, make_settings, make_user
from medmitra.cli import main
from medmitra.llm.runtime import FakeRuntime
from medmitra.ops import fhir

Bundle = pytest.importorskip("fhir.resources.R4B.bundle").Bundle


def _validate(bundle: dict[str, Any]) -> None:
    Bundle.model_validate(bundle)          # raises on any R4 structure error
    for e in bundle["entry"]:
        cls = e["resource"]["resourceType"]
        mod = pytest.importorskip(f"fhir.resources.R4B.{cls.lower()}")
        getattr(mod, cls).model_validate(e["resource"])


def _of(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def _cat(report: dict[str, Any]) -> str | None:
    cats = report.get("category") or [{}]
    return (cats[0].get("coding") or [{}])[0].get("code")


def _create(c: httpx.Client) -> str:
    r = c.post("/cases/create_case",
               data={"patient_name": "Fhir Patient", "patient_age": "58",
                     "patient_gender": "female"},
               files=[("lab_files", ("cbc.csv", df.lab_csv(), "text/csv")),
                      ("lab_files", ("cbc.pdf", df.text_pdf(df.DEFAULT_LAB_LINES),
                                     "application/pdf")),
                      ("radiology_files", ("cxr.png", df.xray_png(), "image/png"))])
    assert r.status_code == 201, r.text
    return r.json()["case"]["case_id"]


def test_case_without_insights_exports_a_valid_bundle(start_app, tmp_path: Path) -> None:
    # No workers: nothing extracted or analysed yet; the bundle still validates.
    server = start_app(make_settings(tmp_path))
    user = make_user()
    with server.client(user.token) as c:
        case = _create(c)
        r = c.get(f"/cases/cases/{case}/fhir")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/fhir+json")
    bundle = r.json()
    _validate(bundle)
    assert bundle["type"] == "collection"
    (patient,) = _of(bundle, "Patient")
    assert patient["name"] == [{"text": "Fhir Patient"}] and patient["gender"] == "female"
    reports = _of(bundle, "DiagnosticReport")
    assert len(reports) == 3
    assert {_cat(r) for r in reports} == {"LAB", "RAD"}
    assert not _of(bundle, "Condition") and not _of(bundle, "Provenance")


def test_analysed_case_has_labs_condition_and_provenance(start_app, tmp_path: Path) -> None:
    server = start_app(make_settings(tmp_path, llm={"workers": 1},
                                        jobs={"poll_s": 0.05}), runtime_factory=FakeRuntime)
    user = make_user()
    with server.client(user.token) as c:
        case = _create(c)
        deadline = time.monotonic() + 90
        while c.get(f"/cases/cases/{case}").json()["case"]["status"] == "processing":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        view = c.get(f"/cases/cases/{case}").json()
        bundle = c.get(f"/cases/cases/{case}/fhir").json()
    _validate(bundle)
    obs = {o["code"]["text"]: o for o in _of(bundle, "Observation")}
    hb = obs["Hemoglobin"]
    assert hb["code"]["coding"][0] == {"system": "http://loinc.org", "code": "718-7",
                                       "display": "Hemoglobin [Mass/volume] in Blood"}
    assert hb["valueQuantity"] == {"value": 9.1, "unit": "g/dL",
                                   "system": "http://unitsofmeasure.org", "code": "g/dL"}
    assert hb["referenceRange"][0]["low"]["value"] == 13.5
    assert hb["interpretation"][0]["coding"][0]["code"] == "L"
    assert obs["Glucose (fasting)"]["interpretation"][0]["coding"][0]["code"] in ("H", "HH")
    assert obs["WBC"]["interpretation"][0]["coding"][0]["code"] == "N"
    assert obs["WBC"]["valueQuantity"]["code"] == "10*3/uL"
    hiv = obs["HIV 1/2 antibody"]
    assert hiv["valueString"] == "Non-reactive" and "coding" not in hiv["code"]
    assert obs["Age"]["valueQuantity"]["value"] == 58
    lab_reports = [r for r in _of(bundle, "DiagnosticReport") if _cat(r) == "LAB"]
    assert any(len(r.get("result", [])) >= 7 for r in lab_reports)
    assert all(r["presentedForm"][0]["contentType"].startswith("text/plain")
               for r in lab_reports)

    dx = view["insights"]["primary_diagnosis"]
    conditions = _of(bundle, "Condition")
    (prov,) = _of(bundle, "Provenance")
    (device,) = _of(bundle, "Device")
    if dx["primary_diagnosis"] and not dx["primary_diagnosis"].lower().startswith(
            "not available"):
        (cond,) = conditions
        assert cond["code"]["text"] == dx["primary_diagnosis"]
        assert cond["verificationStatus"]["coding"][0]["code"] == "provisional"
        assert cond["meta"]["security"][0]["code"] == "AIAST"
        if dx["icd_code"]:
            assert cond["code"]["coding"][0]["system"] == "http://hl7.org/fhir/sid/icd-10-cm"
            assert cond["code"]["coding"][0]["code"] == dx["icd_code"]
    urls = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
    targets = [urls[t["reference"]] for t in prov["target"]]
    assert targets and all(t["meta"]["security"][0]["code"] == "AIAST" for t in targets)
    assert urls[prov["agent"][0]["who"]["reference"]] is device or \
        urls[prov["agent"][0]["who"]["reference"]] == device
    assert device["deviceName"][0]["name"] == view["insights"]["model"]


def test_other_users_case_is_404_and_no_token_401(server: Served) -> None:
    alice, bob = make_user(), make_user()
    with server.client(alice.token) as c:
        case = _create(c)
    with server.client(bob.token) as c:
        r = c.get(f"/cases/cases/{case}/fhir")
        assert r.status_code == 404 and r.json()["detail"] == "Case not found"
    assert server.client().get(f"/cases/cases/{case}/fhir").status_code == 401
    with server.client(alice.token) as c:
        assert c.get("/cases/cases/00000000-0000-0000-0000-000000000000/fhir"
                     ).status_code == 404


def test_cli_export_writes_the_same_bundle(server: Served, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    user = make_user()
    with server.client(user.token) as c:
        case = _create(c)
        via_http = c.get(f"/cases/cases/{case}/fhir").json()
    out = tmp_path / "bundle.json"
    assert main(["export", "--format", "fhir", "--case", case, "--out", str(out),
                 "--data-dir", str(server.settings.data_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads(out.read_text()) == via_http
    assert main(["export", "--format", "fhir", "--case",
                 "00000000-0000-0000-0000-000000000000", "--out", str(out),
                 "--data-dir", str(server.settings.data_path)]) == 1


def test_units_and_codes_only_where_known() -> None:
    assert fhir.ucum_for("10^3/uL") == "10*3/uL" and fhir.ucum_for("mg/dL") == "mg/dL"
    assert fhir.ucum_for("furlongs") is None and fhir.ucum_for(None) is None
    assert fhir.loinc_for("Hemoglobin", "g/dL")[0] == "718-7"
    assert fhir.loinc_for("Hemoglobin", "mmol/L") is None       # other property: no code
    assert fhir.loinc_for("Mystery analyte", "g/dL") is None
    assert fhir._interpretation("high", True) == "HH"
    assert fhir._interpretation("unknown", False) is None
