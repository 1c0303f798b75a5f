"""FHIR R4 export of one case: a ``collection`` Bundle built as plain dicts (no model
classes in the binary; the tests validate every bundle with the fhir.resources package).

Contents:
- ``Patient``: name, gender; the age as an ``Observation`` (LOINC 30525-0), since R4's
  Patient has birthDate only and the case records an age.
- ``Observation`` per lab row: value (Quantity with a UCUM code where the unit is known,
  else the printed value as a string), reference range, interpretation H/L/N (HH/LL for
  critical values) from the deterministic flags, LOINC coding only where a mapping below is
  known for that analyte *and* unit, the analyte's printed name as text always.
- ``DiagnosticReport`` per file: lab (LAB) with its observations, radiology (RAD); the
  extracted text as ``presentedForm`` (text/plain).
- ``Condition`` for the primary diagnosis with its ICD-10-CM coding, verification status
  ``provisional``: it is the model's suggestion.
- The model's content is marked as machine-generated: a ``Device`` naming the model, a
  ``Provenance`` whose targets are the AI-written resources with that device as author, and
  the HL7 security label AIAST ("artificial intelligence asserted") on each of them.
"""

from __future__ import annotations

import base64
import json
import re
import sys
import uuid
from typing import Any

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, raw

from medmitra.db import reads

FHIR_JSON = "application/fhir+json"
UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
REPORT_CATEGORY = "http://terminology.hl7.org/CodeSystem/v2-0074"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
PROVENANCE_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
AI_ASSERTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
               "code": "AIAST", "display": "Artificial Intelligence asserted"}
# A namespace for the bundle's urn:uuid ids: the same case exports with the same ids.
_NS = uuid.UUID("8f0b6a0e-4c1e-5a53-9d0e-6d6564746d72")

