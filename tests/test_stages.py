"""Analysis stages 2-9 with the scripted FakeRuntime: shape, retries, clamping, ICD, options."""

from __future__ import annotations

import json
import math

import pytest

from medmitra.config import LLMSettings
from good_answers import GOOD, GoodFake as Fake
from medmitra.llm.runtime import FakeRuntime, LLMError
from medmitra.pipeline import prompts, schemas
from medmitra.clinical import confidence
from medmitra.clinical.labs import make_row
from medmitra.pipeline.stages import (IMAGING_NOT_REQUESTED, MAX_ATTEMPTS, NO_IMAGE_MODEL,
                                      run_analysis)
from medmitra.pipeline.types import (STAGES, AnalysisOptions, Cancelled, CaseInput,
                                     ExtractedFile, StageError)

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
def icd():
    """Codes come from the shipped ICD-10-CM table (clinical/icd10.py, milliseconds)."""
    from medmitra.clinical import icd10
    return icd10


def dx_answer(**kw) -> str:
    base = {"primary_diagnosis": "Community acquired pneumonia", "icd_code": "J18.9",
            "description": "", "supporting_evidence": ["L1"], "confidence_score": 0.6}
    return json.dumps(base | kw)


# --------------------------------------------------------------------------- happy path

def test_happy_path_shape_field_by_field(icd):
    rt = Fake()
    seen: list[tuple[str, float]] = []
    result = analyse(make_case(), rt, progress=lambda s, f: seen.append((s, f)))
    ins = result.insights

    assert set(ins) == {"case_summary", "soap_note", "primary_diagnosis", "differential_diagnoses",
                        "investigation_recommendations", "treatment_recommendations",
                        "overall_confidence_score", "model", "stages", "labs", "lab_counts",
                        "grounding", "model_info"}
    cs = ins["case_summary"]
    assert set(cs) == {"comprehensive_summary", "key_findings", "patient_context",
                       "doctor_notes", "lab_summary", "radiology_summary", "confidence_score"}
    assert cs["comprehensive_summary"] == GOOD["case_summary"]["comprehensive_summary"]
    assert cs["key_findings"] == ["Hb 9.1 g/dL (low)", "Low haemoglobin"]
    assert cs["patient_context"] == {"name": "Asha Verma", "age": 54, "gender": "female"}
    assert cs["doctor_notes"] == "Cough and fever for three days."
    lab_text = GOOD["lab_analysis"]["summary"]
    assert cs["lab_summary"] == f"cbc.csv: {lab_text}\nreport.pdf: {lab_text}"
    assert cs["radiology_summary"].startswith("chest.dcm: ")
    # Computed (clinical/confidence.py): grounding, first-try validity, deterministic share.
    determ = confidence.deterministic_share(2, 0)
    g = ins["grounding"]["sections"]["case_summary"]
    assert cs["confidence_score"] == confidence.section(
        "ok", g["verified"] / (g["verified"] + g["unverified"] + g["dropped"]), determ)
    assert {k: v for k, v in ins["soap_note"].items() if k != "confidence_score"} == \
        {k: v for k, v in GOOD["soap_note"].items() if k != "confidence_score"}
    pd = ins["primary_diagnosis"]
    assert set(pd) == {"primary_diagnosis", "icd_code", "description", "confidence_score",
                       "supporting_evidence", "icd_reason"}
    # "Community acquired pneumonia": J18 and J18.9 agree; the model chose among them.
    assert pd["icd_code"] in ("J18", "J18.9") and pd["description"] == icd.title(pd["icd_code"])
    # Cited by fact id (N1 the notes' sentence, L1 the Hb row); stored as the facts' text.
    assert pd["supporting_evidence"] == ["Cough and fever for three days.",
                                         "Hb: 9.1 g/dL (reference 12-16) [low]"]
    assert len(ins["differential_diagnoses"]) == 3
    for d in ins["differential_diagnoses"]:
        assert set(d) == {"condition", "probability", "reasoning", "distinguishing_factors",
                          "supporting_evidence"}
        assert d["supporting_evidence"] == ["Hb: 9.1 g/dL (reference 12-16) [low]"]
        assert 0.0 <= d["probability"] <= 1.0 and isinstance(d["distinguishing_factors"], list)
    (inv,) = ins["investigation_recommendations"]
    assert set(inv) == {"investigation_type", "urgency", "rationale", "expected_findings"}
    assert inv["urgency"] in ("urgent", "routine", "follow-up")
    (tr,) = ins["treatment_recommendations"]
    assert set(tr) == {"treatment_type", "description", "dosage", "duration", "precautions"}
    scores = [ins[k]["confidence_score"] for k in ("case_summary", "soap_note",
                                                   "primary_diagnosis")]
    assert all(0 <= x <= 1 for x in scores)
    assert ins["overall_confidence_score"] == pytest.approx(sum(scores) / 3, abs=1e-3)
    assert ins["model_info"] == {"name": "fake-model", "file": "fake-model.gguf",
                                 "demonstration": False}
    assert "below_threshold" not in ins["soap_note"]
    assert ins["model"] == "fake-model"
    assert json.loads(json.dumps(ins)) == ins  # JSON-able as stored

    # Per-file records.
    assert set(result.file_summaries) == {"lab-1", "lab-2", "rad-1"}
    lab = result.file_summaries["lab-1"]
    assert set(lab) == {"lab_values", "summary", "key_abnormalities", "confidence_score", "labs",
                        "lab_counts"}
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
    rt = Fake()
    analyse(make_case(), rt)
    # 2 lab files, summary, SOAP, diagnosis, its code choice, differential, recs
    assert len(rt.calls) == 8
    # RULES + the case facts are a byte-identical prefix of every stage's system message
    # (KV cache reuse between stages); each stage's own role and rules come after it.
    system = rt.calls[0]["messages"][0]["content"]
    shared = system[:system.index(prompts.STAGE_SYSTEM["lab_analysis"])]
    assert shared.startswith(prompts.RULES) and "CASE FACTS" in shared
    for c in rt.calls:
        content = c["messages"][0]["content"]
        assert content.startswith(shared) and content.endswith(prompts.STAGE_SYSTEM[c["key"]])
    assert len({c["messages"][0]["content"] for c in rt.calls}) == 7  # 2 lab calls share
    # One short example per stage, in the stage's user message.
    dx_user = next(c for c in rt.calls if c["key"] == "diagnosis")["messages"][-1]["content"]
    assert "Hyperkalaemia" in dx_user and "Hyperkalaemia" not in system
    assert "Hb: 9.1 g/dL (reference 12-16) [low]" in system
    assert "Ferritin 8 ng/mL" in system and "Modality: CR" in system
    for call in rt.calls:
        text = json.dumps(call["messages"])
        assert "Asha" not in text and "Verma" not in text
        assert call["messages"][-1]["role"] == "user"
        assert "JSON schema:" in call["messages"][-1]["content"]


