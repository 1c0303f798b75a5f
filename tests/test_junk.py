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
