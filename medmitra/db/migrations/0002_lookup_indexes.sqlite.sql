-- 0002: indexes for the hot lookups (files of a case, newest insights of a case,
-- queue order, list sorted by creation per user).
CREATE INDEX IF NOT EXISTS "idx_case_files_case" ON "case_files" ("case_id");
CREATE INDEX IF NOT EXISTS "idx_ai_insights_case" ON "ai_insights" ("case_id", "id");
CREATE INDEX IF NOT EXISTS "idx_jobs_case" ON "jobs" ("case_id");
CREATE INDEX IF NOT EXISTS "idx_jobs_state_id" ON "jobs" ("state", "id");
CREATE INDEX IF NOT EXISTS "idx_cases_user_created" ON "cases" ("user_id", "created_at");