def test_zero_files_and_no_doctor_notes(icd):
    rt = Fake()
    result = analyse(make_case(files=[], notes=None), rt)
    cs = result.insights["case_summary"]
    assert cs["doctor_notes"] == ""
    assert cs["lab_summary"] == "No lab results were provided."
    assert cs["radiology_summary"] == "No radiology images were provided."
    assert result.file_summaries == {}
    # No fact a diagnosis could rest on: the diagnosis stage abstains without asking.
    assert [c["key"] for c in rt.calls] == ["case_summary", "soap_note", "differential",
                                            "recommendations"]
    st = result.insights["stages"]["diagnosis"]
    assert st["status"] == "abstained" and "no fact" in st["reason"]
    assert result.insights["primary_diagnosis"]["primary_diagnosis"] == "Not available."
    assert "(none given)" in rt.calls[0]["messages"][0]["content"]


# --------------------------------------------------------------------------- retries

def test_broken_json_is_retried_with_another_seed(icd):
    rt = Fake({"diagnosis": ['{"primary_diagnosis": "Pneum', dx_answer()]})
    result = analyse(make_case(), rt)
    dx_calls = [c for c in rt.calls if c["key"] == "diagnosis"]
    assert len(dx_calls) == 2
    assert dx_calls[0]["seed"] != dx_calls[1]["seed"]
    assert result.insights["primary_diagnosis"]["primary_diagnosis"] == \
        "Community acquired pneumonia"
    m = {s.stage: s for s in result.stages}["diagnosis"]
    assert m.attempts == 2 and m.prompt_tokens == sum(
        c["prompt_tokens"] for c in rt.calls if c["key"] in ("diagnosis", "diagnosis_code"))


def stage_of(result, name):
    return {m.stage: m for m in result.stages}[name]


@pytest.mark.parametrize("bad, reason", [
    ('{"subjective": "cough", "obj', "not valid JSON"),
    ("", "empty answer"),
    ("[1, 2]", "contains no JSON object"),
    ("Sure! Here is the note.", "contains no JSON object"),
    ('{"subjective": "", "objective": "", "assessment": "", "plan": ""}', "no content"),
])
def test_always_broken_answer_abstains_the_stage_and_the_case_goes_on(icd, bad, reason):
    rt = Fake({"soap_note": [bad] * 3})
    result = analyse(make_case(), rt)
    m = stage_of(result, "soap_note")
    assert m.status == "abstained"
    assert reason in m.reason and f"{MAX_ATTEMPTS} attempt(s)" in m.reason
    assert [c["key"] for c in rt.calls].count("soap_note") == MAX_ATTEMPTS
    soap = result.insights["soap_note"]
    assert {soap[k] for k in ("subjective", "objective", "assessment", "plan")} == \
        {"Not available."}
    assert soap["confidence_score"] is None
    assert result.insights["stages"]["soap_note"] == {"status": "abstained", "reason": m.reason}
    # Later stages still ran, and the facts are all there.
    assert "diagnosis" in [c["key"] for c in rt.calls]
    assert result.insights["stages"]["diagnosis"]["status"] == "ok"
    assert result.file_summaries["lab-1"]["lab_values"]["Hb"]["status"] == "abnormal"


def test_every_stage_abstains_and_the_case_still_completes(icd):
    junk = ["not json"] * 3
    rt = Fake({k: list(junk) for k in ("lab_analysis", "case_summary", "soap_note",
                                              "diagnosis", "differential", "recommendations")})
    rt.script["lab_analysis"] = junk * 2  # two lab files
    result = analyse(make_case(), rt)
    ins = result.insights
    assert {k: v["status"] for k, v in ins["stages"].items()} == {
        "lab_analysis": "abstained", "radiology_analysis": "ok", "case_summary": "abstained",
        "soap_note": "abstained", "diagnosis": "abstained", "differential": "abstained",
        "recommendations": "abstained"}
    assert "Lab file 1" in ins["stages"]["lab_analysis"]["reason"]
    assert "Lab file 2" in ins["stages"]["lab_analysis"]["reason"]
    assert ins["case_summary"]["comprehensive_summary"] == "Not available."
    assert ins["case_summary"]["confidence_score"] is None
    assert ins["primary_diagnosis"] == {"primary_diagnosis": "Not available.", "icd_code": None,
                                        "description": "", "confidence_score": None,
                                        "supporting_evidence": [],
                                        "icd_reason": "the diagnosis stage abstained"}
    assert ins["differential_diagnoses"] == []
    assert ins["investigation_recommendations"] == [] == ins["treatment_recommendations"]
    assert ins["overall_confidence_score"] is None
    lab = result.file_summaries["lab-1"]
    assert lab["summary"] == "Not available." and lab["confidence_score"] is None
    assert lab["key_abnormalities"] == ["Hb 9.1 g/dL (low)"]   # the facts stay


def test_cut_off_answer_is_reported_as_such(icd):
    llm = LLMSettings(max_tokens_summary=16)
    cut = '{"comprehensive_summary": "' + "word " * 40
    rt = Fake({"case_summary": [cut] * 3})
    m = stage_of(analyse(make_case(), rt, llm), "case_summary")
    assert m.status == "abstained"
    assert "cut off at the 16-token limit" in m.reason


def test_runtime_errors_on_every_try_fail_the_job_as_infrastructure(icd):
    rt = Fake({"case_summary": [LLMError("decode failed")] * 3})
    with pytest.raises(StageError) as err:
        analyse(make_case(), rt)
    assert err.value.stage == "case_summary"
    assert "the model runtime failed: decode failed" in err.value.reason

    rt = Fake({"case_summary": [LLMError("decode failed")]})
    result = analyse(make_case(), rt)
    m = stage_of(result, "case_summary")
    assert m.attempts == 2 and m.status == "retried"


