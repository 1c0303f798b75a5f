"""Computed confidence (medmitra.clinical.confidence): unchecked or junk text never scores."""

from __future__ import annotations

import json

import pytest

from good_answers import GOOD, GoodFake
from medmitra.clinical import confidence
from medmitra.clinical.grounding import Grounder
from medmitra.clinical.labs import make_row
from medmitra.config import LLMSettings
from medmitra.pipeline.stages import run_analysis
from medmitra.pipeline.types import AnalysisOptions, CaseInput, ExtractedFile

ROWS = [make_row("Hb", "9.1", "g/dL", "12-16"), make_row("WBC", "7.0", "10^9/L", "4-11")]


def grounder() -> Grounder:
    return Grounder(ROWS, ["Cough and fever for three days.", "54"])


def score(items: list[str], status: str = "ok", determ: float = 1.0) -> float | None:
    g = grounder()
    g.items("diagnosis", items)
    return confidence.section(status, g.share("diagnosis"), determ)


@pytest.mark.parametrize("items, expected", [
    # unchecked text earns nothing: the 75% main showed for an echo of the prompt is gone
    (["Evidence from the facts. The evidence provided by the facts."], 0.0),
    (["Cough and fever"], 0.0),
    ([], 0.0),
    # every item checked and held, first try, every lab line parsed
    (["Hb 9.1 g/dL is low"], 1.0),
    # one verified, one unchecked: half the grounding share
    (["Hb 9.1 g/dL is low", "Cough and fever"], 0.5),
    # a claim that fails (Hb is low, not high; 4.5 is in no source) is dropped and counts
    (["Hb 9.1 g/dL is low", "Hb is high", "Mass of 4.5 cm"], round(1 / 3, 3)),
])
def test_only_verified_text_earns_confidence(items, expected) -> None:
    assert score(items) == pytest.approx(expected, abs=1e-3)


def test_validity_and_parsed_labs_weigh_only_verified_text() -> None:
    verified = ["Hb 9.1 g/dL is low"]
    assert score(verified, "retried") == pytest.approx(0.6 + 0.25 * 0.5 + 0.15)
    assert score(verified, "ok", determ=0.0) == pytest.approx(0.85)
    assert score(["Cough and fever"], "ok", determ=1.0) == 0.0
    assert score(verified, "abstained") is None
    assert confidence.overall([None, 0.5, 1.0]) == 0.75 and confidence.overall([None]) is None
    assert confidence.below(None, 0.5) and confidence.below(0.4, 0.5)
    assert not confidence.below(0.5, 0.5) and not confidence.below(0.1, None)


def test_an_unverifiable_diagnosis_scores_zero_and_is_flagged_below_the_threshold() -> None:
    """Through the stages: the diagnosis' evidence is plausible but checks nothing."""
    lab = ExtractedFile(file_id="lab-1", category="lab", file_name="cbc.csv", mime="text/csv",
                        text="x", lab_rows=list(ROWS))
    case = CaseInput(case_id="c1", patient_name="Asha Verma", patient_age=54,
                     patient_gender="female", doctor_notes="Cough and fever for three days.",
                     files=[lab], options=AnalysisOptions(confidence_threshold=0.5))
    # Free-text evidence is no fact id: nothing supports the diagnosis, so on both tries
    # it is refused and not stored at all (clinical/grounding.py): no score, flagged.
    unverifiable = json.dumps(GOOD["diagnosis"] | {
        "supporting_evidence": ["Clinical picture"], "confidence_score": 0.95})
    rt = GoodFake({"diagnosis": [unverifiable, unverifiable]})
    ins = run_analysis(case, rt, LLMSettings(), progress=lambda s, f: None,
                       should_stop=lambda: False).insights
    pd = ins["primary_diagnosis"]
    assert pd["primary_diagnosis"] == "Not available."
    assert pd["confidence_score"] is None and pd["below_threshold"] is True
    # The case summary cites the age (54), a source number: verified, so it scores.
    cs = ins["case_summary"]
    assert cs["confidence_score"] > 0 and ins["grounding"]["sections"]["case_summary"][
        "verified"] >= 1


def test_the_code_tables_title_is_not_grounded_as_model_text() -> None:
    """With an ICD-10 code, the description is the table's title: "Type 2 ..." was dropped
    as an ungrounded number (and counted against the diagnosis' confidence)."""
    case = CaseInput(case_id="c2", patient_name="Ravi Kumar", patient_age=61,
                     patient_gender="male",
                     doctor_notes="Thirst and polyuria in a known case of diabetes.",
                     files=[], options=AnalysisOptions())
    # Evidence is cited by fact id: N1, the notes' sentence that names diabetes.
    rt = GoodFake({"diagnosis": [json.dumps(GOOD["diagnosis"] | {
        "primary_diagnosis": "Type 2 diabetes mellitus without complications",
        "supporting_evidence": ["N1"]})]})
    ins = run_analysis(case, rt, LLMSettings(), progress=lambda s, f: None,
                       should_stop=lambda: False).insights
    pd = ins["primary_diagnosis"]
    assert pd["icd_code"] is not None and pd["icd_code"].startswith("E11")
    assert pd["description"].startswith("Type 2 diabetes mellitus")
    assert ins["grounding"]["sections"]["primary_diagnosis"]["dropped"] == 0
