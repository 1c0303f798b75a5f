"""Analysis stages 2-9 with the scripted FakeRuntime: shape, retries, clamping, ICD, options."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest

from medmitra.config import LLMSettings
from medmitra.llm.runtime import FakeRuntime, LLMError
from medmitra.pipeline import prompts, schemas
from medmitra.clinical.labs import make_row
from medmitra.pipeline.stages import IMAGING_NOT_REQUESTED, NO_IMAGE_MODEL, run_analysis
from medmitra.pipeline.types import (STAGES, AnalysisOptions, Cancelled, CaseInput,
                                     ExtractedFile, LabRow, StageError)

LLM = LLMSettings()


def lab_csv() -> ExtractedFile:
    return ExtractedFile(
        file_id="lab-1", category="lab", file_name="cbc.csv", mime="text/csv",
        text="test,value,unit,range\nHb,9.1,g/dL,12-16\nWBC,7.0,10^9/L,4-11",
        lab_rows=[make_row("Hb", "9.1", "g/dL", "12-16"),
                  make_row("WBC", "7.0", "10^9/L", "4-11")])


def lab_pdf(text: str = "Ferritin 8 ng/mL (15-150)\nTSH 2.1 mIU/L (0.4-4.0)") -> ExtractedFile:
    return ExtractedFile(file_id="lab-2", category="lab", file_name="report.pdf",
                         mime="application/pdf", text=text, pages=[text])


def xray() -> ExtractedFile:
    return ExtractedFile(file_id="rad-1", category="radiology", file_name="chest.dcm",
                         mime="application/dicom",
                         dicom_tags={"Modality": "CR", "BodyPartExamined": "CHEST"})


def make_case(files=None, notes: str | None = "Cough and fever for three days.",
              **options) -> CaseInput:
    return CaseInput(case_id="c1", patient_name="Asha Verma", patient_age=54,
                     patient_gender="female", doctor_notes=notes,
                     files=[lab_csv(), lab_pdf(), xray()] if files is None else files,
                     options=AnalysisOptions(**options))


def analyse(case: CaseInput, rt: FakeRuntime, llm: LLMSettings = LLM, stop=lambda: False,
            progress=None):
    return run_analysis(case, rt, llm, progress=progress or (lambda s, f: None),
                        should_stop=stop)


@pytest.fixture
def icd(monkeypatch):
    """A stand-in for medmitra.pipeline.icd10 (owned elsewhere), with a tiny code table."""
    table = {"J18.9": "Pneumonia, unspecified organism", "D50.9": "Iron deficiency anemia"}
    mod = types.ModuleType("medmitra.pipeline.icd10")
    mod.normalize_code = lambda c: (c.strip().upper() if c.strip().upper() in table
                                    else "J18.9" if c.upper().startswith("J18") else None)
    mod.describe = lambda c: table.get(c, "")
    mod.search = lambda text, limit: ([("D50.9", table["D50.9"])] if "anemia" in text.lower()
                                      else [])[:limit]
    monkeypatch.setitem(sys.modules, "medmitra.pipeline.icd10", mod)
    return mod


def dx_answer(**kw) -> str:
    base = {"primary_diagnosis": "Community acquired pneumonia", "icd_code": "J18.9",
            "description": "", "supporting_evidence": ["fever"], "confidence_score": 0.6}
    return json.dumps(base | kw)


# --------------------------------------------------------------------------- happy path

def test_happy_path_shape_field_by_field(icd):
    rt = FakeRuntime()
    seen: list[tuple[str, float]] = []
    result = analyse(make_case(), rt, progress=lambda s, f: seen.append((s, f)))
    ins = result.insights

    assert set(ins) == {"case_summary", "soap_note", "primary_diagnosis", "differential_diagnoses",
                        "investigation_recommendations", "treatment_recommendations",
                        "overall_confidence_score", "model"}
    cs = ins["case_summary"]
    assert set(cs) == {"comprehensive_summary", "key_findings", "patient_context",
                       "doctor_notes", "lab_summary", "radiology_summary", "confidence_score"}
    assert cs["comprehensive_summary"] == "comprehensive_summary"
    assert cs["key_findings"] == ["key_findings_0"]
    assert cs["patient_context"] == {"age": 54, "gender": "female"}
    assert cs["doctor_notes"] == "Cough and fever for three days."
    assert cs["lab_summary"] == "cbc.csv: summary\nreport.pdf: summary"
    assert cs["radiology_summary"].startswith("chest.dcm: ")
    assert cs["confidence_score"] == 0.5
    assert ins["soap_note"] == {"subjective": "subjective", "objective": "objective",
                                "assessment": "assessment", "plan": "plan",
                                "confidence_score": 0.5}
    pd = ins["primary_diagnosis"]
    assert set(pd) == {"primary_diagnosis", "icd_code", "description", "confidence_score",
                       "supporting_evidence"}
    assert pd["icd_code"] is None  # the fake's "icd_code" text is no valid code
    assert isinstance(pd["supporting_evidence"], list)
    assert len(ins["differential_diagnoses"]) == 3  # minItems of the schema
    for d in ins["differential_diagnoses"]:
        assert set(d) == {"condition", "probability", "reasoning", "distinguishing_factors"}
        assert 0.0 <= d["probability"] <= 1.0 and isinstance(d["distinguishing_factors"], list)
    (inv,) = ins["investigation_recommendations"]
    assert set(inv) == {"investigation_type", "urgency", "rationale", "expected_findings"}
    assert inv["urgency"] in ("urgent", "routine", "follow-up")
    (tr,) = ins["treatment_recommendations"]
    assert set(tr) == {"treatment_type", "description", "dosage", "duration", "precautions"}
    assert ins["overall_confidence_score"] == pytest.approx(0.5)
    assert ins["model"] == "fake-model"
    assert json.loads(json.dumps(ins)) == ins  # JSON-able as stored

    # Per-file records.
    assert set(result.file_summaries) == {"lab-1", "lab-2", "rad-1"}
    lab = result.file_summaries["lab-1"]
    assert set(lab) == {"lab_values", "summary", "key_abnormalities", "confidence_score"}
    assert lab["lab_values"]["Hb"] == {"value": "9.1", "unit": "g/dL",
                                       "reference_range": "12-16", "status": "abnormal"}
    assert lab["key_abnormalities"][0] == "Hb 9.1 g/dL (low)"
    rad = result.file_summaries["rad-1"]
    assert set(rad) == {"findings", "impressions", "summary", "key_abnormalities",
                        "confidence_score"}

    # Metrics, model facts and progress.
    assert [m.stage for m in result.stages] == list(STAGES[1:])
    assert all(m.duration_s >= 0 for m in result.stages)
    by_stage = {m.stage: m for m in result.stages}
    assert by_stage["lab_analysis"].prompt_tokens > 0
    assert by_stage["lab_analysis"].completion_tokens > 0
    assert by_stage["compile"].attempts == 0 and by_stage["compile"].prompt_tokens == 0
    assert result.model == rt.info
    assert [s for s, _ in seen if s not in ("lab_analysis", "radiology_analysis")] == \
        list(STAGES[3:])
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and 0 < fractions[0] and fractions[-1] < 1


def test_prompts_share_one_prefix_and_leave_out_the_name(icd):
    rt = FakeRuntime()
    analyse(make_case(), rt)
    assert len(rt.calls) == 7  # 2 lab files, summary, SOAP, diagnosis, differential, recs
    systems = {json.dumps(c["messages"][0]) for c in rt.calls}
    assert len(systems) == 1  # byte-identical prefix -> KV cache reuse between stages
    system = rt.calls[0]["messages"][0]["content"]
    assert "Hb: 9.1 g/dL (reference 12-16) [low]" in system
    assert "Ferritin 8 ng/mL" in system and "Modality: CR" in system
    for call in rt.calls:
        text = json.dumps(call["messages"])
        assert "Asha" not in text and "Verma" not in text
        assert call["messages"][-1]["role"] == "user"
        assert "JSON schema:" in call["messages"][-1]["content"]


def test_zero_files_and_no_doctor_notes(icd):
    rt = FakeRuntime()
    result = analyse(make_case(files=[], notes=None), rt)
    cs = result.insights["case_summary"]
    assert cs["doctor_notes"] == ""
    assert cs["lab_summary"] == "No lab results were provided."
    assert cs["radiology_summary"] == "No radiology images were provided."
    assert result.file_summaries == {}
    assert [c["key"] for c in rt.calls] == ["case_summary", "soap_note", "diagnosis",
                                            "differential", "recommendations"]
    assert "(none given)" in rt.calls[0]["messages"][0]["content"]


# --------------------------------------------------------------------------- retries

def test_broken_json_is_retried_with_another_seed(icd):
    rt = FakeRuntime({"diagnosis": ['{"primary_diagnosis": "Pneum', dx_answer()]})
    result = analyse(make_case(), rt)
    dx_calls = [c for c in rt.calls if c["key"] == "diagnosis"]
    assert len(dx_calls) == 2
    assert dx_calls[0]["seed"] != dx_calls[1]["seed"]
    assert result.insights["primary_diagnosis"]["primary_diagnosis"] == \
        "Community acquired pneumonia"
    m = {s.stage: s for s in result.stages}["diagnosis"]
    assert m.attempts == 2 and m.prompt_tokens == sum(c["prompt_tokens"] for c in dx_calls)


@pytest.mark.parametrize("bad, reason", [
    ('{"subjective": "cough", "obj', "not valid JSON"),
    ("", "empty answer"),
    ("[1, 2]", "contains no JSON object"),
    ("Sure! Here is the note.", "contains no JSON object"),
    ('{"subjective": "", "objective": "", "assessment": "", "plan": ""}', "no content"),
])
def test_always_broken_raises_stage_error_naming_the_stage(icd, bad, reason):
    rt = FakeRuntime({"soap_note": [bad] * 3})
    with pytest.raises(StageError) as err:
        analyse(make_case(), rt)
    assert err.value.stage == "soap_note"
    assert reason in err.value.reason and "3 attempt(s)" in err.value.reason
    assert [c["key"] for c in rt.calls].count("soap_note") == 3
    assert "diagnosis" not in [c["key"] for c in rt.calls]


def test_cut_off_answer_is_reported_as_such(icd):
    llm = LLMSettings(max_tokens_summary=16)
    cut = '{"comprehensive_summary": "' + "word " * 40
    rt = FakeRuntime({"case_summary": [cut] * 3})
    with pytest.raises(StageError) as err:
        analyse(make_case(), rt, llm)
    assert err.value.stage == "case_summary"
    assert "cut off at the 16-token limit" in err.value.reason


def test_runtime_errors_are_retried_then_reported(icd):
    rt = FakeRuntime({"case_summary": [LLMError("decode failed")] * 3})
    with pytest.raises(StageError) as err:
        analyse(make_case(), rt)
    assert err.value.stage == "case_summary"
    assert "the model runtime failed: decode failed" in err.value.reason

    rt = FakeRuntime({"case_summary": [LLMError("decode failed")]})
    result = analyse(make_case(), rt)
    assert {s.stage: s for s in result.stages}["case_summary"].attempts == 2


def test_differential_without_any_condition_is_retried(icd):
    empty = json.dumps({"differential_diagnoses": [
        {"condition": "", "probability": 0.2, "reasoning": "r", "distinguishing_factors": []}]})
    rt = FakeRuntime({"differential": [empty] * 3})
    with pytest.raises(StageError) as err:
        analyse(make_case(), rt)
    assert err.value.stage == "differential" and "names no condition" in err.value.reason


# --------------------------------------------------------------------------- validation

def test_scores_are_clamped_and_non_finite_become_zero(icd):
    rt = FakeRuntime({
        "case_summary": ['{"comprehensive_summary": "s", "key_findings": [], '
                         '"confidence_score": 12}'],
        "soap_note": ['{"subjective": "s", "objective": "o", "assessment": "a", "plan": "p", '
                      '"confidence_score": Infinity}'],
        "diagnosis": [dx_answer(confidence_score=-3).replace("-3", "1e999")],
        "differential": [json.dumps({"differential_diagnoses": [
            {"condition": "A", "probability": -0.5, "reasoning": "", "distinguishing_factors": "x"},
            {"condition": "B", "probability": "NaN"},
            {"condition": "C", "probability": 7}]})],
        "lab_analysis": ['{"summary": "s", "key_abnormalities": [], "confidence_score": NaN}'],
    })
    ins = analyse(make_case(), rt).insights
    assert ins["case_summary"]["confidence_score"] == 1.0
    assert ins["soap_note"]["confidence_score"] == 0.0
    assert ins["primary_diagnosis"]["confidence_score"] == 0.0
    assert ins["overall_confidence_score"] == pytest.approx(1 / 3)
    probs = [d["probability"] for d in ins["differential_diagnoses"]]
    assert probs == [0.0, 0.0, 1.0]
    # Missing fields get safe defaults; a lone string where a list belongs becomes a list.
    assert ins["differential_diagnoses"][0]["distinguishing_factors"] == ["x"]
    assert ins["differential_diagnoses"][1]["reasoning"] == ""
    for value in _numbers(ins):
        assert math.isfinite(value) and 0.0 <= value <= 1.0 or isinstance(value, int)


def _numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


def test_coerce_truncates_strings_lists_and_unknown_enums():
    schema = schemas.RECOMMENDATIONS
    raw = {"investigations": [{"investigation_type": "x" * 500, "urgency": "STAT",
                               "rationale": 5, "expected_findings": None}] * 9,
           "treatments": "rest"}
    out = schemas.coerce(raw, schema)
    inv = out["investigations"]
    assert len(inv) == 3  # maxItems
    assert len(inv[0]["investigation_type"]) == 80 and inv[0]["urgency"] == "follow-up"
    assert inv[0]["rationale"] == "5" and inv[0]["expected_findings"] == ""
    assert out["treatments"] == []  # a string is no treatment object
    lone = schemas.coerce({"treatments": {"treatment_type": "rest"}}, schema)["treatments"]
    assert lone == [{"treatment_type": "rest", "description": "", "dosage": "", "duration": "",
                     "precautions": []}]
    assert schemas.coerce({"urgency": "Urgent"}, schemas._INVESTIGATION)["urgency"] == "urgent"


def test_every_schema_is_bounded_and_fits_its_token_budget():
    def walk(s):
        if s.get("type") == "string" and "enum" not in s:
            assert "maxLength" in s
        if s.get("type") == "array":
            assert "maxItems" in s
            walk(s["items"])
        for sub in s.get("properties", {}).values():
            walk(sub)
    budgets = {"lab_analysis": LLM.max_tokens_lab, "radiology_analysis": LLM.max_tokens_radiology,
               "case_summary": LLM.max_tokens_summary, "soap_note": LLM.max_tokens_soap,
               "diagnosis": LLM.max_tokens_diagnosis, "differential": LLM.max_tokens_differential,
               "recommendations": LLM.max_tokens_recommendations}
    for schema in schemas.ALL_SCHEMAS:
        walk(schema)
        budget = budgets[schema["title"]]
        fitted = schemas.fit_schema(schema, budget)
        walk(fitted)
        assert schemas.max_json_chars(fitted) <= budget * schemas.CHARS_PER_TOKEN
    small = schemas.fit_schema(schemas.SOAP_NOTE, 100)
    assert small["properties"]["plan"]["maxLength"] < schemas.SOAP_NOTE["properties"]["plan"][
        "maxLength"]
    assert schemas.SOAP_NOTE["properties"]["plan"]["maxLength"] == 220  # original untouched


def test_invalid_icd_code_is_replaced_or_dropped(icd):
    # Close to a valid code -> the closest valid one, with its description filled in.
    rt = FakeRuntime({"diagnosis": [dx_answer(icd_code="j18.99x")]})
    pd = analyse(make_case(), rt).insights["primary_diagnosis"]
    assert pd["icd_code"] == "J18.9" and pd["description"] == "Pneumonia, unspecified organism"
    # Invalid code, but the diagnosis text finds one in the table.
    rt = FakeRuntime({"diagnosis": [dx_answer(icd_code="ZZZ", primary_diagnosis="Anemia")]})
    pd = analyse(make_case(), rt).insights["primary_diagnosis"]
    assert pd["icd_code"] == "D50.9"
    # Nothing valid -> None, never the model's text.
    rt = FakeRuntime({"diagnosis": [dx_answer(icd_code="XYZ.123", description="mine")]})
    pd = analyse(make_case(), rt).insights["primary_diagnosis"]
    assert pd["icd_code"] is None and pd["description"] == "mine"


def test_icd_table_missing_gives_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "medmitra.pipeline.icd10", None)  # import -> ImportError
    rt = FakeRuntime({"diagnosis": [dx_answer(icd_code="J18.9")]})
    assert analyse(make_case(), rt).insights["primary_diagnosis"]["icd_code"] is None


# --------------------------------------------------------------------------- lab flags

def test_deterministic_lab_flag_wins_over_the_model(icd):
    model_rows = {"lab_values": [
        {"test": "Ferritin", "value": "8", "unit": "ng/mL", "reference_range": "15-150",
         "status": "normal"},                      # wrong: 8 < 15
        {"test": "TSH", "value": "2.1", "unit": "mIU/L", "reference_range": "0.4-4.0",
         "status": "critical"},                    # wrong: in range
        {"test": "Culture", "value": "growth", "unit": "", "reference_range": "no growth",
         "status": "abnormal"},                    # not computable: the model's flag stays
    ], "summary": "Low ferritin", "key_abnormalities": ["Ferritin low"], "confidence_score": 0.7}
    rt = FakeRuntime({"lab_analysis": [
        '{"summary": "Anaemia", "key_abnormalities": ["WBC high"], "confidence_score": 0.8}',
        json.dumps(model_rows)]})
    result = analyse(make_case(), rt)
    csv = result.file_summaries["lab-1"]
    # Parsed rows keep their deterministic flags even though the model called WBC high.
    assert csv["lab_values"]["WBC"]["status"] == "normal"
    assert csv["lab_values"]["Hb"]["status"] == "abnormal"
    assert csv["key_abnormalities"] == ["Hb 9.1 g/dL (low)", "WBC high"]
    assert csv["summary"] == "Anaemia" and csv["confidence_score"] == 0.8
    pdf = result.file_summaries["lab-2"]["lab_values"]
    assert pdf["Ferritin"]["status"] == "abnormal"
    assert pdf["TSH"]["status"] == "normal"
    assert pdf["Culture"]["status"] == "abnormal"
    # The PDF prompt asks for values; the CSV prompt only for an interpretation.
    lab_schemas = [c["schema"] for c in rt.calls if c["key"] == "lab_analysis"]
    assert "lab_values" not in lab_schemas[0]["properties"]
    assert "lab_values" in lab_schemas[1]["properties"]


def test_lab_interpretation_off_makes_no_lab_call(icd):
    rt = FakeRuntime()
    result = analyse(make_case(include_lab_interpretation=False), rt)
    assert "lab_analysis" not in [c["key"] for c in rt.calls]
    assert result.file_summaries["lab-1"]["lab_values"]["Hb"]["status"] == "abnormal"
    assert result.file_summaries["lab-1"]["confidence_score"] == 0.0


# --------------------------------------------------------------------------- radiology

def test_radiology_without_vision_says_the_image_was_not_read(icd):
    rt = FakeRuntime(vision=False)
    result = analyse(make_case(), rt)
    rad = result.file_summaries["rad-1"]
    assert rad["findings"] == NO_IMAGE_MODEL == \
        "No image model is configured; the image was not read."
    assert rad["confidence_score"] == 0.0 and rad["key_abnormalities"] == []
    assert "Modality: CR" in rad["summary"] and "BodyPartExamined: CHEST" in rad["summary"]
    assert "radiology_analysis" not in [c["key"] for c in rt.calls]
    m = {s.stage: s for s in result.stages}["radiology_analysis"]
    assert m.attempts == 0 and m.prompt_tokens == 0


def test_radiology_with_vision_reads_the_image(icd):
    from PIL import Image

    f = xray()
    f.image = Image.new("RGB", (8, 8))
    rt = FakeRuntime({"radiology_analysis": [
        '{"findings": "Right lower lobe opacity", "impressions": "Pneumonia", "summary": "s", '
        '"key_abnormalities": ["opacity"], "confidence_score": 3}']}, vision=True)
    result = analyse(make_case(files=[f]), rt)
    rad = result.file_summaries["rad-1"]
    assert rad["findings"] == "Right lower lobe opacity" and rad["confidence_score"] == 1.0
    (call,) = [c for c in rt.calls if c["key"] == "radiology_analysis"]
    assert call["kind"] == "image" and "Modality: CR" in call["messages"][0]["content"]
    # Imaging switched off: no call, and the record says why.
    rt = FakeRuntime(vision=True)
    result = analyse(make_case(files=[f], include_imaging=False), rt)
    assert result.file_summaries["rad-1"]["findings"] == IMAGING_NOT_REQUESTED
    assert all(c["kind"] == "text" for c in rt.calls)


# --------------------------------------------------------------------------- control

def test_should_stop_cancels_between_stages(icd):
    rt = FakeRuntime()
    with pytest.raises(Cancelled):
        analyse(make_case(), rt, stop=lambda: any(c["key"] == "soap_note" for c in rt.calls))
    assert [c["key"] for c in rt.calls][-1] == "soap_note"  # nothing ran after the stop
    rt = FakeRuntime()
    with pytest.raises(Cancelled):
        analyse(make_case(), rt, stop=lambda: True)
    assert rt.calls == []


def test_options_skip_differential_and_treatments(icd):
    rt = FakeRuntime()
    result = analyse(make_case(include_differential=False, include_treatment=False), rt)
    keys = [c["key"] for c in rt.calls]
    assert "differential" not in keys
    assert result.insights["differential_diagnoses"] == []
    assert result.insights["treatment_recommendations"] == []
    assert len(result.insights["investigation_recommendations"]) == 1
    (rec,) = [c for c in rt.calls if c["key"] == "recommendations"]
    assert "treatments" not in rec["schema"]["properties"]
    assert "treatment" not in rec["messages"][-1]["content"].split("JSON schema:")[0]
    assert {s.stage: s for s in result.stages}["differential"].attempts == 0


# --------------------------------------------------------------------------- trimming

def test_long_document_is_trimmed_by_tokens_to_fit(icd):
    lines = [f"Line {i}: haemoglobin measured value {i} within panel" for i in range(2000)]
    rt = FakeRuntime(n_ctx=2048)
    llm = LLMSettings(n_ctx=2048)
    analyse(make_case(files=[lab_pdf("\n".join(lines)), lab_csv()]), rt, llm)
    for call in rt.calls:
        assert call["prompt_tokens"] + call["max_tokens"] <= 2048
    system = rt.calls[0]["messages"][0]["content"]
    assert prompts.TRIM_MARK in system
    assert "Hb: 9.1 g/dL" in system  # the small file is kept whole
    kept = [ln for ln in system.splitlines() if ln.startswith("Line ")]
    assert 10 < len(kept) < 2000
    assert all(ln in lines for ln in kept)  # whole lines only, never cut mid-word


def test_trim_to_tokens_cuts_at_line_then_word_boundaries():
    count = lambda s: len(s.split())  # noqa: E731 - one token per word
    text = "alpha beta gamma\ndelta epsilon\nzeta eta theta iota"
    assert prompts.trim_to_tokens(text, 100, count) == text
    assert count(text) == 9
    cut = prompts.trim_to_tokens(text, 8, count)
    assert cut == "alpha beta gamma\n" + prompts.TRIM_MARK
    assert count(cut) <= 8
    one_line = " ".join(f"w{i}" for i in range(50))
    cut = prompts.trim_to_tokens(one_line, 12, count)
    assert cut.endswith(prompts.TRIM_MARK) and count(cut) <= 12
    assert all(w in one_line.split() for w in cut.removesuffix(prompts.TRIM_MARK).split())
    assert prompts.trim_to_tokens(text, 0, count) == ""
