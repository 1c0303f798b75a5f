"""The OpenAPI 3.1 document of the whole HTTP API, maintained by hand.

Why by hand: sanic-ext would generate it, but it loads CDN assets and slows every request.
The document is fuzzed (Schemathesis) and validated in tests/test_openapi.py, so every
constraint here must match what the handlers really accept and return: the contract is
spec/api.md (sections 1-7) and the Supabase Auth subset that supabase-js 2.x calls.

Numbers that are configurable (name and text lengths, page size) are documented at their
defaults from ``medmitra.config``.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from medmitra import __version__, contract, filetypes
from medmitra.config import LimitsSettings
from medmitra.contract import CaseStatus, FileCategory

OPENAPI_VERSION = "3.1.0"
TITLE = "MedMitra Edge API"

_LIMITS = LimitsSettings()
NAME_MAX_CHARS = _LIMITS.name_max_chars
TEXT_MAX_CHARS = _LIMITS.text_field_max_chars
FILES_PER_REQUEST = _LIMITS.files_per_request

CASE_STATUS = [s.value for s in CaseStatus]
CATEGORY = [c.value for c in FileCategory]
ANALYSIS_STATE = [s.value for s in contract.ANALYSIS_STATES]
LAB_MIMES = ", ".join(filetypes.ACCEPTED[FileCategory.LAB])
RADIOLOGY_MIMES = ", ".join(filetypes.ACCEPTED[FileCategory.RADIOLOGY])

Schema = dict[str, Any]


# ---------------------------------------------------------------- small schema helpers

def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    """``schema`` or JSON null (3.1 style: a type list, or anyOf for refs)."""
    if "type" in schema and isinstance(schema["type"], str):
        return {**schema, "type": [schema["type"], "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def _obj(props: dict[str, Schema], required: list[str] | None = None, **extra: Any) -> Schema:
    out: Schema = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    out.update(extra)
    return out


def _shape(fields: tuple[str, ...], props: dict[str, Schema], **extra: Any) -> Schema:
    """An output object of the contract: exactly ``fields`` (medmitra.contract), in that
    order, all required (nullable ones say so in their schema)."""
    if set(props) != set(fields):
        raise ValueError(f"schema and contract disagree on {sorted(set(props) ^ set(fields))}")
    return _obj({name: props[name] for name in fields}, list(fields), **extra)


STR: Schema = {"type": "string"}
UUID: Schema = {"type": "string", "format": "uuid"}
DATETIME: Schema = {"type": "string", "format": "date-time"}
SCORE: Schema = {"type": "number", "minimum": 0, "maximum": 1}
STR_LIST: Schema = {"type": "array", "items": STR}
BINARY: Schema = {"type": "string", "format": "binary"}
# Path ids: the docs show integer ids, clients of the original send UUIDs; both work.
ID_OR_UUID: Schema = {"anyOf": [{"type": "integer", "minimum": 1}, UUID]}
PATIENT_NAME: Schema = {"type": "string", "minLength": 1, "maxLength": NAME_MAX_CHARS,
                        "pattern": r"\S", "description": "Trimmed; must not be blank."}
PATIENT_AGE: Schema = {"type": "integer", "minimum": contract.AGE_MIN_YEARS,
                       "maximum": contract.AGE_MAX_YEARS}
PATIENT_GENDER: Schema = {"type": "string", "minLength": 1,
                          "maxLength": contract.GENDER_MAX_CHARS, "pattern": r"\S"}
CASE_SUMMARY: Schema = {"type": "string", "maxLength": TEXT_MAX_CHARS,
                        "description": "Doctor's notes; optional, analysis works without."}


# ---------------------------------------------------------------- components

def _schemas() -> dict[str, Schema]:
    case = _shape(contract.CASE_FIELDS, {
        "id": {"type": "integer", "description": "Integer id (accepted in paths too)."},
        "case_id": UUID,
        "doctor_id": {**UUID, "description": "The owner (token `sub`)."},
        "user_id": {**UUID, "description": "The owner; same value as doctor_id."},
        "patient_name": STR,
        "patient_age": PATIENT_AGE,
        "patient_gender": STR,
        "case_summary": _nullable(STR),
        "status": {"type": "string", "enum": CASE_STATUS},
        "created_at": DATETIME,
        "updated_at": {**DATETIME, "description": "Moves on every change."},
    })

    case_file = _shape(contract.FILE_FIELDS, {
        "id": {"type": "integer"},
        "file_id": UUID,
        "case_id": {**UUID, "description": "The case's UUID."},
        "file_name": {"type": "string", "description": "As uploaded, for display only."},
        "file_type": {"type": "string", "description": "MIME type detected from content."},
        "file_size": {"type": "integer", "minimum": 0, "description": "Bytes."},
        "file_category": {"type": "string", "enum": CATEGORY},
        "file_url": {"type": "string", "format": "uri",
                     "description": "Absolute, signed, expiring link to "
                                    "`GET /files/download/{token}`; needs no Authorization."},
        "upload_date": DATETIME,
        "uploaded_at": {**DATETIME, "description": "Same value as upload_date."},
        "text_data": _nullable({"type": "string", "description": "Extracted text."}),
        "ai_summary": _nullable({
            "type": "string", "contentMediaType": "application/json",
            "description": "A JSON **string** (not an object). Radiology: "
                           "`{findings, impressions, summary, key_abnormalities, "
                           "confidence_score}`; lab: `{lab_values, summary, "
                           "key_abnormalities, confidence_score}`.",
        }),
    })

    flat_props: dict[str, Schema] = {
        "case_id": UUID,
        "comprehensive_summary": _nullable(STR),
        "key_findings": STR_LIST,
        "patient_context": {"type": "object"},
        "doctor_notes": _nullable(STR),
        "lab_summary": _nullable(STR),
        "radiology_summary": _nullable(STR),
        "case_summary_confidence_score": _nullable(SCORE),
        "soap_subjective": _nullable(STR),
        "soap_objective": _nullable(STR),
        "soap_assessment": _nullable(STR),
        "soap_plan": _nullable(STR),
        "soap_confidence_score": _nullable(SCORE),
        "primary_diagnosis": _nullable(STR),
        "icd_code": _nullable({"type": "string", "description": "A valid ICD-10-CM code."}),
        "diagnosis_description": _nullable(STR),
        "diagnosis_confidence_score": _nullable(SCORE),
        "supporting_evidence": STR_LIST,
        "overall_confidence_score": {**_nullable(SCORE), "description":
                                     "Mean of the three scores that exist (null if none)."},
        "generated_at": DATETIME,
        "created_at": DATETIME,
        "updated_at": DATETIME,
    }
    ai_insights_flat = _shape(contract.FLAT_INSIGHT_FIELDS, flat_props,
                              description="Flat insights, as the original frontend reads them.")

    differential = _obj({
        "condition": STR, "probability": SCORE, "reasoning": _nullable(STR),
        "distinguishing_factors": STR_LIST,
        "supporting_evidence": {**STR_LIST, "description": "The facts it cites, as written "
                                "in the case (chosen by fact id, never the model's words)."},
    }, ["condition", "probability", "reasoning", "distinguishing_factors"])
    investigation = _obj({
        "investigation_type": STR,
        "urgency": {"type": "string", "enum": ["urgent", "routine", "follow-up"]},
        "rationale": _nullable(STR), "expected_findings": _nullable(STR),
    }, ["investigation_type", "urgency", "rationale", "expected_findings"])
    treatment = _obj({
        "treatment_type": STR, "description": _nullable(STR), "dosage": _nullable(STR),
        "duration": _nullable(STR), "precautions": STR_LIST,
    }, ["treatment_type", "description", "dosage", "duration", "precautions"])
    NSCORE = _nullable(SCORE)  # null: abstained, or nothing was assessed
    insights = _shape(contract.INSIGHT_FIELDS, {
        "case_summary": _obj({
            "comprehensive_summary": _nullable(STR), "key_findings": STR_LIST,
            "patient_context": {"type": "object"}, "doctor_notes": _nullable(STR),
            "lab_summary": _nullable(STR), "radiology_summary": _nullable(STR),
            "confidence_score": NSCORE,
        }, ["comprehensive_summary", "key_findings", "patient_context", "doctor_notes",
            "lab_summary", "radiology_summary", "confidence_score"]),
        "soap_note": _obj({
            "subjective": _nullable(STR), "objective": _nullable(STR),
            "assessment": _nullable(STR), "plan": _nullable(STR), "confidence_score": NSCORE,
        }, ["subjective", "objective", "assessment", "plan", "confidence_score"]),
        "primary_diagnosis": _obj({
            "primary_diagnosis": _nullable(STR), "icd_code": _nullable(STR),
            "description": _nullable(STR), "confidence_score": NSCORE,
            "supporting_evidence": STR_LIST,
        }, ["primary_diagnosis", "icd_code", "description", "confidence_score",
            "supporting_evidence"]),
        "differential_diagnoses": {"type": "array", "items": differential},
        "investigation_recommendations": {"type": "array", "items": investigation},
        "treatment_recommendations": {"type": "array", "items": treatment},
        "overall_confidence_score": NSCORE,
        "generated_at": DATETIME,
        "model": {
            "description": "Which GGUF model produced the insights (name, or a record of "
                           "file name, quantisation and hash).",
            "anyOf": [STR, {"type": "object"}, {"type": "null"}],
        },
        "labs": {"type": "array", "description": "Lab rows parsed deterministically from every "
                 "lab file (analyte, value, numeric, unit, range, flag low|normal|high|unknown, "
                 "lab_flag, critical, file_id, page).", "items": {"type": "object"}},
        "lab_counts": _obj({"rows_parsed": {"type": "integer"},
                            "lines_not_parsed": {"type": "integer"}}),
        "grounding": _obj({"claims_checked": {"type": "integer"}, "kept": {"type": "integer"},
                           "dropped": {"type": "integer"}, "sections": {"type": "object"},
                           "diagnoses": {"type": "array", "items": _obj({
                               "section": STR, "condition": STR,
                               "supported": {"type": "boolean"}, "reason": _nullable(STR)})}},
                          description="Claims of model-written text checked against the "
                                      "sources; unsupported sentences and items are dropped. "
                                      "diagnoses: each diagnosis judged (a primary no fact "
                                      "supports is not stored: the stage abstains)."),
        "stages": {"type": "object", "description": "Per stage: {status: ok|retried|abstained, "
                   "reason}. An abstained section says 'Not available.' (scores null)."},
        "model_info": _obj({"name": STR, "file": STR, "demonstration": {"type": "boolean"},
                            "notice": STR}),
    }, description="Nested insights, as the API docs describe them.")

    analysis = _shape(contract.ANALYSIS_FIELDS, {
        "state": {"type": "string", "enum": ANALYSIS_STATE},
        "stage": _nullable({"type": "string", "description":
                            "Current stage: extract, lab_analysis, radiology_analysis, "
                            "case_summary, soap_note, diagnosis, differential, "
                            "recommendations, compile."}),
        "progress": {"type": "number", "minimum": 0, "maximum": 1},
        "queue_position": _nullable({"type": "integer", "minimum": 0}),
        "error": _nullable({"type": "string", "description": "Why the run failed."}),
        "started_at": _nullable(DATETIME),
        "finished_at": _nullable(DATETIME),
        "attempts": {"type": "integer", "minimum": 0},
    })

    error = _obj({
        "detail": STR,
        "error": {"type": "string", "description": "Same message as detail."},
        "errors": {"type": "array", "items": _obj({
            "loc": {"type": "array", "items": {"anyOf": [STR, {"type": "integer"}]}},
            "msg": STR,
        }, ["loc", "msg"])},
    }, ["detail", "error"])

    message = _obj({"message": STR}, ["message"])

    # ---- Supabase Auth (GoTrue) subset, as supabase-js 2.x reads it.
    auth_error = _obj({
        "code": {"type": "integer", "description": "The HTTP status again."},
        "error_code": {"type": "string", "examples": ["invalid_credentials"]},
        "msg": STR,
    }, ["code", "error_code", "msg"])
    user = _obj({
        "id": UUID,
        "aud": STR,
        "role": STR,
        "email": _nullable(STR),
        "phone": _nullable(STR),
        "email_confirmed_at": _nullable(DATETIME),
        "confirmed_at": _nullable(DATETIME),
        "last_sign_in_at": _nullable(DATETIME),
        "app_metadata": {"type": "object"},
        "user_metadata": {"type": "object"},
        "identities": {"type": "array", "items": {"type": "object"}},
        "is_anonymous": {"type": "boolean"},
        "created_at": DATETIME,
        "updated_at": DATETIME,
    }, ["id", "aud", "app_metadata", "user_metadata", "created_at"])
    session = _obj({
        "access_token": {"type": "string", "description": "A JWT (same format Supabase "
                                                          "issues); use as Bearer token."},
        "token_type": {"type": "string", "enum": ["bearer"]},
        "expires_in": {"type": "integer", "minimum": 1, "description": "Seconds."},
        "expires_at": {"type": "integer", "description": "Unix time, seconds."},
        "refresh_token": STR,
        "user": _ref("User"),
    }, ["access_token", "token_type", "expires_in", "expires_at", "refresh_token", "user"])

    return {
        "Case": case,
        "CaseFile": case_file,
        "AiInsightsFlat": ai_insights_flat,
        "Insights": insights,
        "Analysis": analysis,
        "Error": error,
        "Message": message,
        "AuthError": auth_error,
        "User": user,
        "Session": session,
    }


def _error_response(description: str, *, auth_header: bool = False,
                    schema: str = "Error") -> Schema:
    out: Schema = {"description": description,
                   "content": {"application/json": {"schema": _ref(schema)}}}
    if auth_header:
        out["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"},
                                               "description": "`Bearer`"}}
    return out


def _responses() -> dict[str, Schema]:
    return {
        "BadRequest": _error_response("Invalid parameter or body (type, range, missing "
                                      "field, unknown category, empty update)."),
        "Unauthorized": _error_response("Missing, malformed, expired or forged token.",
                                        auth_header=True),
        "Forbidden": _error_response("The token is valid but `user_id` names someone else."),
        "NotFound": _error_response("No such resource, or it belongs to another user."),
        "PayloadTooLarge": _error_response("A file or the request body is over its limit."),
        "UnsupportedMediaType": _error_response("File content is not accepted for its "
                                                "category (judged by content, not name)."),
        "TooManyRequests": _error_response("Rate limit hit, or too many analyses of this "
                                           "user waiting."),
        "InsufficientStorage": _error_response("Not enough free disk space for the upload."),
        "ServiceUnavailable": _error_response("Not ready: starting, shutting down, or no "
                                              "model for analysis."),
        "AuthBadRequest": _error_response("Invalid request or credentials.",
                                          schema="AuthError"),
        "AuthUnauthorized": _error_response("Missing or invalid access token.",
                                            schema="AuthError"),
        "AuthForbidden": _error_response("Not allowed (e.g. signups disabled, bad JWT).",
                                         schema="AuthError"),
        "AuthUnprocessable": _error_response("Rejected (e.g. user exists, weak password).",
                                             schema="AuthError"),
        "AuthTooManyRequests": _error_response("Rate limit hit.", schema="AuthError"),
        "AuthNotFound": _error_response("No such sign-in code, or it was used already.",
                                        schema="AuthError"),
    }


# ---------------------------------------------------------------- paths

BEARER = [{"bearerAuth": []}]
NO_AUTH: list[dict[str, list[str]]] = []


def _r(name: str) -> Schema:
    return {"$ref": f"#/components/responses/{name}"}


def _json(schema: Schema, description: str = "OK") -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _query(name: str, schema: Schema, description: str = "", **kw: Any) -> Schema:
    out = {"name": name, "in": "query", "required": False, "schema": schema, **kw}
    if description:
        out["description"] = description
    return out


def _path_param(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema,
            "description": description}


CASE_ID_PARAM = _path_param("case_id", ID_OR_UUID, "The case UUID or its integer `id`.")
FILE_ID_PARAM = _path_param("file_id", ID_OR_UUID, "The file UUID or its integer `id`.")
USER_ID_QUERY = _query("user_id", UUID, "Compatibility field: must equal the token's "
                                        "`sub` (else 403).")


def _op(tag: str, op_id: str, summary: str, responses: dict[str, Schema], *,
        security: list[Any] | None = None, **kw: Any) -> Schema:
    return {"tags": [tag], "operationId": op_id, "summary": summary,
            "security": BEARER if security is None else security,
            "responses": responses, **kw}


def _protected(ok: dict[str, Schema], *extra: str) -> dict[str, Schema]:
    """Success responses plus the errors every /cases route can answer."""
    out = dict(ok)
    for code, name in (("400", "BadRequest"), ("401", "Unauthorized"), ("403", "Forbidden"),
                       ("404", "NotFound")):
        out[code] = _r(name)
    for code in extra:
        out[code] = _r({"413": "PayloadTooLarge", "415": "UnsupportedMediaType",
                        "429": "TooManyRequests", "503": "ServiceUnavailable",
                        "507": "InsufficientStorage"}[code])
    return dict(sorted(out.items()))


def _list_params() -> list[Schema]:
    date = {"type": "string", "anyOf": [{"format": "date"}, {"format": "date-time"}]}
    age = PATIENT_AGE
    params = [
        USER_ID_QUERY,
        _query("page", {"type": "integer", "minimum": 1, "maximum": contract.PAGE_MAX,
                        "default": 1},
               "Page number."),
        _query("limit", {"type": "integer", "minimum": 1, "maximum": contract.PAGE_LIMIT_MAX},
               "Page size; without it all matching cases are returned."),
        _query("status", {"type": "string", "enum": CASE_STATUS}),
        _query("search", {"type": "string", "maxLength": contract.SEARCH_MAX_CHARS},
               "Case-insensitive match on patient name or case summary."),
        _query("start_date", date, "created_at on or after (ISO 8601 date or date-time)."),
        _query("end_date", date, "created_at on or before (ISO 8601 date or date-time)."),
        _query("min_age", age),
        _query("max_age", age),
        _query("gender", {"type": "string"}, "Exact match, case-insensitive."),
        _query("sort_by", {"type": "string", "enum": list(contract.SORT_KEYS),
                           "default": contract.DEFAULT_SORT_KEY}),
        _query("sort_order", {"type": "string", "enum": list(contract.SORT_ORDERS),
                              "default": contract.DEFAULT_SORT_ORDER}),
    ]
    by_name = {p["name"]: p for p in params}
    # camelCase spellings sent by the original frontend: same schema, documented as aliases.
    for camel, snake in (("startDate", "start_date"), ("endDate", "end_date"),
                         ("minAge", "min_age"), ("maxAge", "max_age"),
                         ("sortBy", "sort_by"), ("sortOrder", "sort_order")):
        params.append(_query(camel, by_name[snake]["schema"], f"Alias of `{snake}`."))
    return params


def _multipart(schema: Schema, encoding: dict[str, Schema]) -> Schema:
    return {"required": True, "content": {"multipart/form-data": {
        "schema": schema, "encoding": encoding}}}


def _cases_paths() -> dict[str, Schema]:
    case_resp = _obj({"message": STR, "case": _ref("Case")}, ["message", "case"])
    update_schemas: dict[str, Schema] = {
        "patient_name": PATIENT_NAME, "patient_age": PATIENT_AGE,
        "patient_gender": PATIENT_GENDER, "case_summary": _nullable(CASE_SUMMARY),
        "status": {"type": "string", "enum": CASE_STATUS},
    }
    update_fields = {name: update_schemas[name] for name in contract.CASE_UPDATE_FIELDS}
    update_body = _obj(update_fields, description="At least one field; `{}` is a 400 "
                                                  "\"No data provided for update\".",
                       anyOf=[{"required": [k]} for k in update_fields])
    create_schemas = {**update_schemas, "case_summary": CASE_SUMMARY}
    create_form = _obj({
        **{name: create_schemas[name] for name in contract.CASE_CREATE_FIELDS},
        "user_id": {**UUID, "description": "Compatibility field: must equal `sub`."},
        "lab_files": {"type": "array", "items": BINARY, "maxItems": FILES_PER_REQUEST,
                      "description": f"Repeated field. Accepted content: {LAB_MIMES}. At most "
                                     f"{FILES_PER_REQUEST} files per request in all."},
        "radiology_files": {"type": "array", "items": BINARY,
                            "maxItems": FILES_PER_REQUEST,
                            "description": f"Repeated field. Accepted: {RADIOLOGY_MIMES}."},
    }, ["patient_name", "patient_age", "patient_gender"])
    upload_form = _obj({
        "case_id": {**ID_OR_UUID, "description": "The case UUID or integer id."},
        "file": {**BINARY, "description": "One file (or use `files`)."},
        "files": {"type": "array", "items": BINARY, "minItems": 1,
                  "maxItems": FILES_PER_REQUEST, "description": "Repeated field."},
        "category": {"type": "string", "enum": CATEGORY,
                     "description": "When absent, inferred from the content."},
    }, ["case_id"], anyOf=[{"required": ["file"]}, {"required": ["files"]}])
    analyze_body = _obj({
        **{name: {"type": "boolean", "default": True} for name in contract.ANALYZE_OPTIONS},
        contract.ANALYZE_THRESHOLD[0]: {"type": "number", "minimum": contract.CONFIDENCE_MIN,
                                        "maximum": contract.CONFIDENCE_MAX},
    })
    file_list = _obj({"files": {"type": "array", "items": _ref("CaseFile")}}, ["files"])
    enc_lab = {"contentType": LAB_MIMES}
    enc_rad = {"contentType": RADIOLOGY_MIMES}

    return {
        "/cases/create_case": {"post": _op(
            "Cases", "createCase", "Create a case, optionally with files",
            _protected({"201": _json(_obj({
                "message": {"type": "string", "const": "Case created successfully"},
                "case": _ref("Case"),
                "uploaded_files": {"type": "array", "items": _ref("CaseFile")},
            }, ["message", "case", "uploaded_files"]), "Created")}, "413", "415", "507"),
            description="The case row and its files are written atomically: if any file is "
                        "rejected nothing is kept. Queues an analysis.",
            requestBody=_multipart(create_form, {"lab_files": enc_lab,
                                                 "radiology_files": enc_rad}))},
        "/cases/all_cases": {"get": _op(
            "Cases", "listCases", "List the caller's cases, newest first",
            _protected({"200": _json(_obj({
                "cases": {"type": "array", "items": _ref("Case")},
                "total": {"type": "integer", "minimum": 0},
                "page": {"type": "integer", "minimum": 1},
                "limit": {"type": "integer", "minimum": 0,
                          "description": "Page size; without `limit`, the total."},
            }, ["cases", "total", "page", "limit"]))}),
            parameters=_list_params())},
        "/cases/cases/{case_id}": {
            "parameters": [CASE_ID_PARAM],
            "get": _op("Cases", "getCase", "Get a case with its files, insights and analysis",
                       _protected({"200": _json(_obj({
                           "case": _ref("Case"),
                           "files": {"type": "array", "items": _ref("CaseFile")},
                           "ai_insights": _nullable(_ref("AiInsightsFlat")),
                           "insights": _nullable(_ref("Insights")),
                           "analysis": _nullable(_ref("Analysis")),
                       }, ["case", "files", "ai_insights", "insights", "analysis"]))})),
            "put": _op("Cases", "updateCase", "Update case fields",
                       _protected({"200": _json(case_resp)}, "413"),
                       requestBody={"required": True, "content": {
                           "application/json": {"schema": update_body}}}),
            "delete": _op("Cases", "deleteCase",
                          "Delete a case with its files (bytes too), insights and jobs",
                          _protected({"200": _json(_ref("Message"))})),
        },
        "/cases/analyze/{case_id}": {"post": _op(
            "Analysis", "analyzeCase", "Queue a fresh analysis run",
            _protected({"200": _json(case_resp)}, "413", "429", "503"),
            description="Case status becomes `processing`. 503 when no model is available; "
                        "429 when the user already has `jobs.max_queued_per_user` analyses "
                        "waiting.",
            parameters=[CASE_ID_PARAM],
            requestBody={"required": False, "content": {
                "application/json": {"schema": analyze_body}}})},
        "/cases/upload": {"post": _op(
            "Files", "uploadFiles", "Upload files to a case (queues re-analysis)",
            _protected({"201": _json(_obj({
                "message": {"type": "string", "const": "File uploaded successfully"},
                "file": _ref("CaseFile"),
                "files": {"type": "array", "items": _ref("CaseFile")},
            }, ["message", "file", "files"]), "Created")}, "413", "415", "429", "507"),
            requestBody=_multipart(upload_form, {"file": {"contentType": "*/*"},
                                                 "files": {"contentType": "*/*"}}))},
        "/cases/files/{case_id}": {"get": _op(
            "Files", "listCaseFiles", "List a case's files",
            _protected({"200": _json(file_list)}), parameters=[CASE_ID_PARAM])},
        "/cases/file/{file_id}": {
            "parameters": [FILE_ID_PARAM],
            "get": _op("Files", "getFile", "Get one file's record",
                       _protected({"200": _json(_obj({"file": _ref("CaseFile")},
                                                     ["file"]))})),
            "delete": _op("Files", "deleteFile", "Delete a file and its bytes",
                          _protected({"200": _json(_ref("Message"))}),
                          parameters=[_query("case_id", ID_OR_UUID,
                                             "Optional: the case the file must belong to.")]),
        },
        "/cases/file/{file_id}/preview.png": {"get": _op(
            "Files", "previewFile", "A DICOM image or a PDF page as PNG",
            {**_protected({"200": {
                "description": "DICOM: the first frame with the file's window/level. PDF: "
                               "the page asked for. Longest side 1024 px.",
                "headers": {"X-Page-Count": {"schema": {"type": "integer"},
                                             "description": "PDF only: its page count."}},
                "content": {"image/png": {"schema": BINARY}}}}, "415"),
             "422": _error_response("No picture can be made of this file (damaged PDF, "
                                    "DICOM without pixel data or with a compression "
                                    "without a decoder).")},
            parameters=[FILE_ID_PARAM, _query("page", {"type": "integer", "minimum": 1,
                                                       "default": 1},
                                              "PDF page number (DICOM: 1).")])},
    }


def _system_paths() -> dict[str, Schema]:
    health = _obj({
        "status": {"type": "string", "description": "Overall state, e.g. ok or degraded."},
        "database": {}, "storage": {}, "model": {}, "workers": {},
        "queue_depth": {"type": "integer", "minimum": 0},
    }, ["status"], description="Liveness and readiness of each part.")
    return {
        "/": {"get": _op("System", "root", "Liveness message", {
            "200": _json(_obj({"message": {"type": "string",
                                           "const": "MedMitra Backend API is running!"}},
                              ["message"]))}, security=NO_AUTH)},
        "/health": {"get": _op("System", "health", "Liveness and readiness", {
            "200": _json(health, "Ready"),
            "503": _json(health, "Not ready (starting, shutting down, or a part is down)"),
        }, security=NO_AUTH)},
        "/files/download/{token}": {"get": _op(
            "Files", "downloadFile", "Download a file's bytes by signed link", {
                "200": {"description": "The bytes, with the stored Content-Type.",
                        "headers": {"Content-Disposition": {"schema": {"type": "string"}}},
                        "content": {"*/*": {"schema": BINARY}}},
                "404": _r("NotFound"),
            }, security=NO_AUTH,
            description="The `file_url` of a file record. No Authorization header: the "
                        "token is an opaque signed, expiring string. A bad, expired or "
                        "foreign token is a 404.",
            parameters=[_path_param("token", {"type": "string", "minLength": 1},
                                    "Opaque signed token from `file_url`.")])},
    }


def _ops_paths() -> dict[str, Schema]:
    """The FHIR export and the metrics scrape (medmitra/ops/, docs/operations.md)."""
    return {
        "/cases/cases/{case_id}/fhir": {
            "parameters": [CASE_ID_PARAM],
            "get": _op("Cases", "exportCaseFhir", "The case as a FHIR R4 Bundle (collection)",
                       _protected({"200": {"description": "A FHIR R4 Bundle: Patient, lab "
                                           "Observations, DiagnosticReports, Condition, and "
                                           "Provenance/Device for the model's content.",
                                           "content": {"application/fhir+json": {"schema": {
                                               "type": "object"}}}}}))},
        "/metrics": {"get": _op("System", "metrics", "Prometheus metrics (text format)", {
            "200": {"description": "Prometheus text exposition format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}}},
            "401": _r("Unauthorized"), "403": _r("Forbidden"), "404": _r("NotFound"),
        }, security=NO_AUTH, description="Served to `metrics.allow_from` addresses only "
                                         "(loopback by default), with the bearer token of "
                                         "`metrics.bearer_token` when one is set.")},
    }


def _authorize_paths() -> dict[str, Schema]:
    """The sign-in page of the PKCE flow (api/authorize.py): HTML, not JSON."""
    def page(description: str, **extra: Any) -> Schema:
        return {"description": description,
                "content": {"text/html": {"schema": STR}}, **extra}

    flow = [_query("provider", STR, "Any name (e.g. `google`): the page is always the "
                                    "server's own sign-in for local accounts."),
            _query("redirect_to", STR, "Where to return with `?code=`; must match "
                                       "`auth.redirect_urls`."),
            _query("code_challenge", STR, "PKCE S256 challenge (43-128 characters)."),
            _query("code_challenge_method", STR, "`s256` (`plain` only with "
                                                 "`auth.pkce_allow_plain`)."),
            _query("scopes", STR, "Ignored; kept in the form's address.")]
    form = _obj({"email": STR, "password": STR, "csrf_token": STR})
    retry = {"Retry-After": {"schema": STR, "description": "Seconds to wait."}}
    return {"/auth/v1/authorize": {
        "get": _op("Auth", "authAuthorize", "The sign-in page (PKCE flow)", {
            "200": page("The sign-in form; sets the form's HttpOnly nonce cookie."),
            "400": page("A link that cannot be used, and why: `redirect_to` not allowed or "
                        "missing, no or malformed PKCE challenge. Never redirects."),
        }, security=NO_AUTH, parameters=flow,
            description="What `supabase.auth.signInWithOAuth` opens. No script, and no "
                        "request to any other host."),
        "post": _op("Auth", "authAuthorizeSubmit", "Sign in on the sign-in page", {
            "302": {"description": "Signed in: redirected to `redirect_to?code=<one-time "
                                   "code>` for `POST /auth/v1/token?grant_type=pkce`.",
                    "headers": {"Location": {"schema": STR}}},
            "400": page("The form again: wrong email or password, or a link that cannot "
                        "be used."),
            "403": page("The form again: disabled account, or an expired or cross-site "
                        "form (CSRF)."),
            "413": _r("PayloadTooLarge"),
            "429": page("The form again: too many failed sign-ins.", headers=retry),
        }, security=NO_AUTH, parameters=flow,
            requestBody={"required": True, "content": {
                "application/x-www-form-urlencoded": {"schema": form}}}),
    }}


def _auth_paths() -> dict[str, Schema]:
    user = _json(_ref("User"))
    limited = {"400": _r("AuthBadRequest"), "429": _r("AuthTooManyRequests")}
    token_user = {"401": _r("AuthUnauthorized"), "403": _r("AuthForbidden"),
                  "429": _r("AuthTooManyRequests")}
    captcha = _obj({"captcha_token": STR})
    signup_body = _obj({
        "email": {"type": "string", "format": "email"},
        "password": {"type": "string", "minLength": 1},
        "data": {"type": "object", "description": "Becomes user_metadata."},
        "gotrue_meta_security": captcha,
        "code_challenge": _nullable(STR),
        "code_challenge_method": _nullable(STR),
    }, ["email", "password"])
    password_grant = _obj({"email": {"type": "string", "format": "email"},
                           "password": STR, "gotrue_meta_security": captcha},
                          ["email", "password"], title="Password grant")
    refresh_grant = _obj({"refresh_token": STR}, ["refresh_token"], title="Refresh grant")
    pkce_grant = _obj({"auth_code": STR, "code_verifier": STR}, ["auth_code", "code_verifier"],
                      title="PKCE grant (the code from the sign-in page)")
    update_body = _obj({
        "email": {"type": "string", "format": "email"},
        "password": {"type": "string", "minLength": 1},
        "data": {"type": "object", "description": "Merged into user_metadata."},
        "nonce": STR,
    })
    settings = _obj({
        "external": {"type": "object", "additionalProperties": {"type": "boolean"},
                     "description": "Enabled providers, e.g. `{\"email\": true}`."},
        "disable_signup": {"type": "boolean"},
        "mailer_autoconfirm": {"type": "boolean"},
        "phone_autoconfirm": {"type": "boolean"},
    }, ["external", "disable_signup"])
    jwks = _obj({"keys": {"type": "array", "items": _obj(
        {"kty": STR, "kid": STR, "alg": STR, "use": STR}, ["kty"])}}, ["keys"])
    return {
        "/auth/v1/signup": {"post": _op(
            "Auth", "authSignup", "Sign up with email and password",
            {"200": _json({"anyOf": [_ref("Session"), _ref("User")]},
                          "A session (auto-confirmed) or the new user"),
             "403": _r("AuthForbidden"), "422": _r("AuthUnprocessable"), **limited},
            security=NO_AUTH,
            requestBody={"required": True, "content": {
                "application/json": {"schema": signup_body}}})},
        "/auth/v1/token": {"post": _op(
            "Auth", "authToken", "Sign in (password or PKCE code) or refresh a session",
            {"200": _json(_ref("Session")), "404": _r("AuthNotFound"),
             "422": _r("AuthUnprocessable"), **limited}, security=NO_AUTH,
            description="`pkce`: the one-time code that `GET /auth/v1/authorize` (the "
                        "server's own sign-in page) sent to `redirect_to`, with the PKCE "
                        "verifier; each code is accepted once (404 `flow_state_not_found` "
                        "after), expires after 2 minutes (422), and a wrong verifier is 400 "
                        "`bad_code_verifier`. Only failed password sign-ins are rate limited.",
            parameters=[{"name": "grant_type", "in": "query", "required": True,
                         "schema": {"type": "string",
                                    "enum": ["password", "refresh_token", "pkce"]}}],
            requestBody={"required": True, "content": {"application/json": {
                "schema": {"anyOf": [password_grant, refresh_grant, pkce_grant]}}}})},
        "/auth/v1/user": {
            "get": _op("Auth", "authGetUser", "The signed-in user",
                       {"200": user, **token_user}),
            "put": _op("Auth", "authUpdateUser", "Update the signed-in user",
                       {"200": user, "400": _r("AuthBadRequest"),
                        "422": _r("AuthUnprocessable"), **token_user},
                       requestBody={"required": True, "content": {
                           "application/json": {"schema": update_body}}}),
        },
        "/auth/v1/logout": {"post": _op(
            "Auth", "authLogout", "Sign out (revoke refresh tokens)",
            {"204": {"description": "Signed out"}, "400": _r("AuthBadRequest"), **token_user},
            parameters=[_query("scope", {"type": "string",
                                         "enum": ["local", "global", "others"],
                                         "default": "global"})])},
        "/auth/v1/settings": {"get": _op(
            "Auth", "authSettings", "Public auth settings",
            {"200": _json(settings)}, security=NO_AUTH)},
        "/auth/v1/health": {"get": _op(
            "Auth", "authHealth", "Auth service health",
            {"200": _json(_obj({"version": STR, "name": STR, "description": STR},
                               ["name"]))}, security=NO_AUTH)},
        **_authorize_paths(),
        "/auth/v1/.well-known/jwks.json": {"get": _op(
            "Auth", "authJwks", "Public keys for verifying access tokens",
            {"200": _json(jwks)}, security=NO_AUTH)},
    }


# ---------------------------------------------------------------- the document

@functools.lru_cache(maxsize=8)
def _build(server_url: str | None) -> Schema:
    doc: Schema = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": TITLE,
            "version": __version__,
            "description": (
                "Offline clinical case server. Every `/cases` route needs "
                "`Authorization: Bearer <JWT>` (a Supabase access token or one this server "
                "issued via `/auth/v1`). Every error body is `{\"detail\", \"error\"}` with "
                "the same message. Scores are numbers in [0, 1]."),
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [
            {"name": "Cases", "description": "Patient cases."},
            {"name": "Files", "description": "Lab and radiology files."},
            {"name": "Analysis", "description": "Local LLM analysis runs."},
            {"name": "System", "description": "Liveness and readiness."},
            {"name": "Auth", "description": "Local subset of the Supabase Auth REST API "
                                            "(for supabase-js clients)."},
        ],
        "paths": {**_cases_paths(), **_system_paths(), **_ops_paths(), **_auth_paths()},
        "components": {
            "schemas": _schemas(),
            "responses": _responses(),
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                               "bearerFormat": "JWT"}},
        },
    }
    if server_url:
        doc["servers"] = [{"url": server_url.rstrip("/") or "/"}]
    return doc


def build_openapi(server_url: str | None = None) -> dict:
    """The whole OpenAPI document. Pure; built once per ``server_url``.

    Returns a fresh copy so a caller that edits it cannot change the cached document.
    """
    return copy.deepcopy(_build(server_url))

