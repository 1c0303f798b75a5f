"""Sign-in codes of the PKCE flow (GET /auth/v1/authorize -> POST /token?grant_type=pkce).

The schema is created by migration 0006_auth_flow_codes (frozen SQL), never by
``generate_schemas``. Only the code's SHA-256 is stored, as for refresh tokens.
"""

from __future__ import annotations

from tortoise import fields
from tortoise.models import Model


class AuthFlowCode(Model):
    id = fields.IntField(primary_key=True)
    code_hash = fields.CharField(max_length=64, unique=True)
    user: fields.ForeignKeyRelation = fields.ForeignKeyField(
        "models.AuthUser", related_name="flow_codes", on_delete=fields.CASCADE)
    code_challenge = fields.CharField(max_length=128)
    # "s256" or "plain", as the client sent it (lower case).
    challenge_method = fields.CharField(max_length=8)
    created_at = fields.DatetimeField()
    expires_at = fields.DatetimeField()
    # Set by the one exchange that wins; a code is never accepted twice.
    used_at = fields.DatetimeField(null=True)

    class Meta:
        table = "auth_flow_codes"
