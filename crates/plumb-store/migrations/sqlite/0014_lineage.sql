-- Record lineage (issue 11): which runs, steps and items touched a business
-- record (a workflow's `record_key`), in time order. Rows go with their run
-- (ON DELETE CASCADE), so retention purges them with it.
CREATE TABLE lineage (
    id              TEXT PRIMARY KEY,
    record_key      TEXT NOT NULL,
    workflow        TEXT NOT NULL,
    run_id          TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step_id         TEXT,
    item            INTEGER,
    event           TEXT NOT NULL,
    attempt         INTEGER,
    idempotency_key TEXT,
    effect          TEXT,
    detail          TEXT,
    at              INTEGER NOT NULL
);
CREATE INDEX lineage_by_key ON lineage (record_key, at);
CREATE INDEX lineage_by_run ON lineage (run_id);
