-- 0003 local Supabase Auth subset (postgres): signing keys, users, sessions, refresh tokens.
-- Generated from medmitra/db/auth_models.py with tortoise.utils.get_schema_sql, then frozen.
CREATE TABLE "auth_signing_keys" (
    "kid" VARCHAR(64) NOT NULL PRIMARY KEY,
    "alg" VARCHAR(8) NOT NULL,
    "public_jwk" JSONB NOT NULL,
    "created_at" TIMESTAMPTZ NOT NULL,
    "retired_at" TIMESTAMPTZ,
    "verify_until" TIMESTAMPTZ
);
CREATE TABLE "auth_users" (
    "id" VARCHAR(36) NOT NULL PRIMARY KEY,
    "email" VARCHAR(320) NOT NULL UNIQUE,
    "password_hash" VARCHAR(512) NOT NULL,
    "role" VARCHAR(32) NOT NULL,
    "app_metadata" JSONB NOT NULL,
    "user_metadata" JSONB NOT NULL,
    "disabled_at" TIMESTAMPTZ,
    "email_confirmed_at" TIMESTAMPTZ,
    "last_sign_in_at" TIMESTAMPTZ,
    "created_at" TIMESTAMPTZ NOT NULL,
    "updated_at" TIMESTAMPTZ NOT NULL
);
CREATE TABLE "auth_sessions" (
    "id" VARCHAR(36) NOT NULL PRIMARY KEY,
    "created_at" TIMESTAMPTZ NOT NULL,
    "refreshed_at" TIMESTAMPTZ,
    "revoked_at" TIMESTAMPTZ,
    "revoke_reason" VARCHAR(32),
    "user_id" VARCHAR(36) NOT NULL REFERENCES "auth_users" ("id") ON DELETE CASCADE
);
CREATE TABLE "auth_refresh_tokens" (
    "id" SERIAL NOT NULL PRIMARY KEY,
    "token_hash" VARCHAR(64) NOT NULL UNIQUE,
    "parent_id" INT,
    "created_at" TIMESTAMPTZ NOT NULL,
    "used_at" TIMESTAMPTZ,
    "session_id" VARCHAR(36) NOT NULL REFERENCES "auth_sessions" ("id") ON DELETE CASCADE
);
-- Hot lookups: a user's sessions (revoke all on password change / disable), a session's
-- refresh tokens (revoke the chain on replay).
CREATE INDEX "idx_auth_sessions_user" ON "auth_sessions" ("user_id");
CREATE INDEX "idx_auth_refresh_tokens_session" ON "auth_refresh_tokens" ("session_id");
