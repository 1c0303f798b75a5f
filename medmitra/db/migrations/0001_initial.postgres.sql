-- 0001 initial schema (postgres): cases, case files, AI insights, analysis jobs.
CREATE TABLE "cases" (
    "id" SERIAL NOT NULL PRIMARY KEY,
    "case_id" VARCHAR(36) NOT NULL UNIQUE,
    "user_id" VARCHAR(36) NOT NULL,
    "patient_name" VARCHAR(512) NOT NULL,
    "patient_age" INT NOT NULL,
    "patient_gender" VARCHAR(64) NOT NULL,
    "case_summary" TEXT,
    "status" VARCHAR(16) NOT NULL,
    "created_at" TIMESTAMPTZ NOT NULL,
    "updated_at" TIMESTAMPTZ NOT NULL
);
CREATE INDEX "idx_cases_user_id_7854c6" ON "cases" ("user_id");
CREATE TABLE "case_files" (
    "id" SERIAL NOT NULL PRIMARY KEY,
    "file_id" VARCHAR(36) NOT NULL UNIQUE,
    "user_id" VARCHAR(36) NOT NULL,
    "file_name" VARCHAR(512) NOT NULL,
    "file_type" VARCHAR(128) NOT NULL,
    "file_size" BIGINT NOT NULL,
    "file_category" VARCHAR(16) NOT NULL,
    "sha256" VARCHAR(64) NOT NULL,
    "text_data" TEXT,
    "ai_summary" TEXT,
    "uploaded_at" TIMESTAMPTZ NOT NULL,
    "case_id" INT NOT NULL REFERENCES "cases" ("id") ON DELETE CASCADE
);
CREATE INDEX "idx_case_files_user_id_80c123" ON "case_files" ("user_id");
CREATE TABLE "ai_insights" (
    "id" SERIAL NOT NULL PRIMARY KEY,
    "job_id" INT,
    "data" JSONB NOT NULL,
    "model" JSONB NOT NULL,
    "stages" JSONB NOT NULL,
    "generated_at" TIMESTAMPTZ NOT NULL,
    "created_at" TIMESTAMPTZ NOT NULL,
    "updated_at" TIMESTAMPTZ NOT NULL,
    "case_id" INT NOT NULL REFERENCES "cases" ("id") ON DELETE CASCADE
);
COMMENT ON TABLE "ai_insights" IS 'One analysis run''s output. Every run is kept; the newest is served.';
CREATE TABLE "jobs" (
    "id" SERIAL NOT NULL PRIMARY KEY,
    "state" VARCHAR(16) NOT NULL,
    "stage" VARCHAR(32),
    "progress" DOUBLE PRECISION NOT NULL,
    "attempts" INT NOT NULL,
    "max_attempts" INT NOT NULL,
    "error" TEXT,
    "options" JSONB NOT NULL,
    "lease_owner" VARCHAR(64),
    "lease_expires_at" DOUBLE PRECISION,
    "created_at" TIMESTAMPTZ NOT NULL,
    "started_at" TIMESTAMPTZ,
    "finished_at" TIMESTAMPTZ,
    "updated_at" TIMESTAMPTZ NOT NULL,
    "case_id" INT NOT NULL REFERENCES "cases" ("id") ON DELETE CASCADE
);
CREATE INDEX "idx_jobs_state_32c766" ON "jobs" ("state");
COMMENT ON TABLE "jobs" IS 'A durable analysis job. Only medmitra/jobs/queue.py writes these rows.';