# Printed unit (lower-cased, spaces removed) -> UCUM code.
UCUM_UNITS = {
    "g/dl": "g/dL", "mg/dl": "mg/dL", "mg/l": "mg/L", "g/l": "g/L", "ng/ml": "ng/mL",
    "ng/dl": "ng/dL", "pg/ml": "pg/mL", "ug/dl": "ug/dL", "µg/dl": "ug/dL", "ug/l": "ug/L",
    "µg/l": "ug/L", "mmol/l": "mmol/L", "umol/l": "umol/L", "µmol/l": "umol/L",
    "pmol/l": "pmol/L", "nmol/l": "nmol/L", "meq/l": "meq/L", "u/l": "U/L", "iu/l": "[IU]/L",
    "miu/l": "m[IU]/L", "uiu/ml": "u[IU]/mL", "µiu/ml": "u[IU]/mL", "%": "%", "fl": "fL",
    "pg": "pg", "mm/hr": "mm/h", "mm/h": "mm/h", "s": "s", "sec": "s", "/ul": "/uL",
    "cells/ul": "/uL", "/µl": "/uL", "10^3/ul": "10*3/uL", "x10^3/ul": "10*3/uL",
    "10^6/ul": "10*6/uL", "x10^6/ul": "10*6/uL", "10^9/l": "10*9/L", "x10^9/l": "10*9/L",
    "10^12/l": "10*12/L", "x10^12/l": "10*12/L", "k/ul": "10*3/uL", "m/ul": "10*6/uL",
    "mg/24h": "mg/(24.h)", "ml/min/1.73m2": "mL/min/{1.73_m2}",
}
# Analyte (lower-cased) -> (LOINC code, display, UCUM codes that code's property accepts).
_MASS_CONC = ("g/dL", "mg/dL", "g/L", "mg/L")
LOINC_CODES: dict[str, tuple[str, str, tuple[str, ...]]] = {}
for _names, _entry in (
    (("hemoglobin", "haemoglobin", "hb", "hgb"),
     ("718-7", "Hemoglobin [Mass/volume] in Blood", ("g/dL", "g/L"))),
    (("hematocrit", "haematocrit", "hct", "pcv"),
     ("4544-3", "Hematocrit [Volume Fraction] of Blood by Automated count", ("%",))),
    (("wbc", "white blood cells", "white blood cell count", "total leukocyte count", "tlc",
      "leukocytes"),
     ("6690-2", "Leukocytes [#/volume] in Blood by Automated count",
      ("10*3/uL", "10*9/L", "/uL"))),
    (("rbc", "red blood cells", "red blood cell count", "erythrocytes"),
     ("789-8", "Erythrocytes [#/volume] in Blood by Automated count",
      ("10*6/uL", "10*12/L"))),
    (("platelets", "platelet count", "plt"),
     ("777-3", "Platelets [#/volume] in Blood by Automated count",
      ("10*3/uL", "10*9/L", "/uL"))),
    (("mcv", "mean corpuscular volume"),
     ("787-2", "MCV [Entitic volume] by Automated count", ("fL",))),
    (("mch", "mean corpuscular hemoglobin"),
     ("785-6", "MCH [Entitic mass] by Automated count", ("pg",))),
    (("mchc",), ("786-4", "MCHC [Mass/volume] by Automated count", ("g/dL", "g/L"))),
    (("glucose", "fasting glucose", "glucose fasting", "glucose, fasting", "fasting blood sugar",
      "fbs", "blood glucose", "plasma glucose"),
     ("2345-7", "Glucose [Mass/volume] in Serum or Plasma", ("mg/dL",))),
    (("creatinine", "serum creatinine"),
     ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", ("mg/dL",))),
    (("bun", "blood urea nitrogen", "urea nitrogen"),
     ("3094-0", "Urea nitrogen [Mass/volume] in Serum or Plasma", ("mg/dL",))),
    (("sodium", "na"), ("2951-2", "Sodium [Moles/volume] in Serum or Plasma",
                        ("mmol/L", "meq/L"))),
    (("potassium", "k"), ("2823-3", "Potassium [Moles/volume] in Serum or Plasma",
                          ("mmol/L", "meq/L"))),
    (("chloride", "cl"), ("2075-0", "Chloride [Moles/volume] in Serum or Plasma",
                          ("mmol/L", "meq/L"))),
    (("calcium", "ca", "total calcium"),
     ("17861-6", "Calcium [Mass/volume] in Serum or Plasma", ("mg/dL",))),
    (("alt", "sgpt", "alanine aminotransferase"),
     ("1742-6", "Alanine aminotransferase [Enzymatic activity/volume] in Serum or Plasma",
      ("U/L",))),
    (("ast", "sgot", "aspartate aminotransferase"),
     ("1920-8", "Aspartate aminotransferase [Enzymatic activity/volume] in Serum or Plasma",
      ("U/L",))),
    (("alp", "alkaline phosphatase"),
     ("6768-6", "Alkaline phosphatase [Enzymatic activity/volume] in Serum or Plasma",
      ("U/L",))),
    (("total bilirubin", "bilirubin total", "bilirubin, total", "bilirubin"),
     ("1975-2", "Bilirubin.total [Mass/volume] in Serum or Plasma", ("mg/dL",))),
    (("albumin",), ("1751-7", "Albumin [Mass/volume] in Serum or Plasma", ("g/dL", "g/L"))),
    (("total protein", "protein total", "protein, total"),
     ("2885-2", "Protein [Mass/volume] in Serum or Plasma", ("g/dL", "g/L"))),
    (("hba1c", "hemoglobin a1c", "glycated hemoglobin", "glycosylated hemoglobin"),
     ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", ("%",))),
    (("tsh", "thyroid stimulating hormone"),
     ("3016-3", "Thyrotropin [Units/volume] in Serum or Plasma", ("m[IU]/L", "u[IU]/mL"))),
    (("total cholesterol", "cholesterol", "cholesterol, total"),
     ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", ("mg/dL",))),
    (("hdl", "hdl cholesterol", "hdl-c"),
     ("2085-9", "Cholesterol in HDL [Mass/volume] in Serum or Plasma", ("mg/dL",))),
    (("triglycerides", "tg"),
     ("2571-8", "Triglyceride [Mass/volume] in Serum or Plasma", ("mg/dL",))),
    (("crp", "c-reactive protein"),
     ("1988-5", "C reactive protein [Mass/volume] in Serum or Plasma", ("mg/L", "mg/dL"))),
    (("ferritin",), ("2276-4", "Ferritin [Mass/volume] in Serum or Plasma", ("ng/mL", "ug/L"))),
):
    for _n in _names:
        LOINC_CODES[_n] = _entry
AGE_LOINC = ("30525-0", "Age")
LAB_REPORT_LOINC = ("11502-2", "Laboratory report")
IMAGING_LOINC = ("18748-4", "Diagnostic imaging study")


def _uid(*parts: Any) -> str:
    return f"urn:uuid:{uuid.uuid5(_NS, '/'.join(str(p) for p in parts))}"


def _norm_name(name: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w%+,\- ]", " ", name.lower())).strip(" ,-")


def ucum_for(unit: str | None) -> str | None:
    if not unit:
        return None
    key = unit.strip().lower().replace(" ", "").replace("×", "x").replace("μ", "µ")
    return UCUM_UNITS.get(key)


def loinc_for(analyte: str, ucum: str | None) -> tuple[str, str] | None:
    entry = LOINC_CODES.get(_norm_name(analyte))
    if entry is None or ucum is None or ucum not in entry[2]:
        return None
    return entry[0], entry[1]


def _interpretation(flag: str, critical: bool) -> str | None:
    """H/L/N from the deterministic flag (HH/LL for a value past a critical limit)."""
    if flag == "high":
        return "HH" if critical else "H"
    if flag == "low":
        return "LL" if critical else "L"
    if flag == "normal":
        return "N"
    return None


def lab_rows(view: dict[str, Any], nested: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The case's lab rows in the contract's ``insights.labs`` shape. Taken from the
    insights when the analysis recorded them, else parsed deterministically from each lab
    file's extracted text with the analysis's own parser (medmitra.clinical.labs)."""
    if nested and isinstance(nested.get("labs"), list):
        return [r for r in nested["labs"] if isinstance(r, dict) and r.get("analyte")]
    from medmitra.clinical import labs

    out: list[dict[str, Any]] = []
    for f in view["files"]:
        if f["file_category"] != "lab" or not f.get("text_data"):
            continue
        text = f["text_data"]
        for row in _rendered_rows(text) or labs.parse_text_lines(text):
            out.append({"analyte": row.test, "value": row.value, "numeric": row.numeric,
                        "unit": row.unit, "range": row.reference_range, "flag": row.flag,
                        "lab_flag": row.lab_flag, "critical": row.critical,
                        "file_id": f["file_id"], "page": row.page})
    return out


# CSV rows are stored rendered by clinical.labs.render_row:
# "Test: value unit (reference R) [direction; report marker M; critical]".
_RENDERED_RE = re.compile(r"^(?P<test>[^:\n]{1,120}): (?P<value>\S+)(?: (?P<unit>[^(\[\n]+?))?"
                          r"(?: \((?:reference|ref) (?P<range>[^)\n]*)\))? \[(?P<marks>[^\]]*)\]$")


def _rendered_rows(text: str) -> list[Any]:
    from medmitra.clinical import labs

    out = []
    for line in text.splitlines():
        m = _RENDERED_RE.match(line.strip())
        if not m:
            continue
        marks = [x.strip() for x in m["marks"].split(";")]
        marker = next((x.removeprefix("report marker ") for x in marks
                       if x.startswith("report marker ")), None)
        row = labs.make_row(m["test"], m["value"], m["unit"], m["range"], marker)
        row.critical = row.critical or "critical" in marks
        out.append(row)
    return out


def _quantity(value: float, unit: str | None) -> dict[str, Any]:
    q: dict[str, Any] = {"value": value}
    code = ucum_for(unit)
    if unit:
        q["unit"] = unit
    if code:
        q.update(system=UCUM, code=code)
    return q


def _observation(row: dict[str, Any], patient_ref: str, when: str | None, case_uuid: str,
                 n: int) -> dict[str, Any]:
    analyte = str(row["analyte"])
    unit = row.get("unit") or None
    code: dict[str, Any] = {"text": analyte}
    loinc = loinc_for(analyte, ucum_for(unit))
    if loinc:
        code["coding"] = [{"system": LOINC, "code": loinc[0], "display": loinc[1]}]
    obs: dict[str, Any] = {
        "resourceType": "Observation", "status": "final",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": "laboratory",
                                  "display": "Laboratory"}]}],
        "code": code, "subject": {"reference": patient_ref},
    }
    if when:
        obs["effectiveDateTime"] = when
    numeric = row.get("numeric")
    if isinstance(numeric, (int, float)) and not isinstance(numeric, bool):
        obs["valueQuantity"] = _quantity(numeric, unit)
    elif row.get("value") not in (None, ""):
        obs["valueString"] = str(row["value"])
    else:
        obs["dataAbsentReason"] = {"text": "no value"}
    rng_text = row.get("range")
    if rng_text:
        from medmitra.clinical.ranges import parse_range

        rr: dict[str, Any] = {"text": str(rng_text)}
        parsed = parse_range(str(rng_text))
        if parsed is not None:
            low, high = parsed.low, parsed.high
            if low is not None:
                rr["low"] = _quantity(low, unit)
            if high is not None:
                rr["high"] = _quantity(high, unit)
        obs["referenceRange"] = [rr]
    interp = _interpretation(str(row.get("flag")), bool(row.get("critical")))
    if interp:
        obs["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": interp}]}]
    return obs


def _text_attachment(text: str, title: str) -> dict[str, Any]:
    return {"contentType": "text/plain; charset=utf-8", "title": title[:200],
            "data": base64.b64encode(text.encode("utf-8")).decode("ascii")}


def _gender(raw: str | None) -> str:
    g = (raw or "").strip().lower()
    return {"male": "male", "m": "male", "man": "male", "female": "female", "f": "female",
            "woman": "female", "other": "other", "unknown": "unknown"}.get(g, "unknown"
                                                                             if not g else "other")


def _ai_meta() -> dict[str, Any]:
    return {"security": [AI_ASSERTED]}


def _available(text: Any) -> bool:
    return isinstance(text, str) and bool(text.strip()) and \
        not text.strip().lower().startswith("not available")


def build_bundle(view: dict[str, Any], nested: dict[str, Any] | None) -> dict[str, Any]:
    """The case (reads.case_view's rows) and its nested insights as a FHIR R4 Bundle."""
    case = view["case"]
    cid = case["case_id"]
    entries: list[dict[str, Any]] = []

    def add(resource: dict[str, Any], *key: Any) -> str:
        url = _uid(cid, *key)
        entries.append({"fullUrl": url, "resource": resource})
        return url

    patient_ref = add({"resourceType": "Patient",
                       "identifier": [{"system": "urn:medmitra:case", "value": cid}],
                       "name": [{"text": case["patient_name"]}],
                       "gender": _gender(case["patient_gender"])}, "patient")
    add({"resourceType": "Observation", "status": "final",
         "code": {"coding": [{"system": LOINC, "code": AGE_LOINC[0], "display": AGE_LOINC[1]}],
                  "text": "Age"},
         "subject": {"reference": patient_ref},
         "effectiveDateTime": reads.iso(case["created_at"]),
         "valueQuantity": {"value": case["patient_age"], "unit": "years", "system": UCUM,
                           "code": "a"}}, "age")

    rows = lab_rows(view, nested)
    by_file: dict[str, list[str]] = {}
    uploaded = {f["file_id"]: reads.iso(f["uploaded_at"]) for f in view["files"]}
    for n, row in enumerate(rows):
        ref = add(_observation(row, patient_ref, uploaded.get(row.get("file_id")), cid, n),
                  "lab", n)
        by_file.setdefault(str(row.get("file_id")), []).append(ref)

    ai_targets: list[str] = []
    for f in view["files"]:
        lab = f["file_category"] == "lab"
        code = LAB_REPORT_LOINC if lab else IMAGING_LOINC
        report: dict[str, Any] = {
            "resourceType": "DiagnosticReport", "status": "final",
            "category": [{"coding": [{"system": REPORT_CATEGORY, "code": "LAB" if lab
                                      else "RAD"}]}],
            "code": {"coding": [{"system": LOINC, "code": code[0], "display": code[1]}],
                     "text": f["file_name"]},
            "subject": {"reference": patient_ref},
            "issued": reads.iso(f["uploaded_at"]),
        }
        if by_file.get(f["file_id"]):
            report["result"] = [{"reference": r} for r in by_file[f["file_id"]]]
        if f.get("text_data"):
            report["presentedForm"] = [_text_attachment(f["text_data"], f["file_name"])]
        summary = _radiology_summary(f.get("ai_summary")) if not lab else None
        if summary:
            # The model's reading of the image or report: marked, and named in Provenance.
            report["conclusion"] = summary
            report["status"] = "preliminary"
            report["meta"] = _ai_meta()
        url = add(report, "report", f["file_id"])
        if summary:
            ai_targets.append(url)

    if nested:
        dx = nested.get("primary_diagnosis") or {}
        text = dx.get("primary_diagnosis")
        if _available(text):
            cond: dict[str, Any] = {
                "resourceType": "Condition", "meta": _ai_meta(),
                "clinicalStatus": {"coding": [{"system": CONDITION_CLINICAL,
                                               "code": "active"}]},
                "verificationStatus": {"coding": [{"system": CONDITION_VERIFICATION,
                                                   "code": "provisional"}]},
                "code": {"text": text}, "subject": {"reference": patient_ref},
                "recordedDate": nested.get("generated_at"),
                "note": [{"text": _ai_note(nested, dx)}],
            }
            if dx.get("icd_code"):
                cond["code"]["coding"] = [{"system": ICD10CM, "code": dx["icd_code"],
                                           **({"display": dx["description"]}
                                              if dx.get("description") else {})}]
            if not cond["recordedDate"]:
                del cond["recordedDate"]
            ai_targets.append(add(cond, "condition"))
        summary = (nested.get("case_summary") or {}).get("comprehensive_summary")
        if _available(summary):
            ai_targets.append(add({
                "resourceType": "DiagnosticReport", "status": "preliminary",
                "meta": _ai_meta(),
                "code": {"text": "AI case summary (machine-generated)"},
                "subject": {"reference": patient_ref},
                **({"issued": nested["generated_at"]} if nested.get("generated_at") else {}),
                "conclusion": summary}, "ai-summary"))
    if ai_targets:
        model = _model_info(nested)
        device_ref = add({"resourceType": "Device",
                          "deviceName": [{"name": model["name"], "type": "model-name"}],
                          "type": {"text": "AI language model (machine-generated content)"},
                          **({"note": [{"text": model["note"]}]} if model.get("note")
                             else {})}, "device", model["name"])
        add({"resourceType": "Provenance",
             "target": [{"reference": t} for t in ai_targets],
             "recorded": (nested or {}).get("generated_at") or reads.iso(case["updated_at"]),
             "agent": [{"type": {"coding": [{"system": PROVENANCE_PARTICIPANT,
                                             "code": "author", "display": "Author"}]},
                        "who": {"reference": device_ref}}]}, "provenance")
    return {"resourceType": "Bundle", "type": "collection",
            "timestamp": reads.iso(case["updated_at"]),
            "identifier": {"system": "urn:medmitra:case", "value": cid},
            "entry": entries}


def _radiology_summary(raw_summary: Any) -> str | None:
    try:
        data = json.loads(raw_summary) if isinstance(raw_summary, str) else raw_summary
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    parts = [str(data[k]) for k in ("impressions", "findings", "summary")
             if _available(data.get(k))]
    return " ".join(parts)[:4000] or None


def _model_info(nested: dict[str, Any] | None) -> dict[str, Any]:
    info = (nested or {}).get("model_info") or {}
    name = info.get("name") or (nested or {}).get("model") or "unknown model"
    out = {"name": str(name)}
    if info.get("demonstration"):
        out["note"] = ("Demonstration model: its text is not medically meaningful.")
    return out


def _ai_note(nested: dict[str, Any], dx: dict[str, Any]) -> str:
    conf = dx.get("confidence_score")
    text = "Suggested by an AI model; to be confirmed by a clinician."
    if isinstance(conf, (int, float)):
        text += f" Model confidence {conf:.2f}."
    if (nested.get("model_info") or {}).get("demonstration"):
        text += " Demonstration model: not medically meaningful."
    return text


# -- HTTP -------------------------------------------------------------------------------------

bp = Blueprint("ops_fhir", url_prefix="/cases")


@bp.get("/cases/<case_id:str>/fhir")
async def case_fhir(request: Request, case_id: str) -> HTTPResponse:
    from medmitra.api.auth import current_user
    from medmitra.services import cases as svc

    user_id = await current_user(request)
    view = await svc.case_view(request.app.ctx.reader, user_id, case_id)  # 404 if not theirs
    _, nested = svc.render_insights(view["case"]["case_id"], view["insight"])
    bundle = build_bundle(view, nested)
    return raw(json.dumps(bundle, ensure_ascii=False).encode("utf-8"), content_type=FHIR_JSON)


# -- command line ------------------------------------------------------------------------------


def register(sub: Any, common: Any) -> None:
    p = sub.add_parser("export", help="export a case (FHIR R4 Bundle)")
    common(p)
    p.add_argument("--format", choices=("fhir",), default="fhir")
    p.add_argument("--case", required=True, help="case UUID or number")
    p.add_argument("--out", help="file to write (default: case-<uuid>.fhir.json; - = stdout)")
    p.set_defaults(handler=_cli_export)


def _cli_export(args: Any, settings: Any) -> int:
    import asyncio
    import os
    from pathlib import Path

    from medmitra.db.reads import Reader
    from medmitra.ops.db import ops_db
    from medmitra.errors import ApiError
    from medmitra.services import cases as svc

    async def run() -> dict[str, Any] | None:
        async with ops_db(settings):
            reader = Reader(Path(settings.database_url.removeprefix("sqlite://"))
                            if settings.is_sqlite else None, settings.database.busy_timeout_ms)
            try:
                from medmitra.db.models import Case
                from medmitra.ops.audit import record_cli_event

                case = await Case.get_or_none(**svc.parse_ident(args.case, "case"))
                if case is None:
                    return None
                view = await svc.case_view(reader, case.user_id, args.case)
                _, nested = svc.render_insights(view["case"]["case_id"], view["insight"])
                await record_cli_event(settings, "export", user_id=case.user_id,
                                       case_ref=case.case_id, detail="fhir")
                return build_bundle(view, nested)
            finally:
                reader.close()

    try:
        bundle = asyncio.run(run())
    except ApiError as exc:
        print(f"medmitra: {exc.message}", file=sys.stderr)
        return 2
    if bundle is None:
        print(f"medmitra: no case {args.case}", file=sys.stderr)
        return 1
    text = json.dumps(bundle, ensure_ascii=False, indent=1)
    if args.out == "-":
        print(text)
        return 0
    out = Path(args.out or f"case-{bundle['identifier']['value']}.fhir.json")
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    print(f"wrote {out} ({len(bundle['entry'])} resources)")
    return 0
