"""medmitra/contract.py against the code that renders, stores and documents its facts: the
renderers produce exactly the declared fields, the columns exist in the models, and the
states the API shows are the ones the queue stores."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest

from medmitra import contract, filetypes
from medmitra.contract import CaseStatus, FileCategory, JobState
from medmitra.db import reads
from medmitra.db.models import Case, CaseFile, Job
from medmitra.services import cases as svc
from medmitra.services.compat import flat_insights

NOW = datetime(2026, 3, 4, 10, 30, tzinfo=timezone.utc)


def test_rendered_columns_are_model_fields() -> None:
    assert set(contract.CASE_COLUMNS) <= set(Case._meta.db_fields)
    assert set(contract.FILE_COLUMNS) <= set(CaseFile._meta.db_fields)
    assert set(contract.CASE_FIELD_SOURCES.values()) <= set(contract.CASE_COLUMNS)
    assert set(contract.SORT_KEYS) <= set(contract.CASE_COLUMNS)


def test_model_defaults_are_contract_states() -> None:
    assert Case._meta.fields_map["status"].default == CaseStatus.PROCESSING
    assert Job._meta.fields_map["state"].default == JobState.QUEUED


def test_case_dict_renders_exactly_the_contract_fields() -> None:
    user = str(uuid.uuid4())
    case = Case(id=7, case_id=str(uuid.uuid4()), user_id=user, patient_name="Asha",
                patient_age=52, patient_gender="female", case_summary=None,
                status=CaseStatus.PROCESSING, created_at=NOW, updated_at=NOW)
    out = svc.case_dict(case)
    assert tuple(out) == contract.CASE_FIELDS
    assert out["doctor_id"] == out["user_id"] == user
    assert out["created_at"] == "2026-03-04T10:30:00+00:00"


def test_file_dict_renders_exactly_the_contract_fields() -> None:
    row = {"id": 3, "file_id": str(uuid.uuid4()), "user_id": str(uuid.uuid4()),
           "file_name": "cbc.csv", "file_type": "text/csv", "file_size": 10,
           "file_category": FileCategory.LAB, "text_data": None, "ai_summary": None,
           "uploaded_at": NOW}
    assert set(row) == set(contract.FILE_COLUMNS)
    out = svc.file_dict(row, "case-uuid", "http://x/files/download/t")
    assert tuple(out) == contract.FILE_FIELDS
    assert "user_id" not in out   # a column that is not part of the file object
    assert out["upload_date"] == out["uploaded_at"] == "2026-03-04T10:30:00+00:00"
    assert out["case_id"] == "case-uuid"


def test_flat_insights_render_exactly_the_contract_fields() -> None:
    out = flat_insights("case-uuid", {}, generated_at="g", created_at="c", updated_at="u")
    assert tuple(out) == contract.FLAT_INSIGHT_FIELDS


@pytest.mark.parametrize("state", list(JobState))
def test_analysis_object_shows_every_job_state_as_an_analysis_state(state: JobState) -> None:
    out = reads.analysis_from_row({"state": state.value, "stage": None, "progress": 0,
                                   "attempts": 1, "error": "why", "started_at": None,
                                   "finished_at": None, "ahead": 0})
    assert tuple(out) == contract.ANALYSIS_FIELDS
    assert out["state"] in contract.ANALYSIS_STATES
    assert (out["error"] is not None) == (state in (JobState.FAILED, JobState.CANCELLED))
    assert (out["queue_position"] == 1) == (state is JobState.QUEUED)


def test_finished_job_states_name_case_statuses() -> None:
    # queue.finish moves the case status to the finished run's state.
    for state in (JobState.COMPLETED, JobState.FAILED):
        assert CaseStatus(state) == state


def test_every_category_accepts_some_content() -> None:
    assert set(filetypes.ACCEPTED) == set(FileCategory)
    assert all(filetypes.ACCEPTED[c] for c in FileCategory)
