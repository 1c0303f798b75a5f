"""Compatibility with the original MedMitra clients, kept in one place.

- camelCase query parameter spellings of the original frontend;
- the flat ``ai_insights`` object the original frontend reads, derived from the nested
  ``insights`` record the docs describe.
"""

from __future__ import annotations

from typing import Any, Mapping

# camelCase (original frontend) -> snake_case (contract) list-filter names.
QUERY_ALIASES = {
    "startDate": "start_date",
    "endDate": "end_date",
    "minAge": "min_age",
    "maxAge": "max_age",
    "sortBy": "sort_by",
    "sortOrder": "sort_order",
    "userId": "user_id",
    "patientGender": "gender",
    "pageSize": "limit",
}

def normalise_query(args: Mapping[str, list[str]]) -> dict[str, str]:
    """Last value of each parameter, camelCase spellings mapped to snake_case."""
    out: dict[str, str] = {}
    for key, values in args.items():
        if not values:
            continue
        out[QUERY_ALIASES.get(key, key)] = values[-1]
    return out


def flat_insights(case_uuid: str, nested: dict[str, Any], *, generated_at: str,
                  created_at: str, updated_at: str) -> dict[str, Any]:
    summary = nested.get("case_summary") or {}
    soap = nested.get("soap_note") or {}
    diag = nested.get("primary_diagnosis") or {}
    return {
        "case_id": case_uuid,
        "comprehensive_summary": summary.get("comprehensive_summary", ""),
        "key_findings": list(summary.get("key_findings") or []),
        "patient_context": dict(summary.get("patient_context") or {}),
        "doctor_notes": summary.get("doctor_notes", ""),
        "lab_summary": summary.get("lab_summary", ""),
        "radiology_summary": summary.get("radiology_summary", ""),
        "case_summary_confidence_score": summary.get("confidence_score", 0.0),
        "soap_subjective": soap.get("subjective", ""),
        "soap_objective": soap.get("objective", ""),
        "soap_assessment": soap.get("assessment", ""),
        "soap_plan": soap.get("plan", ""),
        "soap_confidence_score": soap.get("confidence_score", 0.0),
        "primary_diagnosis": diag.get("primary_diagnosis", ""),
        "icd_code": diag.get("icd_code"),
        "diagnosis_description": diag.get("description", ""),
        "diagnosis_confidence_score": diag.get("confidence_score", 0.0),
        "supporting_evidence": list(diag.get("supporting_evidence") or []),
        "overall_confidence_score": nested.get("overall_confidence_score", 0.0),
        "generated_at": generated_at,
        "created_at": created_at,
        "updated_at": updated_at,
    }
