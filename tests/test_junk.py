"""The junk filter (medmitra.clinical.junk), tested on the real junk quoted in issue 9."""

from __future__ import annotations

import pytest

from medmitra.clinical import junk
from medmitra.pipeline import prompts, schemas

NAMES = junk._property_names(schemas.RECOMMENDATIONS) | junk._property_names(schemas.SOAP_NOTE) \
    | junk._property_names(schemas.CASE_SUMMARY) | junk._property_names(schemas.LAB_INTERPRETATION)
PROMPTS = [prompts.RULES, prompts.TASK_SUMMARY, prompts.TASK_SOAP]


@pytest.mark.parametrize("text, field, expected", [
    # stored as insight in the evaluation (issue 9)
    ("{", "summary", "a JSON fragment"),
    ("TASK_1", "comprehensive_summary", "a template or prompt marker"),
    ("array", "investigation_type", "a placeholder word"),
    ("maxLength:220", "plan", "JSON-schema words"),
    ("{{1}}", "assessment", "a JSON fragment"),
    ("Patient {{name}} has anaemia", "summary", "a template or prompt marker"),
    ('{"summary": "Anaemia"', "summary", "a JSON fragment"),
    ('"type": "string", "maxLength": 100', "rationale", "a JSON fragment"),
    ("type: string, maxLength 100", "rationale", "JSON-schema words"),
    ("string", "dosage", "a placeholder word"),
    ("comprehensive_summary", "comprehensive_summary", "an echo of a field name"),
    ("subjective", "subjective", "an echo of a field name"),
    ("key_findings_0", "key_findings", "an echo of a field name"),
    ("See investigation_type below for details", "rationale", "an echo of a field name"),
    ("2024-03-01T10:00:00", "duration", "a timestamp, not text"),
    ("10:30", "duration", "a timestamp, not text"),
    ("fever fever fever fever", "key_findings", "the word 'fever' repeated 4 times"),
    ("Patient has fever. Patient has fever. Patient has fever.", "summary",
     "the phrase 'patient has fever' repeated 3 times"),
    ("ok", "comprehensive_summary", "too short for comprehensive summary"),
    ("Use only the case facts below if something is not in the facts", "summary",
     "an echo of the prompt"),
    ("Write a SOAP note for this case, please.", "plan", "an echo of the prompt"),
    ("<|im_start|>assistant", "summary", "a template or prompt marker"),
    ("N/A", "primary_diagnosis", "a placeholder word"),
])
def test_junk_is_named(text, field, expected) -> None:
    reason = junk.junk_reason(text, field, field_names=NAMES, prompt_texts=PROMPTS)
    assert reason is not None and reason.startswith(expected), reason


@pytest.mark.parametrize("text, field", [
    ("Iron deficiency anaemia with low haemoglobin (9.1 g/dL) and low ferritin.",
     "comprehensive_summary"),
    ("Community acquired pneumonia", "primary_diagnosis"),
    ("MI", "condition"),
    ("CBC", "investigation_type"),
    ("Chest X-ray", "investigation_type"),
    ("500 mg twice daily", "dosage"),
    ("7 days", "duration"),
    ("Cough and fever for three days; no chest pain.", "subjective"),
    ("Hb 9.1 g/dL (low)", "key_findings"),
    ("Repeat CBC in 4 weeks to check the response to iron.", "plan"),
    ("", "summary"),
])
def test_clinical_text_passes(text, field) -> None:
    assert junk.junk_reason(text, field, field_names=NAMES, prompt_texts=PROMPTS) is None


def test_differentials_duplicated_or_repeating_the_primary_are_dropped() -> None:
    items = [{"condition": "Iron deficiency anemia", "probability": 0.5},
             {"condition": "Anemia of chronic disease", "probability": 0.3},
             {"condition": "anemia of chronic disease", "probability": 0.3},
             {"condition": "Acute iron deficiency anemia", "probability": 0.4},
             {"condition": "Thalassaemia trait", "probability": 0.1}]
    kept, dropped = junk.differential_problems(items, "Iron deficiency anemia")
    assert [k["condition"] for k in kept] == ["Anemia of chronic disease", "Thalassaemia trait"]
    assert len(dropped) == 3 and "repeats the primary diagnosis" in dropped[0]


