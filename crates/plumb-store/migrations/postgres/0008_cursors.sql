-- Workflow cursors (issue 10, SPEC G7): each workflow's committed cursor,
-- moved only in the transaction that ends a run successfully, as a
-- compare-and-set on `version` (0 = never committed). `value` is JSON.
-- A run keeps the cursor it started from, and what became of it, in
-- `runs.cursor` (JSON).
CREATE TABLE cursors (
    workflow    TEXT PRIMARY KEY,
    value       TEXT NOT NULL,
    version     BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    updated_by  TEXT NOT NULL
);
ALTER TABLE runs ADD COLUMN cursor TEXT;
