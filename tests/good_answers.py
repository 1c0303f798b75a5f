"""Acceptable model answers per stage, for tests of the logic around the model.

The plain FakeRuntime answers with its schema's field names, which the junk filter rightly
rejects; ``GoodFake`` answers these instead whenever a test scripts nothing for a stage.
"""

from __future__ import annotations

import json

from medmitra.llm.runtime import FakeRuntime

GOOD = {
    "lab_analysis": {"summary": "Haemoglobin is low; the other results are within range.",
                     "key_abnormalities": ["Hb 9.1 g/dL low"], "confidence_score": 0.7,
                     "lab_values": []},
    "radiology_analysis": {"findings": "Right lower lobe opacity.", "impressions": "Pneumonia",
                           "summary": "Consolidation on the right.",
                           "key_abnormalities": ["Opacity right lower lobe"],
                           "confidence_score": 0.6},
    "case_summary": {"comprehensive_summary": "A 54-year-old woman with cough and fever for "
                                              "three days and a low haemoglobin.",
                     "key_findings": ["Low haemoglobin"], "confidence_score": 0.5},
    "soap_note": {"subjective": "Cough and fever for three days.",
                  "objective": "Haemoglobin 9.1 g/dL, below range.",
                  "assessment": "Probable pneumonia with anaemia.",
                  "plan": "Chest X-ray review and iron studies.", "confidence_score": 0.5},
    "diagnosis": {"primary_diagnosis": "Community acquired pneumonia", "icd_code": "J18.9",
                  "description": "", "supporting_evidence": ["N1", "L1"],
                  "confidence_score": 0.5},
    "differential": {"differential_diagnoses": [
        {"condition": "Acute bronchitis", "probability": 0.3,
         "reasoning": "Cough and fever without consolidation.", "distinguishing_factors": [],
         "supporting_evidence": ["L1"]},
        {"condition": "Influenza", "probability": 0.2,
         "reasoning": "Seasonal fever with cough and malaise.", "distinguishing_factors": [],
         "supporting_evidence": ["L1"]},
        {"condition": "Pulmonary tuberculosis", "probability": 0.1,
         "reasoning": "Persistent cough; exposure history unknown.",
         "distinguishing_factors": [],
         "supporting_evidence": ["L1"]}]},
    "recommendations": {"investigations": [
        {"investigation_type": "Chest X-ray", "urgency": "routine",
         "rationale": "Confirm or exclude consolidation.", "expected_findings": "Opacity"}],
        "treatments": [{"treatment_type": "Oral antibiotics", "description": "Amoxicillin",
                        "dosage": "500 mg three times daily", "duration": "5 days",
                        "precautions": ["Check allergies"]}]},
}


class GoodFake(FakeRuntime):
    """FakeRuntime answering GOOD[stage] (fitted to the schema) when nothing is scripted."""

    def _answer(self, kind, messages, schema, max_tokens, seed):
        key = str(schema.get("title", ""))
        if not self.script.get(key) and key in GOOD:
            self.script[key] = [json.dumps({k: v for k, v in GOOD[key].items()
                                            if k in schema["properties"]})]
        return super()._answer(kind, messages, schema, max_tokens, seed)
