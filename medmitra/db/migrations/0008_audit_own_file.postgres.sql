-- 0008 (postgres): nothing changes. On SQLite this migration moves the audit trail into a
-- file of its own (0008_audit_own_file.sqlite.sql); on PostgreSQL "audit_log" stays in the
-- database, whose reads are not cached. Kept so both dialects count the same versions.
SELECT 1;
