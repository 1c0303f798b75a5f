-- 0005 audit trail (sqlite): one row per access to patient data, sign-in and administration.
-- Append-only, hash-chained (medmitra/ops/audit.py): "hash" is an HMAC-SHA256 over
-- "prev_hash" and the row's fields, so an edited, deleted or inserted row is detected.
-- No foreign key to cases: the trail outlives the cases it names. Ids are assigned by the
-- chain writer (they are part of the hash), never by the database.
CREATE TABLE "audit_log" (
    "id" INTEGER NOT NULL PRIMARY KEY,
    "ts" VARCHAR(40) NOT NULL,
    "user_id" VARCHAR(64),
    "auth_kind" VARCHAR(16),
    "session_id" VARCHAR(64),
    "action" VARCHAR(32) NOT NULL,
    "method" VARCHAR(8),
    "route" VARCHAR(200),
    "case_ref" VARCHAR(64),
    "file_ref" TEXT,
    "client" VARCHAR(64),
    "status" INT NOT NULL,
    "request_id" VARCHAR(64),
    "detail" VARCHAR(256),
    "prev_hash" VARCHAR(64) NOT NULL,
    "hash" VARCHAR(64) NOT NULL
);
CREATE INDEX "idx_audit_log_user" ON "audit_log" ("user_id", "id");
CREATE INDEX "idx_audit_log_case" ON "audit_log" ("case_ref", "id");
CREATE INDEX "idx_audit_log_ts" ON "audit_log" ("ts");