@pytest.mark.parametrize("probs, ok", [
    ([0.5, 0.3, 0.2], True), ([0.4, 0.3], True), ([0.5, 0.3, 0.25], True),
    ([0.9, 0.9, 0.75], False),                         # 2.55: seen in the evaluation
    ([1.0, 1.0, 1.0, 0.95], False),                    # 3.95
    ([0.6, 0.5, 0.45], False),                         # 1.55
])
def test_probabilities_must_form_a_distribution(probs, ok) -> None:
    assert (junk.probabilities_problem(probs) is None) == ok


def test_screen_answer_rejects_required_junk_and_drops_junk_items() -> None:
    good = {"comprehensive_summary": "Low haemoglobin and ferritin point to iron deficiency.",
            "key_findings": ["Hb 9.1 g/dL (low)", "{", "key_findings_1", "Hb 9.1 g/dL (low)",
                             "Ferritin 8 ng/mL (low)"],
            "confidence_score": 0.5}
    out = junk.screen_answer(good, schemas.CASE_SUMMARY, prompt_texts=PROMPTS)
    assert out["key_findings"] == ["Hb 9.1 g/dL (low)", "Ferritin 8 ng/mL (low)"]
    with pytest.raises(junk.JunkAnswer, match="comprehensive summary is a JSON fragment"):
        junk.screen_answer(good | {"comprehensive_summary": "{"}, schemas.CASE_SUMMARY)
    soap = {"subjective": "Cough and fever for three days.", "objective": "Hb 9.1 g/dL, low.",
            "assessment": "Iron deficiency anaemia likely.",
            "plan": "Iron deficiency anaemia likely.", "confidence_score": 0.5}
    with pytest.raises(junk.JunkAnswer, match="plan is a repeat of assessment"):
        junk.screen_answer(soap, schemas.SOAP_NOTE)
    recs = {"investigations": [
        {"investigation_type": "array", "urgency": "urgent", "rationale": "r",
         "expected_findings": ""},
        {"investigation_type": "Serum ferritin", "urgency": "routine",
         "rationale": "maxLength:220", "expected_findings": "Low ferritin"}],
        "treatments": [{"treatment_type": "Oral iron", "description": "Ferrous sulfate",
                        "dosage": "string", "duration": "2024-01-01T00:00:00",
                        "precautions": ["Take with water", "TASK_2"]}]}
    out = junk.screen_answer(recs, schemas.RECOMMENDATIONS)
    assert out["investigations"] == [{"investigation_type": "Serum ferritin",
                                      "urgency": "routine", "rationale": "",
                                      "expected_findings": "Low ferritin"}]
    assert out["treatments"] == [{"treatment_type": "Oral iron", "description": "Ferrous sulfate",
                                  "dosage": "", "duration": "", "precautions":
                                  ["Take with water"]}]


# --------------------------------------------------------------------------- prompt echoes
# Each answer is judged as the stage judges it: that stage's schema field names and its
# instructions (the rules and the stage's task) are the prompt it could echo.

STAGE = {
    "lab_analysis": (schemas.LAB_INTERPRETATION, prompts.TASK_LAB.format(label="Lab file 1")),
    "case_summary": (schemas.CASE_SUMMARY, prompts.TASK_SUMMARY),
    "soap_note": (schemas.SOAP_NOTE, prompts.TASK_SOAP),
    "diagnosis": (schemas.DIAGNOSIS, prompts.TASK_DIAGNOSIS),
    "differential": (schemas.DIFFERENTIAL, prompts.TASK_DIFFERENTIAL),
    "recommendations": (schemas.RECOMMENDATIONS, prompts.TASK_RECOMMENDATIONS),
}


def stage_reason(stage: str, field: str, text: str) -> str | None:
    schema, task = STAGE[stage]
    return junk.junk_reason(text, field, field_names=junk._property_names(schema),
                            prompt_texts=(prompts.RULES, task))


# Every piece of junk quoted in issue 9 that is judged field by field, and the two echoes
# the default model stored afterwards (as primary diagnosis and supporting evidence, shown
# with 75% confidence).
ISSUE_9_JUNK = [
    ("lab_analysis", "summary", "{", "a JSON fragment"),
    ("case_summary", "comprehensive_summary", "TASK_1", "a template or prompt marker"),
    ("soap_note", "plan", "TASK_1", "a template or prompt marker"),
    ("recommendations", "investigation_type", "array", "a placeholder word"),
    ("soap_note", "plan", "maxLength:220", "JSON-schema words"),
    ("soap_note", "assessment", "{{1}}", "a JSON fragment"),
    ("recommendations", "dosage", "steroid 25g/day", "an implausible dose"),
    ("recommendations", "duration", "2024-03-01T10:00:00", "a timestamp"),
    ("recommendations", "duration", "2024-03-01", "a timestamp"),
    ("recommendations", "duration", "10:30", "a timestamp"),
    ("diagnosis", "primary_diagnosis", "Primary diagnosis of the", "an echo of the prompt"),
    ("diagnosis", "supporting_evidence",
     "Evidence from the facts. The evidence provided by the facts.", "an echo of the prompt"),
]


