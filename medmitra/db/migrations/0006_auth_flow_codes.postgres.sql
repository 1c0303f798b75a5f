-- 0006 sign-in codes of the PKCE flow (postgres): GET /auth/v1/authorize issues one after a
-- successful sign-in on the server's page; POST /auth/v1/token?grant_type=pkce spends it once.
-- Matches medmitra/db/flow_models.py; frozen.
CREATE TABLE "auth_flow_codes" (
    "id" SERIAL NOT NULL PRIMARY KEY,
    "code_hash" VARCHAR(64) NOT NULL UNIQUE,
    "code_challenge" VARCHAR(128) NOT NULL,
    "challenge_method" VARCHAR(8) NOT NULL,
    "created_at" TIMESTAMPTZ NOT NULL,
    "expires_at" TIMESTAMPTZ NOT NULL,
    "used_at" TIMESTAMPTZ,
    "user_id" VARCHAR(36) NOT NULL REFERENCES "auth_users" ("id") ON DELETE CASCADE
);
-- Expired codes are swept by age; a user's codes go with the user (cascade).
CREATE INDEX "idx_auth_flow_codes_expires" ON "auth_flow_codes" ("expires_at");
CREATE INDEX "idx_auth_flow_codes_user" ON "auth_flow_codes" ("user_id");
