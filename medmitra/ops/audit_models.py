"""The tortoise model of the audit trail's table (frozen in migration 0005_audit). Only
medmitra/ops/audit.py writes these rows, always through its chain writer, in plain SQL. On
SQLite the table is in its own file since migration 0008 (ops/audit_store.py), not behind
tortoise's default connection: this model is not queried."""

from __future__ import annotations

from tortoise import fields
from tortoise.models import Model


class AuditEntry(Model):
    id = fields.BigIntField(primary_key=True, generated=False)
    ts = fields.CharField(max_length=40)               # ISO 8601 UTC, hashed as stored
    user_id = fields.CharField(max_length=64, null=True)
    auth_kind = fields.CharField(max_length=16, null=True)
    session_id = fields.CharField(max_length=64, null=True)
    action = fields.CharField(max_length=32)
    method = fields.CharField(max_length=8, null=True)
    route = fields.CharField(max_length=200, null=True)
    case_ref = fields.CharField(max_length=64, null=True)
    file_ref = fields.TextField(null=True)
    client = fields.CharField(max_length=64, null=True)
    status = fields.IntField()
    request_id = fields.CharField(max_length=64, null=True)
    detail = fields.CharField(max_length=256, null=True)
    prev_hash = fields.CharField(max_length=64)
    hash = fields.CharField(max_length=64)

    class Meta:
        table = "audit_log"
