-- Workflow cursors (issue 10, SPEC G7): each workflow's committed cursor,
-- moved only in the transaction that ends a run successfully, as a
-- compare-and-set on `version` (0 = never committed). `value` is JSON.
-- A run keeps the cursor it started from, and what became of it, in
-- `runs.cursor` (JSON).
CREATE TABLE cursors (
    workflow    TEXT PRIMARY KEY,
    value       TEXT NOT NULL,
    version     INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    updated_by  TEXT NOT NULL
) WITHOUT ROWID;
ALTER TABLE runs ADD COLUMN cursor TEXT;

-- Poll triggers (issue 10): one row per polling workflow. `owner` and
-- `lease_until` make one process poll at a time (polls never overlap,
-- and each is done once across processes); the rest is what status shows.
-- The keys of items already seen live in `dedupe_keys`, committed with
-- the runs they started.
CREATE TABLE polls (
    workflow          TEXT PRIMARY KEY,
    next_poll_at      INTEGER NOT NULL,
    owner             TEXT,
    lease_until       INTEGER,
    last_poll_at      INTEGER,
    last_success_at   INTEGER,
    last_new_item_at  INTEGER,
    last_error        TEXT,
    failures          INTEGER NOT NULL DEFAULT 0
);