def test_retries_vary_seed_and_temperature_across_job_attempts(icd):
    seen = []

    def answer(messages, schema):
        return "not json"

    rt = Fake({"case_summary": [answer] * 6})
    orig = rt.complete_json

    def spy(messages, schema, **kw):
        if schema.get("title") == "case_summary":
            seen.append((kw["seed"], kw["temperature"]))
        return orig(messages, schema, **kw)

    rt.complete_json = spy
    llm = LLMSettings(temperature=0.2)
    analyse(make_case(), rt, llm)
    case2 = make_case()
    case2.attempt = 2
    analyse(case2, rt, llm)
    assert len(seen) == 2 * MAX_ATTEMPTS == len(set(seen))   # no try is replayed
    temps = [t for _, t in seen]
    assert temps[0] == 0.2 and temps == sorted(temps) and max(temps) <= 1.0


def test_raw_control_characters_in_strings_are_repaired_not_retried(icd):
    # "Invalid control character at character 32" failed whole cases (issue 9).
    raw = ('{"comprehensive_summary": "Cough and fever for three days,\nhaemoglobin\tlow\x07", '
           '"key_findings": [], "confidence_score": 0.5}')
    rt = Fake({"case_summary": [raw]})
    result = analyse(make_case(), rt)
    assert stage_of(result, "case_summary").attempts == 1
    assert result.insights["case_summary"]["comprehensive_summary"] == \
        "Cough and fever for three days, haemoglobin low"


def test_differential_without_any_condition_abstains(icd):
    empty = json.dumps({"differential_diagnoses": [
        {"condition": "", "probability": 0.2, "reasoning": "r", "distinguishing_factors": []}]})
    rt = Fake({"differential": [empty] * 3})
    result = analyse(make_case(), rt)
    m = stage_of(result, "differential")
    assert m.status == "abstained" and "names no condition" in m.reason
    assert result.insights["differential_diagnoses"] == []


# --------------------------------------------------------------------------- validation

def test_scores_are_clamped_and_non_finite_become_zero(icd):
    rt = Fake({
        "case_summary": [json.dumps(GOOD["case_summary"] | {"confidence_score": 12})],
        "soap_note": [json.dumps(GOOD["soap_note"]).replace('"confidence_score": 0.5',
                                                            '"confidence_score": Infinity')],
        "diagnosis": [dx_answer(confidence_score=-3, supporting_evidence=[
            "Haemoglobin 9.1 g/dL"]).replace("-3", "1e999")],
        "differential": [json.dumps({"differential_diagnoses": [
            {"condition": "Asthma", "probability": -0.5, "reasoning": "",
             "distinguishing_factors": "Wheeze", "supporting_evidence": ["L1"]},
            {"condition": "Bronchitis", "probability": "NaN", "supporting_evidence": "L1"},
            {"condition": "COPD", "probability": 7, "supporting_evidence": ["L1"]}]})],
        "lab_analysis": ['{"summary": "Haemoglobin is below its range.", "key_abnormalities": [], '
                         '"confidence_score": NaN}'],
    })
    ins = analyse(make_case(), rt).insights
    # The model's own numbers (12, Infinity, 1e999) are ignored: confidence is computed.
    for key in ("case_summary", "soap_note", "primary_diagnosis"):
        assert 0.0 < ins[key]["confidence_score"] <= 1.0
    probs = [d["probability"] for d in ins["differential_diagnoses"]]
    assert probs == [0.0, 0.0, 1.0]
    # Missing fields get safe defaults; a lone string where a list belongs becomes a list.
    assert ins["differential_diagnoses"][0]["distinguishing_factors"] == ["Wheeze"]
    assert ins["differential_diagnoses"][1]["reasoning"] == ""
    for value in _numbers({k: v for k, v in ins.items() if k not in ("labs", "lab_counts")}):
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
    # "x" * 500 reached its maxLength: cut off with nothing finished, so each item (its
    # required type) is dropped rather than stored cut.
    assert inv == []
    raw["investigations"] = [{"investigation_type": "Chest X-ray", "urgency": "STAT",
                              "rationale": 5, "expected_findings": None}] * 9
    inv = schemas.coerce(raw, schema)["investigations"]
    assert len(inv) == 3  # maxItems
    assert inv[0]["investigation_type"] == "Chest X-ray" and inv[0]["urgency"] == "follow-up"
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


def test_icd_code_comes_from_the_table_never_from_the_model(icd):
    # Several candidates: the model chooses among them under an enum grammar.
    rt = Fake({"diagnosis": [dx_answer(primary_diagnosis="Iron deficiency anemia",
                                       icd_code="C96.1", description="mine")],
               "diagnosis_code": ['{"code": "D50.9"}']})
    pd = analyse(make_case(), rt).insights["primary_diagnosis"]
    assert pd["icd_code"] == "D50.9" and pd["icd_reason"] is None
    assert pd["description"] == icd.title("D50.9") == "Iron deficiency anemia, unspecified"
    (call,) = [c for c in rt.calls if c["key"] == "diagnosis_code"]
    enum = call["schema"]["properties"]["code"]["enum"]
    assert "D50.9" in enum and enum[-1] == "none" and "C96.1" not in enum
    assert all(icd.is_valid(c) for c in enum[:-1])
    # The model finds none fitting: no code, with the reason.
    rt = Fake({"diagnosis": [dx_answer(primary_diagnosis="Iron deficiency anemia")],
               "diagnosis_code": ['{"code": "none"}']})
    pd = analyse(make_case(), rt).insights["primary_diagnosis"]
    assert pd["icd_code"] is None and "no candidate code" in pd["icd_reason"]
    # Nothing in the table agrees: no code, and no model call for one.
    rt = Fake({"diagnosis": [dx_answer(primary_diagnosis="Zorblax syndrome")]})
    pd = analyse(make_case(), rt).insights["primary_diagnosis"]
    assert pd["icd_code"] is None and "no ICD-10-CM code agrees" in pd["icd_reason"]
    assert "diagnosis_code" not in [c["key"] for c in rt.calls]


