"""tortoise-orm models. The schema itself is created and upgraded by db/migrate.py from the
frozen SQL files in db/migrations/, never by ``generate_schemas`` at run time."""

from __future__ import annotations

from tortoise import fields
from tortoise.models import Model

from medmitra.contract import CaseStatus, JobState


class Case(Model):
    id = fields.IntField(primary_key=True)
    case_id = fields.CharField(max_length=36, unique=True)
    user_id = fields.CharField(max_length=36, db_index=True)
    patient_name = fields.CharField(max_length=512)
    patient_age = fields.IntField()
    patient_gender = fields.CharField(max_length=64)
    case_summary = fields.TextField(null=True)
    status = fields.CharField(max_length=16, default=CaseStatus.PROCESSING.value)
    created_at = fields.DatetimeField()
    updated_at = fields.DatetimeField()

    class Meta:
        table = "cases"


class CaseFile(Model):
    id = fields.IntField(primary_key=True)
    file_id = fields.CharField(max_length=36, unique=True)
    case: fields.ForeignKeyRelation[Case] = fields.ForeignKeyField(
        "models.Case", related_name="files", on_delete=fields.CASCADE)
    user_id = fields.CharField(max_length=36, db_index=True)
    file_name = fields.CharField(max_length=512)
    file_type = fields.CharField(max_length=128)
    file_size = fields.BigIntField()
    file_category = fields.CharField(max_length=16)
    sha256 = fields.CharField(max_length=64)
    text_data = fields.TextField(null=True)
    ai_summary = fields.TextField(null=True)
    uploaded_at = fields.DatetimeField()

    class Meta:
        table = "case_files"


class Insight(Model):
    """One analysis run's output. Every run is kept; the newest is served."""

    id = fields.IntField(primary_key=True)
    case: fields.ForeignKeyRelation[Case] = fields.ForeignKeyField(
        "models.Case", related_name="insights", on_delete=fields.CASCADE)
    job_id = fields.IntField(null=True)
    # Nested ``insights`` shape of the contract (without generated_at/model, kept below).
    data = fields.JSONField()
    model = fields.JSONField()          # name, file, quantization, sha256
    stages = fields.JSONField()         # per-stage duration and token accounting
    generated_at = fields.DatetimeField()
    created_at = fields.DatetimeField()
    updated_at = fields.DatetimeField()

    class Meta:
        table = "ai_insights"


class Job(Model):
    """A durable analysis job. Only medmitra/jobs/queue.py writes these rows."""

    id = fields.IntField(primary_key=True)
    case: fields.ForeignKeyRelation[Case] = fields.ForeignKeyField(
        "models.Case", related_name="jobs", on_delete=fields.CASCADE)
    state = fields.CharField(max_length=16, default=JobState.QUEUED.value, db_index=True)
    stage = fields.CharField(max_length=32, null=True)
    progress = fields.FloatField(default=0.0)
    attempts = fields.IntField(default=0)
    max_attempts = fields.IntField(default=3)
    error = fields.TextField(null=True)
    options = fields.JSONField(default=dict)
    lease_owner = fields.CharField(max_length=64, null=True)
    lease_expires_at = fields.FloatField(null=True)   # unix seconds
    created_at = fields.DatetimeField()
    started_at = fields.DatetimeField(null=True)
    finished_at = fields.DatetimeField(null=True)
    updated_at = fields.DatetimeField()

    class Meta:
        table = "jobs"


class SchemaVersion(Model):
    version = fields.IntField(primary_key=True)
    name = fields.CharField(max_length=128)
    applied_at = fields.DatetimeField()

    class Meta:
        table = "schema_version"
