"""Models of the local Supabase Auth subset (users, sessions, refresh tokens, signing keys).

The schema is created by migrations 0003_auth and 0007 (frozen SQL), never by ``generate_schemas``.
"""

from __future__ import annotations

from tortoise import fields
from tortoise.models import Model


class AuthUser(Model):
    # The UUID string is the access token's ``sub`` and the owner id of cases.
    id = fields.CharField(max_length=36, primary_key=True)
    # Stored normalised (trimmed, lower-case), so the unique index is case-insensitive.
    email = fields.CharField(max_length=320, unique=True)
    password_hash = fields.CharField(max_length=512)
    role = fields.CharField(max_length=32, default="authenticated")
    app_metadata = fields.JSONField(default=dict)
    user_metadata = fields.JSONField(default=dict)
    # Set = the account may not sign in and its sessions are refused ("banned" in Supabase).
    disabled_at = fields.DatetimeField(null=True)
    email_confirmed_at = fields.DatetimeField(null=True)
    last_sign_in_at = fields.DatetimeField(null=True)
    created_at = fields.DatetimeField()
    updated_at = fields.DatetimeField()

    class Meta:
        table = "auth_users"


class AuthSession(Model):
    # One sign-in; its id is the access token's ``session_id`` claim.

    id = fields.CharField(max_length=36, primary_key=True)
    user: fields.ForeignKeyRelation[AuthUser] = fields.ForeignKeyField(
        "models.AuthUser", related_name="sessions", on_delete=fields.CASCADE)
    created_at = fields.DatetimeField()
    refreshed_at = fields.DatetimeField(null=True)
    # Set = logged out, password changed, user disabled or refresh token replayed.
    revoked_at = fields.DatetimeField(null=True)
    revoke_reason = fields.CharField(max_length=32, null=True)

    class Meta:
        table = "auth_sessions"


class AuthRefreshToken(Model):
    # Single-use refresh token; only its SHA-256 is stored, so a copied database cannot be
    # used to mint sessions.

    id = fields.IntField(primary_key=True)
    token_hash = fields.CharField(max_length=64, unique=True)
    session: fields.ForeignKeyRelation[AuthSession] = fields.ForeignKeyField(
        "models.AuthSession", related_name="refresh_tokens", on_delete=fields.CASCADE)
    parent_id = fields.IntField(null=True)   # the token this one replaced (audit trail)
    created_at = fields.DatetimeField()
    used_at = fields.DatetimeField(null=True)

    class Meta:
        table = "auth_refresh_tokens"


class AuthSigningKey(Model):
    # An ES256 key; the private half lives in a 0600 file in the data dir (signing.py).

    kid = fields.CharField(max_length=64, primary_key=True)
    alg = fields.CharField(max_length=8, default="ES256")
    public_jwk = fields.JSONField()
    created_at = fields.DatetimeField()
    # Set = no longer signs; still published and accepted until ``verify_until``.
    retired_at = fields.DatetimeField(null=True)
    verify_until = fields.DatetimeField(null=True)
    # Set = compromised: refused at once, whatever ``verify_until`` says (migration 0007).
    revoked_at = fields.DatetimeField(null=True)

    class Meta:
        table = "auth_signing_keys"


class AuthApiToken(Model):
    # A token made by ``medmitra token create``; its id is the token's ``session_id`` claim.
    # ``user_id`` has no foreign key: it may name a user of a Supabase project, not a local one.

    id = fields.CharField(max_length=36, primary_key=True)
    user_id = fields.CharField(max_length=36)
    label = fields.CharField(max_length=200, null=True)
    kid = fields.CharField(max_length=64, null=True)   # the signing key, for the audit trail
    created_at = fields.DatetimeField()
    expires_at = fields.DatetimeField()
    revoked_at = fields.DatetimeField(null=True)
    revoke_reason = fields.CharField(max_length=32, null=True)

    class Meta:
        table = "auth_api_tokens"