def test_icd_table_failure_gives_none_with_a_reason(monkeypatch):
    from medmitra.clinical import coding

    def broken(_text, limit=5):
        raise OSError("table missing")

    monkeypatch.setattr(coding, "candidates", broken)
    pd = analyse(make_case(), Fake()).insights["primary_diagnosis"]
    assert pd["icd_code"] is None and "could not be searched" in pd["icd_reason"]


# --------------------------------------------------------------------------- lab flags

def test_deterministic_lab_flag_wins_and_the_model_never_sets_a_value(icd):
    rt = Fake({"lab_analysis": [
        '{"summary": "Anaemia with a low haemoglobin.", "key_abnormalities": ["WBC high"], '
        '"confidence_score": 0.8}',
        '{"summary": "Low ferritin, thyroid normal.", "key_abnormalities": ["Ferritin low"], '
        '"confidence_score": 0.7, "lab_values": [{"test": "Ferritin", "value": "80"}]}']})
    result = analyse(make_case(), rt)
    csv = result.file_summaries["lab-1"]
    # Parsed rows keep their deterministic flags even though the model called WBC high.
    assert csv["lab_values"]["WBC"]["status"] == "normal"
    assert csv["lab_values"]["Hb"]["status"] == "abnormal"
    # "WBC high" contradicts the WBC row (normal): grounding dropped it.
    assert csv["key_abnormalities"] == ["Hb 9.1 g/dL (low)"]
    assert csv["summary"] == "Anaemia with a low haemoglobin."
    # Computed from grounding, never the model's 0.8: the summary is verified against the
    # Hb row (haemoglobin is a synonym of Hb; anaemia means low haemoglobin), "WBC high"
    # was dropped, the other file's text checks nothing.
    g = result.insights["grounding"]["sections"]["lab_analysis"]
    assert g["dropped"] >= 1 and g["verified"] == 1
    share = g["verified"] / (g["verified"] + g["unverified"] + g["dropped"])
    assert csv["confidence_score"] == confidence.section("ok", share, 1.0) < 0.8
    assert csv["labs"][0] == {"analyte": "Hb", "value": "9.1", "numeric": 9.1, "unit": "g/dL",
                              "range": "12-16", "flag": "low", "lab_flag": None,
                              "critical": False, "file_id": "lab-1", "page": None}
    assert csv["lab_counts"] == {"rows_parsed": 2, "lines_not_parsed": 0}
    # A file without parsed rows is summarised; values the model writes are not stored.
    pdf = result.file_summaries["lab-2"]
    assert pdf["lab_values"] == {} and pdf["labs"] == []
    assert pdf["summary"] == "Low ferritin, thyroid normal."
    for c in rt.calls:
        if c["key"] == "lab_analysis":
            assert "lab_values" not in c["schema"]["properties"]


def test_every_abnormal_row_is_a_key_finding_whatever_the_model_writes(icd):
    rows = [make_row(f"Analyte {i}", "20", "U/L", "1-10") for i in range(8)]
    f = ExtractedFile(file_id="lab-9", category="lab", file_name="panel.csv", mime="text/csv",
                      text="x", lab_rows=rows + [make_row("Normal one", "5", "U/L", "1-10")])
    rt = Fake({"case_summary": [json.dumps(GOOD["case_summary"] | {
        "key_findings": ["Analyte 0 is fine", "Fever", "Analyte 3 is low"]})]})
    ins = analyse(make_case(files=[f]), rt).insights
    kf = ins["case_summary"]["key_findings"]
    assert kf[:8] == [f"Analyte {i} 20 U/L (high)" for i in range(8)]
    # The model may add; what contradicts the rows ("Analyte 3 is low": it is high) or
    # cites a number in no source ("0") is dropped.
    assert kf[8:] == ["Fever"]
    assert ins["grounding"]["sections"]["case_summary"]["dropped"] == 2
    assert [r["flag"] for r in ins["labs"]] == ["high"] * 8 + ["normal"]
    assert ins["lab_counts"] == {"rows_parsed": 9, "lines_not_parsed": 0}
    # Abstained summary: the facts are still the key findings.
    rt = Fake({"case_summary": ["{"] * 3})
    kf = analyse(make_case(files=[f]), rt).insights["case_summary"]["key_findings"]
    assert kf == [f"Analyte {i} 20 U/L (high)" for i in range(8)]


def test_lab_interpretation_off_makes_no_lab_call(icd):
    rt = Fake()
    result = analyse(make_case(include_lab_interpretation=False), rt)
    assert "lab_analysis" not in [c["key"] for c in rt.calls]
    assert result.file_summaries["lab-1"]["lab_values"]["Hb"]["status"] == "abnormal"
    assert result.file_summaries["lab-1"]["confidence_score"] is None


# --------------------------------------------------------------------------- radiology

def test_radiology_without_vision_says_the_image_was_not_read(icd):
    rt = Fake(vision=False)
    result = analyse(make_case(), rt)
    rad = result.file_summaries["rad-1"]
    assert rad["findings"] == NO_IMAGE_MODEL == \
        "No image model is configured; the image was not read."
    assert rad["confidence_score"] is None and rad["key_abnormalities"] == []
    rs = result.insights["case_summary"]["radiology_summary"]
    assert rs.startswith("chest.dcm: No image model is configured; the image was not read.")
    assert "Modality: CR" in rad["summary"] and "BodyPartExamined: CHEST" in rad["summary"]
    assert "radiology_analysis" not in [c["key"] for c in rt.calls]
    m = {s.stage: s for s in result.stages}["radiology_analysis"]
    assert m.attempts == 0 and m.prompt_tokens == 0


def test_radiology_with_vision_reads_the_image(icd):
    from PIL import Image

    f = xray()
    f.image = Image.new("RGB", (8, 8))
    rt = Fake({"radiology_analysis": [
        '{"findings": "Right lower lobe opacity", "impressions": "Pneumonia", "summary": "s", '
        '"key_abnormalities": ["opacity"], "confidence_score": 3}']}, vision=True)
    result = analyse(make_case(files=[f]), rt)
    rad = result.file_summaries["rad-1"]
    assert rad["findings"] == "Right lower lobe opacity" and rad["confidence_score"] == 1.0
    (call,) = [c for c in rt.calls if c["key"] == "radiology_analysis"]
    assert call["kind"] == "image" and "Modality: CR" in call["messages"][0]["content"]
    # Imaging switched off: no call, and the record says why.
    rt = Fake(vision=True)
    result = analyse(make_case(files=[f], include_imaging=False), rt)
    assert result.file_summaries["rad-1"]["findings"] == IMAGING_NOT_REQUESTED
    assert all(c["kind"] == "text" for c in rt.calls)