@pytest.mark.parametrize("stage, field, text, expected", ISSUE_9_JUNK)
def test_the_junk_of_issue_9_is_rejected(stage, field, text, expected) -> None:
    reason = stage_reason(stage, field, text)
    assert reason is not None and reason.startswith(expected), reason


@pytest.mark.parametrize("stage, field, text, expected", [
    # content words all from the instruction, the field names or filler
    ("diagnosis", "primary_diagnosis", "Most likely primary diagnosis", "an echo"),
    ("diagnosis", "primary_diagnosis", "Diagnosis", "an echo"),
    ("diagnosis", "description", "A short description of the diagnosis.", "an echo"),
    ("diagnosis", "supporting_evidence", "Supporting evidence", "an echo"),
    ("lab_analysis", "summary", "Key abnormal results are listed in the summary.", "an echo"),
    ("case_summary", "comprehensive_summary",
     "This is a comprehensive summary of the case with key findings.", "an echo"),
    ("differential", "reasoning", "Differential diagnosis other than the primary diagnosis.",
     "an echo"),
    ("recommendations", "investigation_type", "Further investigations", "an echo"),
    ("recommendations", "treatment_type", "Treatment", "an echo"),
    ("soap_note", "objective", "Based on the information provided.", "an echo"),
    # only function words
    ("soap_note", "plan", "And then it was so", "no content words"),
    # a one-sentence answer cut off after a function word
    ("diagnosis", "primary_diagnosis", "Pneumonia of the", "a fragment ending in 'the'"),
    ("differential", "condition", "Anaemia due to", "a fragment ending in 'to'"),
    ("soap_note", "assessment", "Probable pneumonia with", "a fragment ending in 'with'"),
    # the same sentence twice in other words
    ("case_summary", "comprehensive_summary",
     "Anaemia caused by iron loss. Iron loss causing the anaemia.", "the same said twice"),
    # doses above any dose in routine use of the drug named
    ("recommendations", "dosage", "Prednisolone 2500 mg daily", "an implausible dose"),
    ("recommendations", "dosage", "Paracetamol 10 g", "an implausible dose"),
    ("recommendations", "dosage", "200 g twice daily", "an implausible dose"),
])
def test_prompt_echoes_fragments_and_paraphrases_are_rejected(stage, field, text,
                                                              expected) -> None:
    reason = stage_reason(stage, field, text)
    assert reason is not None and reason.startswith(expected), reason


@pytest.mark.parametrize("stage, field, text", [
    ("diagnosis", "primary_diagnosis", "Community-acquired pneumonia"),
    ("diagnosis", "primary_diagnosis", "Iron deficiency anaemia"),
    ("diagnosis", "primary_diagnosis", "Type 2 diabetes mellitus without complications"),
    ("diagnosis", "primary_diagnosis", "Not available"),
    ("diagnosis", "primary_diagnosis", "Not available in the facts."),
    ("diagnosis", "primary_diagnosis", "Hepatitis A"),
    ("diagnosis", "primary_diagnosis", "Acute kidney injury"),
    ("diagnosis", "supporting_evidence", "Haemoglobin 8.8 g/dL is low"),
    ("diagnosis", "supporting_evidence", "Cough and fever"),
    ("diagnosis", "description", "Infection of the lung parenchyma acquired outside hospital."),
    ("lab_analysis", "summary", "Haemoglobin 8.8 g/dL is low"),
    ("lab_analysis", "summary", "Haemoglobin is low; the other results are within range."),
    ("lab_analysis", "key_abnormalities", "Low haemoglobin"),
    ("case_summary", "comprehensive_summary",
     "A 54-year-old woman with cough and fever for three days and a low haemoglobin."),
    ("case_summary", "comprehensive_summary",
     "Haemoglobin 9.1 g/dL is low. Ferritin 8 ng/mL is low. TSH is normal."),
    ("soap_note", "subjective", "Patient reports no complaints."),
    ("soap_note", "objective", "Vital signs stable."),
    ("soap_note", "assessment", "Probable pneumonia with anaemia."),
    ("soap_note", "plan", "Follow up in 2 weeks."),
    ("differential", "condition", "Acute bronchitis"),
    ("differential", "reasoning", "Cough and fever without consolidation."),
    ("recommendations", "investigation_type", "Chest X-ray"),
    ("recommendations", "investigation_type", "Serum ferritin"),
    ("recommendations", "rationale", "To rule out infection"),
    ("recommendations", "expected_findings", "Normal"),
    ("recommendations", "treatment_type", "Oral antibiotics"),
    ("recommendations", "dosage", "Prednisolone 40 mg daily"),
    ("recommendations", "dosage", "Methylprednisolone 1 g IV daily"),
    ("recommendations", "dosage", "Paracetamol 1 g four times daily"),
    ("recommendations", "dosage", "Macrogol 17 g daily"),
    ("recommendations", "dosage", "500 mg three times daily"),
    ("recommendations", "duration", "5 days"),
    ("recommendations", "precautions", "Take with food"),
])
def test_legitimate_clinical_answers_pass(stage, field, text) -> None:
    assert stage_reason(stage, field, text) is None


