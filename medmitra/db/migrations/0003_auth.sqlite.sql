-- 0003 local Supabase Auth subset (sqlite): signing keys, users, sessions, refresh tokens.
-- Generated from medmitra/db/auth_models.py with tortoise.utils.get_schema_sql, then frozen.
CREATE TABLE "auth_signing_keys" (
    "kid" VARCHAR(64) NOT NULL PRIMARY KEY,
    "alg" VARCHAR(8) NOT NULL,
    "public_jwk" JSON NOT NULL,
    "created_at" TIMESTAMP NOT NULL,
    "retired_at" TIMESTAMP,
    "verify_until" TIMESTAMP
);
CREATE TABLE "auth_users" (
    "id" VARCHAR(36) NOT NULL PRIMARY KEY,
    "email" VARCHAR(320) NOT NULL UNIQUE,
    "password_hash" VARCHAR(512) NOT NULL,
    "role" VARCHAR(32) NOT NULL,
    "app_metadata" JSON NOT NULL,
    "user_metadata" JSON NOT NULL,
    "disabled_at" TIMESTAMP,
    "email_confirmed_at" TIMESTAMP,
    "last_sign_in_at" TIMESTAMP,
    "created_at" TIMESTAMP NOT NULL,
    "updated_at" TIMESTAMP NOT NULL
);
CREATE TABLE "auth_sessions" (
    "id" VARCHAR(36) NOT NULL PRIMARY KEY,
    "created_at" TIMESTAMP NOT NULL,
    "refreshed_at" TIMESTAMP,
    "revoked_at" TIMESTAMP,
    "revoke_reason" VARCHAR(32),
    "user_id" VARCHAR(36) NOT NULL REFERENCES "auth_users" ("id") ON DELETE CASCADE
);
CREATE TABLE "auth_refresh_tokens" (
    "id" INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    "token_hash" VARCHAR(64) NOT NULL UNIQUE,
    "parent_id" INT,
    "created_at" TIMESTAMP NOT NULL,
    "used_at" TIMESTAMP,
    "session_id" VARCHAR(36) NOT NULL REFERENCES "auth_sessions" ("id") ON DELETE CASCADE
);
-- Hot lookups: a user's sessions (revoke all on password change / disable), a session's
-- refresh tokens (revoke the chain on replay).
CREATE INDEX "idx_auth_sessions_user" ON "auth_sessions" ("user_id");
CREATE INDEX "idx_auth_refresh_tokens_session" ON "auth_refresh_tokens" ("session_id");