# --------------------------------------------------------------------------- control

def test_should_stop_cancels_between_stages(icd):
    rt = Fake()
    with pytest.raises(Cancelled):
        analyse(make_case(), rt, stop=lambda: any(c["key"] == "soap_note" for c in rt.calls))
    assert [c["key"] for c in rt.calls][-1] == "soap_note"  # nothing ran after the stop
    rt = Fake()
    with pytest.raises(Cancelled):
        analyse(make_case(), rt, stop=lambda: True)
    assert rt.calls == []


def test_options_skip_differential_and_treatments(icd):
    rt = Fake()
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
    rt = Fake(n_ctx=2048)
    llm = LLMSettings(n_ctx=2048)
    analyse(make_case(files=[lab_pdf("\n".join(lines)), lab_csv()]), rt, llm)
    for call in rt.calls:
        assert call["prompt_tokens"] + call["max_tokens"] <= 2048
    system = rt.calls[0]["messages"][0]["content"]
    assert prompts.TRIM_MARK in system
    assert "Hb: 9.1 g/dL" in system  # the small file is kept whole
    kept = [ln for ln in system.splitlines() if "] Line " in ln]
    assert 10 < len(kept) < 2000
    # whole lines only (each with its fact id), never cut mid-word
    assert all(ln.split("] ", 1)[1] in lines for ln in kept)


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


# --------------------------------------------------------------------------- confidence

