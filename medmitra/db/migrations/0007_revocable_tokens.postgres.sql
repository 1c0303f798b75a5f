-- 0007 revocable tokens (postgres): tokens made by `medmitra token create` get a row each, so
-- disable, reset-password and `tokens revoke` can refuse them; a signing key can be revoked
-- (refused at once) instead of only retired (accepted until its tokens expire).
CREATE TABLE "auth_api_tokens" (
    "id" VARCHAR(36) NOT NULL PRIMARY KEY,
    "user_id" VARCHAR(36) NOT NULL,
    "label" VARCHAR(200),
    "kid" VARCHAR(64),
    "created_at" TIMESTAMPTZ NOT NULL,
    "expires_at" TIMESTAMPTZ NOT NULL,
    "revoked_at" TIMESTAMPTZ,
    "revoke_reason" VARCHAR(32)
);
CREATE INDEX "idx_auth_api_tokens_user" ON "auth_api_tokens" ("user_id");
ALTER TABLE "auth_signing_keys" ADD COLUMN "revoked_at" TIMESTAMPTZ;