def test_a_dose_is_judged_with_the_drug_named_elsewhere_in_the_treatment() -> None:
    recs = {"investigations": [], "treatments": [
        {"treatment_type": "Steroid", "description": "Oral prednisolone", "dosage": "25g/day",
         "duration": "5 days", "precautions": []},
        {"treatment_type": "Oral iron", "description": "Ferrous sulfate",
         "dosage": "200 mg twice daily", "duration": "3 months", "precautions": []}]}
    out = junk.screen_answer(recs, schemas.RECOMMENDATIONS)
    assert [t["dosage"] for t in out["treatments"]] == ["", "200 mg twice daily"]
    # 25 g is below the ceiling for an unnamed drug: only the steroid makes it implausible.
    assert junk.dose_problem("25g/day") is None
    assert junk.dose_problem("25g/day", "prednisolone").startswith("an implausible dose")


def test_a_required_field_paraphrasing_another_rejects_the_answer() -> None:
    soap = {"subjective": "Cough and fever for three days.",
            "objective": "Haemoglobin 9.1 g/dL, below range.",
            "assessment": "Iron deficiency anaemia likely.",
            "plan": "Likely iron deficiency anaemia.", "confidence_score": 0.5}
    with pytest.raises(junk.JunkAnswer, match="plan is a repeat of assessment"):
        junk.screen_answer(soap, schemas.SOAP_NOTE)
    soap["plan"] = "Oral iron and repeat haemoglobin in 4 weeks."
    assert junk.screen_answer(soap, schemas.SOAP_NOTE)["plan"] == soap["plan"]


def test_the_echoes_of_issue_9_reject_the_diagnosis_answer() -> None:
    """What main stored with the default model: screen_answer now rejects it (retry, then
    abstention), as stages.py calls it with the rules and the stage's task."""
    answer = {"primary_diagnosis": "Primary diagnosis of the", "description": "",
              "supporting_evidence": ["Evidence from the facts. The evidence provided by the "
                                      "facts."], "confidence_score": 0.75}
    with pytest.raises(junk.JunkAnswer, match="primary diagnosis is an echo"):
        junk.screen_answer(answer, schemas.DIAGNOSIS,
                           prompt_texts=(prompts.RULES, prompts.TASK_DIAGNOSIS))
    answer["primary_diagnosis"] = "Community-acquired pneumonia"
    out = junk.screen_answer(answer, schemas.DIAGNOSIS,
                             prompt_texts=(prompts.RULES, prompts.TASK_DIAGNOSIS))
    assert out["supporting_evidence"] == []


@pytest.mark.parametrize("field, text", [
    ("dosage", "Prednisolone 40 mg daily"),
    ("plan", "Prednisolone 40 mg daily; recheck Hb 70 g/L and glucose 600 mg/dL."),
    ("objective", "Hb 70 g/L, glucose 1200 mg/dL on prednisolone."),
    ("summary", "Urine protein 60 g/L on dexamethasone."),
    ("plan", "Weight 70 kg; prednisolone 40 mg daily."),
])
def test_concentrations_and_results_are_not_doses(field, text) -> None:
    assert junk.junk_reason(text, field) is None
    assert junk.screen_answer({"plan": "On steroids.", field: text},
                              {"properties": {"plan": {"type": "string"},
                                              field: {"type": "string"}}})[field] == text