def test_confidence_threshold_flags_sections_and_the_demonstration_model_is_named(icd):
    rt = Fake({"soap_note": ["{"] * 3})          # SOAP abstains: no score
    rt.info["file"] = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    ins = analyse(make_case(confidence_threshold=0.99), rt).insights
    assert ins["soap_note"]["confidence_score"] is None
    assert ins["soap_note"]["below_threshold"] is True
    assert ins["case_summary"]["below_threshold"] == (ins["case_summary"]["confidence_score"]
                                                      < 0.99)
    scores = [ins[k]["confidence_score"] for k in ("case_summary", "primary_diagnosis")]
    assert ins["overall_confidence_score"] == pytest.approx(sum(scores) / 2, abs=1e-3)
    info = ins["model_info"]
    assert info["demonstration"] is True and info["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "not medically meaningful" in info["notice"]


def test_ungrounded_claims_are_dropped_and_counted(icd):
    rt = Fake({"soap_note": [json.dumps(GOOD["soap_note"] | {
        "objective": "Haemoglobin 9.1 g/dL is low. CT scan confirmed a mass of 4.5 cm.",
        "plan": "Start ferrous sulfate 325 mg daily."})]})
    ins = analyse(make_case(files=[lab_csv()]), rt).insights
    soap = ins["soap_note"]
    # The CT scan never happened (no radiology file, no source mentions imaging) and
    # 4.5 / 325 are in no source: those sentences go; the grounded one stays.
    assert soap["objective"] == "Haemoglobin 9.1 g/dL is low."
    assert soap["plan"] == "Not available."
    g = ins["grounding"]["sections"]["soap_note"]
    assert g["dropped"] == 2 and g["kept"] >= 1
    assert ins["grounding"]["claims_checked"] >= g["claims_checked"]


def test_radiology_report_pdf_is_radiology_text_not_lab_values(icd, tmp_path):
    import docfactory as df
    from medmitra.pipeline.extract import extract_file

    pdf = tmp_path / "mri.pdf"
    pdf.write_bytes(df.text_pdf(["MRI LUMBAR SPINE", "Patient: Kiran Rao   Age/Sex: 51/M",
                                 "TECHNIQUE: Sagittal T1 and T2.",
                                 "FINDINGS: L4-L5 disc bulge 3 mm indenting the thecal sac.",
                                 "IMPRESSION: Mild L4-L5 disc bulge."]))
    f = extract_file(pdf, file_id="r1", category="radiology", mime="application/pdf",
                     file_name="mri.pdf")
    assert f.lab_rows == []
    assert f.report_sections == {"findings": "L4-L5 disc bulge 3 mm indenting the thecal sac.",
                                 "impression": "Mild L4-L5 disc bulge."}
    rt = Fake()
    result = analyse(make_case(files=[f]), rt)
    rec = result.file_summaries["r1"]
    assert rec["findings"] == "L4-L5 disc bulge 3 mm indenting the thecal sac."
    assert rec["impressions"] == "Mild L4-L5 disc bulge." and rec["confidence_score"] is None
    assert "radiology_analysis" not in [c["key"] for c in rt.calls]
    system = rt.calls[0]["messages"][0]["content"]
    assert "Report impression: Mild L4-L5 disc bulge." in system
    assert "Kiran" not in system and "Rao" not in json.dumps(rt.calls)
    assert result.insights["labs"] == []
    assert "Mild L4-L5 disc bulge." in result.insights["case_summary"]["radiology_summary"]


# --------------------------------------------------------------------------- evidence by fact id

def _dx_call(rt):
    return next(c for c in rt.calls if c["key"] == "diagnosis")


def test_evidence_is_chosen_from_fact_ids_and_stored_as_the_facts_text(icd):
    rt = Fake({"diagnosis": [dx_answer(supporting_evidence=["L1", "X9", "L1", "R1"])]})
    ins = analyse(make_case(), rt).insights
    # The grammar admits only the ids shown in the facts (an enum); an id it does not
    # know (X9, only possible without a grammar) is dropped, never mapped to another.
    enum = _dx_call(rt)["schema"]["properties"]["supporting_evidence"]["items"]["enum"]
    system = _dx_call(rt)["messages"][0]["content"]
    assert enum == ["N1", "L1", "L2", "T1", "T2", "R1", "R2"]
    assert all(f"[{i}]" in system for i in enum)
    assert "[N1] Cough and fever for three days." in system
    assert ins["primary_diagnosis"]["supporting_evidence"] == [
        "Hb: 9.1 g/dL (reference 12-16) [low]", "BodyPartExamined: CHEST"]
    (judged,) = ins["grounding"]["diagnoses"][:1]
    assert judged == {"section": "primary_diagnosis", "condition": "Community acquired pneumonia",
                      "supported": True, "reason": None}


def test_primary_diagnosis_no_fact_supports_is_retried_then_abstained(icd):
    # Cites only a normal row (WBC, L2) and a DICOM tag, and the case's text does not
    # name it: not a finding. Both tries fail the same way -> the stage abstains.
    bad = dx_answer(primary_diagnosis="Iron deficiency anemia",
                    supporting_evidence=["L2", "R1"])
    rt = Fake({"diagnosis": [bad, bad]})
    ins = analyse(make_case(), rt).insights
    pd = ins["primary_diagnosis"]
    assert pd["primary_diagnosis"] == "Not available." and pd["icd_code"] is None
    assert pd["supporting_evidence"] == [] and pd["confidence_score"] is None
    assert "diagnosis_code" not in [c["key"] for c in rt.calls]  # nothing coded
    st = ins["stages"]["diagnosis"]
    assert st["status"] == "abstained" and "supported by no fact" in st["reason"]
    assert ins["grounding"]["diagnoses"][0] == {
        "section": "primary_diagnosis", "condition": "Iron deficiency anemia",
        "supported": False, "reason": pd_reason(ins)}
    assert ins["grounding"]["sections"]["primary_diagnosis"]["dropped"] >= 1
    # The retry citing an abnormal row is kept.
    rt = Fake({"diagnosis": [bad, dx_answer(primary_diagnosis="Iron deficiency anemia",
                                            supporting_evidence=["L1"])]})
    pd = analyse(make_case(), rt).insights["primary_diagnosis"]
    assert pd["primary_diagnosis"] == "Iron deficiency anemia"
    assert pd["supporting_evidence"] == ["Hb: 9.1 g/dL (reference 12-16) [low]"]


def pd_reason(ins):
    return next(d["reason"] for d in ins["grounding"]["diagnoses"]
                if d["section"] == "primary_diagnosis")


def test_a_diagnosis_the_notes_name_needs_no_citation(icd):
    rt = Fake({"diagnosis": [dx_answer(primary_diagnosis="Pneumonia", supporting_evidence=[])]})
    ins = analyse(make_case(files=[lab_csv()], notes="Suspected pneumonia. Cough for 3 days."),
                  rt).insights
    pd = ins["primary_diagnosis"]
    assert pd["primary_diagnosis"] == "Pneumonia" and pd["supporting_evidence"] == []
    assert pd["icd_code"] and pd["icd_code"].startswith("J18")


def test_differentials_no_fact_supports_are_left_out_and_counted(icd):
    # N1 ("Cough and fever for three days.") names fever: it supports "Viral fever", not
    # "Sarcoidosis"; L2 is a normal row (WBC): evidence for nothing.
    items = [{"condition": "Viral fever", "probability": 0.3, "reasoning": "Cough.",
              "distinguishing_factors": [], "supporting_evidence": ["N1"]},
             {"condition": "Iron deficiency anemia", "probability": 0.2, "reasoning": "Low Hb.",
              "distinguishing_factors": [], "supporting_evidence": ["L1"]},
             {"condition": "Sarcoidosis", "probability": 0.1, "reasoning": "Rare.",
              "distinguishing_factors": [], "supporting_evidence": ["L2", "N1"]}]
    rt = Fake({"differential": [json.dumps({"differential_diagnoses": items})]})
    ins = analyse(make_case(), rt).insights
    assert [d["condition"] for d in ins["differential_diagnoses"]] == \
        ["Viral fever", "Iron deficiency anemia"]
    assert ins["differential_diagnoses"][1]["supporting_evidence"] == \
        ["Hb: 9.1 g/dL (reference 12-16) [low]"]
    judged = [d for d in ins["grounding"]["diagnoses"] if d["section"] == "differential"]
    assert [d["supported"] for d in judged] == [True, True, False]
    assert ins["grounding"]["sections"]["differential"]["dropped"] >= 1
    # None supported: the differential is empty and the stage says why.
    none = [d | {"supporting_evidence": ["L2"]} for d in items[1:]] + [
        items[0] | {"condition": "Sarcoidosis of lung", "supporting_evidence": ["N1"]}]
    rt = Fake({"differential": [json.dumps({"differential_diagnoses": none})]})
    ins = analyse(make_case(), rt).insights
    assert ins["differential_diagnoses"] == []
    assert "no differential diagnosis was supported" in ins["stages"]["differential"]["reason"]


def test_many_fact_ids_are_described_in_the_prompt_not_listed(icd):
    rows = [make_row(f"T{i}", str(i), "mmol/L", "0-100") for i in range(30)]
    f = ExtractedFile(file_id="lab-9", category="lab", file_name="big.csv", mime="text/csv",
                      text="", lab_rows=rows)
    rt = Fake()
    analyse(make_case(files=[f]), rt)
    call = _dx_call(rt)
    assert len(call["schema"]["properties"]["supporting_evidence"]["items"]["enum"]) == 31
    user = call["messages"][-1]["content"]
    assert '"L30"' not in user and "a fact id in brackets" in user


def test_coerce_keeps_only_known_enum_items_once():
    schema = schemas.cite(schemas.DIAGNOSIS, ["L1", "N1"])
    out = schemas.coerce({"supporting_evidence": ["n1", "L7", "L1", "N1", 3, True]}, schema)
    assert out["supporting_evidence"] == ["N1", "L1"]
    assert "supporting_evidence" not in schemas.cite(schemas.DIAGNOSIS, [])["properties"]


@pytest.mark.slow
def test_real_model_cites_only_fact_ids_and_unsupported_diagnoses_are_not_stored():
    """The tiny GGUF through llama.cpp's grammar: the diagnosis answer's evidence holds
    fact ids only, what is stored is their text, and every stored diagnosis passed the
    grounding rule (recorded in insights.grounding)."""
    from conftest import MODEL_PATH
    if not MODEL_PATH.is_file():
        pytest.skip("the default model is not installed")
    from medmitra.llm.llama import LlamaRuntime

    rt = LlamaRuntime(MODEL_PATH, n_ctx=2048, threads=1, seed=42)
    answers: list[tuple[dict, str]] = []
    real = rt.complete_json

    def spy(messages, schema, **kw):
        text, usage = real(messages, schema, **kw)
        answers.append((schema, text))
        return text, usage

    rt.complete_json = spy
    llm = LLMSettings(max_tokens_lab=64, max_tokens_summary=80, max_tokens_soap=96,
                      max_tokens_diagnosis=96, max_tokens_differential=160,
                      max_tokens_recommendations=64, n_ctx=2048)
    try:
        case = make_case(files=[lab_csv()], notes="Tired for a month. Pale on examination.")
        result = analyse(case, rt, llm)
    finally:
        rt.close()
    ins = result.insights
    dx = [(s, t) for s, t in answers if s.get("title") == "diagnosis"]
    assert dx, "the diagnosis stage asked the model"
    ids = dx[0][0]["properties"]["supporting_evidence"]["items"]["enum"]
    assert ids == ["N1", "N2", "L1", "L2"]
    for _schema, text in dx:
        got = json.loads(text)["supporting_evidence"]   # the grammar's own output
        assert set(got) <= set(ids), got
    facts = {"Tired for a month.", "Pale on examination.",
             "Hb: 9.1 g/dL (reference 12-16) [low]", "WBC: 7.0 10^9/L (reference 4-11) [normal]"}
    print("stored:", json.dumps({k: ins[k] for k in ("primary_diagnosis",
                                                     "differential_diagnoses", "grounding")}))
    pd = ins["primary_diagnosis"]
    judged = {(d["section"], d["condition"]): d for d in ins["grounding"]["diagnoses"]}
    if pd["primary_diagnosis"] == "Not available.":
        assert pd["icd_code"] is None and pd["supporting_evidence"] == []
    else:
        assert judged[("primary_diagnosis", pd["primary_diagnosis"])]["supported"] is True
        assert set(pd["supporting_evidence"]) <= facts
    for d in ins["differential_diagnoses"]:
        assert judged[("differential", d["condition"])]["supported"] is True
        assert set(d["supporting_evidence"]) <= facts
    assert ins["grounding"]["claims_checked"] >= len(judged)


def test_a_chosen_code_whose_title_disagrees_is_withheld_with_the_reason(icd, monkeypatch):
    from medmitra.clinical import coding
    # A candidate list that (wrongly) offers B20 for "Cardiovascular disease": the final
    # agreement check still withholds it -- null code, the reason says why.
    monkeypatch.setattr(coding, "candidates", lambda _d, limit=5: [("B20", "HIV disease")])
    rt = Fake({"diagnosis": [dx_answer(primary_diagnosis="Cardiovascular disease",
                                       supporting_evidence=["L1"])]})
    pd = analyse(make_case(), rt).insights["primary_diagnosis"]
    assert pd["primary_diagnosis"] == "Cardiovascular disease"
    assert pd["icd_code"] is None and "does not agree" in pd["icd_reason"]
    assert pd["description"] != "HIV disease"


def test_a_sentence_that_does_not_name_the_diagnosis_is_no_evidence(icd):
    # "admitted for evaluation" names no condition: citing it supports nothing.
    bad = dx_answer(primary_diagnosis="Hypothyroidism", supporting_evidence=["N1"])
    rt = Fake({"diagnosis": [bad, bad]})
    ins = analyse(make_case(files=[lab_csv()], notes="Admitted for evaluation."), rt).insights
    assert ins["primary_diagnosis"]["primary_diagnosis"] == "Not available."
    assert ins["grounding"]["diagnoses"][0]["supported"] is False


def test_an_answer_copying_the_prompts_example_is_rejected(icd):
    copy = json.dumps(prompts.STAGE_EXAMPLE["recommendations"])
    rt = Fake({"recommendations": [copy, copy]})
    ins = analyse(make_case(), rt).insights
    # Rejected as a copy, or its items dropped as echoes: never stored.
    st = ins["stages"]["recommendations"]
    assert ins["investigation_recommendations"] == []
    assert st["status"] == "ok" or "prompt's example" in st["reason"]
    ex = prompts.STAGE_EXAMPLE["soap_note"]
    rt = Fake({"soap_note": [json.dumps(ex), json.dumps(ex)]})
    st = analyse(make_case(), rt).insights["stages"]["soap_note"]
    assert st["status"] == "abstained" and ("prompt's example" in st["reason"]
                                            or "echo of the prompt" in st["reason"])
    # Word for word, 3 words or more: a copy; shorter, or other words: not.
    assert prompts.copies_example("recommendations", {"investigations": [
        {"investigation_type": "renal function tests!"}]}) == "renal function tests!"
    assert prompts.copies_example("recommendations", {"investigations": [
        {"investigation_type": "Renal function"}]}) is None
    assert prompts.copies_example("soap_note", GOOD["soap_note"]) is None


def test_doses_and_durations_the_sources_do_not_hold_are_not_stored(icd):
    recs = json.loads(json.dumps(GOOD["recommendations"]))
    recs["treatments"][0] |= {"dosage": "Detoxify with 40mg of 3H", "duration": "6 weeks",
                              "precautions": ["Check allergies", "Repeat after 14 days"]}
    rt = Fake({"recommendations": [json.dumps(recs)]})
    (t,) = analyse(make_case(), rt).insights["treatment_recommendations"]
    assert t["dosage"] == "" and t["duration"] == ""
    assert t["precautions"] == ["Check allergies"]


# --------------------------------------------------------------------------- cut-off text

# One short clinical sentence: every free-text field whose schema allows it must hold it
# at the stage's default token budget (lists lose items before strings shrink).
CLINICAL_SENTENCE = "Haemoglobin 9.1 g/dL is low, consistent with anaemia."


def test_default_budgets_leave_room_for_a_clinical_sentence_in_every_field():
    budgets = {"lab_analysis": LLM.max_tokens_lab, "radiology_analysis": LLM.max_tokens_radiology,
               "case_summary": LLM.max_tokens_summary, "soap_note": LLM.max_tokens_soap,
               "diagnosis": LLM.max_tokens_diagnosis, "differential": LLM.max_tokens_differential,
               "recommendations": LLM.max_tokens_recommendations}
    ids = [f"[L{i}]" for i in range(1, 12)]

    def strings(fitted, orig, path=""):
        if fitted.get("type") == "string" and "enum" not in fitted:
            yield path, fitted["maxLength"], orig["maxLength"]
        if fitted.get("type") == "array":
            assert fitted["maxItems"] >= max(1, orig.get("minItems", 0))
            yield from strings(fitted["items"], orig["items"], path + "[]")
        for k, sub in fitted.get("properties", {}).items():
            yield from strings(sub, orig["properties"][k], f"{path}.{k}")

    for schema in schemas.ALL_SCHEMAS:
        schema = schemas.cite(schema, ids)
        fitted = schemas.fit_schema(schema, budgets[schema["title"]])
        for path, now, was in strings(fitted, schema):
            assert now >= min(was, len(CLINICAL_SENTENCE)), (schema["title"], path, now)


@pytest.mark.parametrize("text, item, stored", [
    # seen with a 1.5B model: each reached its grammar maxLength (or ends in a stray letter
    # of another script) and was stored cut off
    ("To assess the patient's\u8840", False, None),
    ("AST is raised. This suggests liver injury, while the elevated AST andP", False,
     "AST is raised."),
    ("High blood pressure (e.g", True, None),
    ("Hb, PCT, WBC, Plt, LDH,", True, "Hb, PCT, WBC, Plt, LDH"),
    ("Hyponatraemia with low Na, glucose, and B", False, None),
    ("Check iron studies; repeat the CBC in a we", True, "Check iron studies"),
    ("Low haemoglobin. See e.g", False, "Low haemoglobin."),
    # finished at exactly maxLength: kept whole
    ("Haemoglobin is low.", False, "Haemoglobin is low."),
])
def test_text_cut_off_at_its_max_length_is_trimmed_or_refused(text, item, stored):
    required = {"type": "string", "maxLength": len(text), "minLength": 1}
    if item:
        out = schemas.coerce([text, "CBC"], {"type": "array", "maxItems": 3,
                                             "items": {"type": "string",
                                                       "maxLength": len(text)}})
        assert out == ([stored] if stored else []) + ["CBC"]
    elif stored is None:
        with pytest.raises(schemas.InvalidOutput, match="cut off"):
            schemas.coerce(text, required)
        optional = {"type": "string", "maxLength": len(text)}
        assert schemas.coerce(text, optional) == ""
    else:
        assert schemas.coerce(text, required) == stored
    # shorter than its limit and in one script: not cut, stored as written
    assert schemas.coerce("Haemoglobin is low", {"type": "string", "maxLength": 60}) == \
        "Haemoglobin is low"


def test_a_cut_off_required_answer_is_retried_then_abstained(icd):
    limit = schemas.fit_schema(schemas.CASE_SUMMARY, LLM.max_tokens_summary)[
        "properties"]["comprehensive_summary"]["maxLength"]
    cut = ("A 54-year-old woman with cough and fever for three days and " * 20)[:limit]
    ans = json.dumps({"comprehensive_summary": cut, "key_findings": [],
                      "confidence_score": 0.5})
    result = analyse(make_case(), Fake({"case_summary": [ans, ans]}))
    st = result.insights["stages"]["case_summary"]
    assert st["status"] == "abstained" and "cut off" in st["reason"]
    assert result.insights["case_summary"]["comprehensive_summary"] == "Not available."


# --------------------------------------------------------------------------- model findings

def test_model_findings_that_contradict_the_rows_are_not_merged(icd):
    rows = [make_row("Haemoglobin", "13.5", "g/dL", "12-16"),
            make_row("Serum Creatinine", "0.9", "mg/dL", "0.6-1.2"),
            make_row("Platelets", "90", "10^9/L", "150-400")]
    lab = ExtractedFile(file_id="lab-1", category="lab", file_name="cbc.csv", mime="text/csv",
                        text="x", lab_rows=rows)
    findings = ["low Hb", "high creatinine", "Anaemia", "Thrombocytopenia"]
    rt = Fake({"case_summary": [json.dumps({
        "comprehensive_summary": "A 54-year-old woman with cough and low platelets.",
        "key_findings": findings, "confidence_score": 0.5})],
        "lab_analysis": [json.dumps({"summary": "Platelets are low, haemoglobin is normal.",
                                     "key_abnormalities": findings,
                                     "confidence_score": 0.5})]})
    result = analyse(make_case(files=[lab]), rt)
    fact = "Platelets 90 10^9/L (low)"
    assert result.insights["case_summary"]["key_findings"] == [fact, "Thrombocytopenia"]
    assert result.file_summaries["lab-1"]["key_abnormalities"] == [fact, "Thrombocytopenia"]


# --------------------------------------------------------------------------- name placeholder

def test_the_name_placeholder_a_model_copies_is_never_stored(icd):
    mark = "[patient]"
    rt = Fake({"case_summary": [json.dumps({
        "comprehensive_summary": f"The {mark}'s haemoglobin is low. {mark} has a cough.",
        "key_findings": [f"{mark} is anaemic"], "confidence_score": 0.5})],
        "soap_note": [json.dumps({"subjective": f"{mark} reports cough and fever.",
                                  "objective": "Haemoglobin 9.1 g/dL, below range.",
                                  "assessment": "Probable pneumonia with anaemia.",
                                  "plan": f"Review {mark} after a chest X-ray.",
                                  "confidence_score": 0.5})]})
    result = analyse(make_case(), rt)
    stored = json.dumps([result.insights, result.file_summaries])
    assert mark not in stored.lower()
    cs = result.insights["case_summary"]
    assert cs["comprehensive_summary"] == ("The patient's haemoglobin is low. The patient has "
                                           "a cough.")
    assert result.insights["soap_note"]["subjective"] == "The patient reports cough and fever."
    assert result.insights["soap_note"]["plan"] == "Review the patient after a chest X-ray."
    # and the later stages were handed "the patient", not the placeholder
    (soap_call,) = [c for c in rt.calls if c["key"] == "soap_note"]
    assert "The patient's haemoglobin is low." in soap_call["messages"][1]["content"]
    assert mark not in soap_call["messages"][1]["content"]
