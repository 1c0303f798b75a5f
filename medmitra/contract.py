"""The HTTP contract's facts, declared once.

States, sort keys, categories, bounds and the field lists of every output object live
here; the OpenAPI document (api/openapi.py), the validation (services/cases.py,
api/cases.py), the SQL column lists and renderers (db/reads.py), the models' defaults
(db/models.py) and the tests all derive from these names instead of repeating them.

Limits an operator may change (name and text lengths, file sizes, files per request) are
settings in ``medmitra.config``, not contract facts.
"""

from __future__ import annotations

from enum import StrEnum

# -- states ------------------------------------------------------------------------------
# StrEnum members are ``str``: they compare equal to the stored text and render as it in
# JSON and SQL.


class CaseStatus(StrEnum):
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


class JobState(StrEnum):
    """A row of the durable queue: queued -> running -> completed | failed, or cancelled
    (superseded by a newer run, or the case deleted)."""
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Unfinished runs: the ones a newer request supersedes.
JOB_ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING)
# The API's ``analysis.state`` shows a cancelled run as failed.
ANALYSIS_STATES = tuple(s for s in JobState if s is not JobState.CANCELLED)


def analysis_state(job_state: str) -> JobState:
    state = JobState(job_state)
    return JobState.FAILED if state is JobState.CANCELLED else state


class ModelState(StrEnum):
    """The model of the worker pool, as /health shows it."""
    LOADING = "loading"
    READY = "ready"
    MISSING = "missing"      # no file yet / inference server unreachable: retried
    ERROR = "error"          # the file is broken: not retried
    DISABLED = "disabled"    # no workers configured (an API-only node)


class WorkerState(StrEnum):
    LOADING = "loading"      # loading its model (or waiting for the file to appear)
    IDLE = "idle"
    BUSY = "busy"
    STOPPED = "stopped"


class FileCategory(StrEnum):
    LAB = "lab"
    RADIOLOGY = "radiology"


# -- identifiers and bounds --------------------------------------------------------------

# Ids are tortoise IntFields: 32-bit (SERIAL) on PostgreSQL.
MAX_ID = 2**31 - 1
AGE_MIN_YEARS = 0
AGE_MAX_YEARS = 150
GENDER_MAX_CHARS = 64
SEARCH_MAX_CHARS = 200
PAGE_MAX = 1_000_000
PAGE_LIMIT_MAX = 100
CONFIDENCE_MIN = 0
CONFIDENCE_MAX = 1

# -- listing -----------------------------------------------------------------------------

SORT_KEYS = ("created_at", "updated_at", "patient_name", "patient_age")
DEFAULT_SORT_KEY = "created_at"
SORT_ORDERS = ("asc", "desc")
DEFAULT_SORT_ORDER = "desc"

# -- input fields ------------------------------------------------------------------------

# Form fields of POST /cases/create_case (besides the files and user_id).
CASE_CREATE_FIELDS = ("patient_name", "patient_age", "patient_gender", "case_summary")
# JSON keys PUT /cases/cases/{id} changes; any other key is ignored.
CASE_UPDATE_FIELDS = ("patient_name", "patient_age", "patient_gender", "case_summary",
                      "status")
# File fields of create_case, and the category each one files its uploads under.
CREATE_FILE_FIELDS = {"lab_files": FileCategory.LAB,
                      "radiology_files": FileCategory.RADIOLOGY}
# File fields of POST /cases/upload (the category is a form field, or inferred).
UPLOAD_FILE_FIELDS = ("file", "files")

# POST /cases/analyze/{id} body: the original's camelCase switches -> pipeline option names
# (``pipeline.types.AnalysisOptions``), and the one numeric option.
ANALYZE_OPTIONS = {
    "includeDifferentialDiagnosis": "include_differential",
    "includeTreatmentSuggestions": "include_treatment",
    "includeLabInterpretation": "include_lab_interpretation",
    "includeImagingAnalysis": "include_imaging",
}
ANALYZE_THRESHOLD = ("confidenceThreshold", "confidence_threshold")

# -- output shapes -----------------------------------------------------------------------

# The stored columns a case is rendered from, and the fields of the rendered object (in
# order). An output field that repeats another column names it in the alias table.
CASE_COLUMNS = ("id", "case_id", "user_id", "patient_name", "patient_age", "patient_gender",
                "case_summary", "status", "created_at", "updated_at")
CASE_FIELDS = ("id", "case_id", "doctor_id", "user_id", "patient_name", "patient_age",
               "patient_gender", "case_summary", "status", "created_at", "updated_at")
CASE_FIELD_SOURCES = {"doctor_id": "user_id"}
CASE_TIMESTAMPS = ("created_at", "updated_at")

FILE_COLUMNS = ("id", "file_id", "user_id", "file_name", "file_type", "file_size",
                "file_category", "text_data", "ai_summary", "uploaded_at")
# ``case_id`` is the case's UUID and ``file_url`` a signed link, both supplied by the
# caller; ``upload_date`` repeats ``uploaded_at``.
FILE_FIELDS = ("id", "file_id", "case_id", "file_name", "file_type", "file_size",
               "file_category", "file_url", "upload_date", "uploaded_at", "text_data",
               "ai_summary")

ANALYSIS_FIELDS = ("state", "stage", "progress", "queue_position", "error", "started_at",
                   "finished_at", "attempts")

# The flat ``ai_insights`` object the original frontend reads.
FLAT_INSIGHT_FIELDS = (
    "case_id", "comprehensive_summary", "key_findings", "patient_context", "doctor_notes",
    "lab_summary", "radiology_summary", "case_summary_confidence_score", "soap_subjective",
    "soap_objective", "soap_assessment", "soap_plan", "soap_confidence_score",
    "primary_diagnosis", "icd_code", "diagnosis_description", "diagnosis_confidence_score",
    "supporting_evidence", "overall_confidence_score", "generated_at", "created_at",
    "updated_at")
# The nested ``insights`` object the API docs describe.
INSIGHT_FIELDS = ("case_summary", "soap_note", "primary_diagnosis", "differential_diagnoses",
                  "investigation_recommendations", "treatment_recommendations",
                  "overall_confidence_score", "generated_at", "model",
                  # wave 2 (issue 9): facts, checks and the model's label
                  "labs", "lab_counts", "grounding", "stages", "model_info")
