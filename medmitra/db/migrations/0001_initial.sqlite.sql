-- 0001 initial schema (sqlite): cases, case files, AI insights, analysis jobs.
CREATE TABLE "cases" (
    "id" INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    "case_id" VARCHAR(36) NOT NULL UNIQUE,
    "user_id" VARCHAR(36) NOT NULL,
    "patient_name" VARCHAR(512) NOT NULL,
    "patient_age" INT NOT NULL,
    "patient_gender" VARCHAR(64) NOT NULL,
    "case_summary" TEXT,
    "status" VARCHAR(16) NOT NULL,
    "created_at" TIMESTAMP NOT NULL,
    "updated_at" TIMESTAMP NOT NULL
);
CREATE INDEX "idx_cases_user_id_7854c6" ON "cases" ("user_id");
CREATE TABLE "case_files" (
    "id" INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    "file_id" VARCHAR(36) NOT NULL UNIQUE,
    "user_id" VARCHAR(36) NOT NULL,
    "file_name" VARCHAR(512) NOT NULL,
    "file_type" VARCHAR(128) NOT NULL,
    "file_size" BIGINT NOT NULL,
    "file_category" VARCHAR(16) NOT NULL,
    "sha256" VARCHAR(64) NOT NULL,
    "text_data" TEXT,
    "ai_summary" TEXT,
    "uploaded_at" TIMESTAMP NOT NULL,
    "case_id" INT NOT NULL REFERENCES "cases" ("id") ON DELETE CASCADE
);
CREATE INDEX "idx_case_files_user_id_80c123" ON "case_files" ("user_id");
CREATE TABLE "ai_insights" (
    "id" INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    "job_id" INT,
    "data" JSON NOT NULL,
    "model" JSON NOT NULL,
    "stages" JSON NOT NULL,
    "generated_at" TIMESTAMP NOT NULL,
    "created_at" TIMESTAMP NOT NULL,
    "updated_at" TIMESTAMP NOT NULL,
    "case_id" INT NOT NULL REFERENCES "cases" ("id") ON DELETE CASCADE
);
CREATE TABLE "jobs" (
    "id" INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    "state" VARCHAR(16) NOT NULL,
    "stage" VARCHAR(32),
    "progress" REAL NOT NULL,
    "attempts" INT NOT NULL,
    "max_attempts" INT NOT NULL,
    "error" TEXT,
    "options" JSON NOT NULL,
    "lease_owner" VARCHAR(64),
    "lease_expires_at" REAL,
    "created_at" TIMESTAMP NOT NULL,
    "started_at" TIMESTAMP,
    "finished_at" TIMESTAMP,
    "updated_at" TIMESTAMP NOT NULL,
    "case_id" INT NOT NULL REFERENCES "cases" ("id") ON DELETE CASCADE
);
CREATE INDEX "idx_jobs_state_32c766" ON "jobs" ("state");
