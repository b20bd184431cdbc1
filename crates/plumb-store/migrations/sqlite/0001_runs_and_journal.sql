-- Workflow file texts, by SHA-256. A run is pinned to the exact text it
-- started with, so a resume or replay never runs a different definition.
CREATE TABLE workflow_versions (
    hash        TEXT PRIMARY KEY,
    workflow    TEXT NOT NULL,
    file        TEXT NOT NULL,
    source      TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

-- One row per run. Times are Unix milliseconds. The lease columns say which
-- process may write the run's journal and until when.
CREATE TABLE runs (
    id                  TEXT PRIMARY KEY,
    workflow            TEXT NOT NULL,
    version             TEXT NOT NULL REFERENCES workflow_versions(hash),
    trigger_payload     TEXT NOT NULL,
    status              TEXT NOT NULL,
    claims              INTEGER NOT NULL DEFAULT 0,
    created_at          INTEGER NOT NULL,
    started_at          INTEGER,
    finished_at         INTEGER,
    updated_at          INTEGER NOT NULL,
    error               TEXT,
    failed_step         TEXT,
    failed_item         INTEGER,
    failed_attempt      INTEGER,
    failed_status_code  INTEGER,
    lease_owner         TEXT,
    lease_expires_at    INTEGER
);
CREATE INDEX runs_by_created ON runs (created_at DESC, id DESC);
CREATE INDEX runs_by_workflow ON runs (workflow, created_at DESC);
CREATE INDEX runs_by_status ON runs (status, created_at);

-- The step journal: one row per step (item = -1) and per for_each item.
-- A row whose status is terminal is the committed outcome of that step or
-- item; resume skips it and restores its output.
CREATE TABLE steps (
    run_id       TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step_id      TEXT NOT NULL,
    item         INTEGER NOT NULL,
    status       TEXT NOT NULL,
    attempt      INTEGER NOT NULL,
    state        TEXT,
    output       TEXT,
    error        TEXT,
    status_code  INTEGER,
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER,
    PRIMARY KEY (run_id, step_id, item)
) WITHOUT ROWID;

-- Every failed attempt of a step or item, for the timeline. Written only on
-- failure, so the happy path pays nothing for it.
CREATE TABLE step_attempts (
    run_id       TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step_id      TEXT NOT NULL,
    item         INTEGER NOT NULL,
    attempt      INTEGER NOT NULL,
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER NOT NULL,
    status_code  INTEGER,
    error        TEXT NOT NULL,
    retryable    INTEGER NOT NULL,
    PRIMARY KEY (run_id, step_id, item, attempt)
) WITHOUT ROWID;
