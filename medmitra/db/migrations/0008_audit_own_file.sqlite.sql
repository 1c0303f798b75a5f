-- 0008 (sqlite): the audit trail lives in a file of its own, audit.sqlite3 beside this one
-- (medmitra/ops/audit_store.py), so its batched writes no longer move this file's
-- data_version, the key of the case read cache (db/reads.py). Before this runs, the
-- migration runner has copied every row of "audit_log" into that file and committed it
-- there; a crash in between repeats the copy (rows already there are kept).
DROP TABLE "audit_log";
