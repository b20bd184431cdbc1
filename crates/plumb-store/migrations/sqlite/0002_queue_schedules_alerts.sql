-- Queue: a run may carry its workflow's concurrency limit, so a claim can
-- respect it without knowing workflows. `replays` counts dead-letter replays.
ALTER TABLE runs ADD COLUMN max_concurrency INTEGER;
ALTER TABLE runs ADD COLUMN replays INTEGER NOT NULL DEFAULT 0;
CREATE INDEX runs_by_workflow_status ON runs (workflow, status);

-- Failed attempts are kept per replay round, so a replay's attempts do not
-- overwrite the history of the first execution.
CREATE TABLE step_attempts_v2 (
    run_id       TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step_id      TEXT NOT NULL,
    item         INTEGER NOT NULL,
    round        INTEGER NOT NULL,
    attempt      INTEGER NOT NULL,
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER NOT NULL,
    status_code  INTEGER,
    error        TEXT NOT NULL,
    retryable    INTEGER NOT NULL,
    PRIMARY KEY (run_id, step_id, item, round, attempt)
) WITHOUT ROWID;
INSERT INTO step_attempts_v2
    SELECT run_id, step_id, item, 0, attempt, started_at, finished_at, status_code, error, retryable
    FROM step_attempts;
DROP TABLE step_attempts;
ALTER TABLE step_attempts_v2 RENAME TO step_attempts;

-- One row per schedule slot ever considered: fired (run_id set) or skipped
-- by the catch-up policy (run_id NULL). The primary key is what makes a
-- slot fire at most once, across restarts and processes.
CREATE TABLE schedule_fires (
    workflow  TEXT NOT NULL,
    slot      INTEGER NOT NULL,
    run_id    TEXT,
    fired_at  INTEGER NOT NULL,
    PRIMARY KEY (workflow, slot)
) WITHOUT ROWID;

-- Alert outbox: written in the same transaction that fails the run, then
-- delivered (and retried) by `plumb serve`. Never deleted silently: an alert
-- that cannot be delivered ends `failed` and stays visible.
CREATE TABLE alerts (
    id               TEXT PRIMARY KEY,
    run_id           TEXT NOT NULL,
    workflow         TEXT NOT NULL,
    channel          TEXT NOT NULL,
    payload          TEXT NOT NULL,
    status           TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL,
    last_error       TEXT,
    created_at       INTEGER NOT NULL,
    delivered_at     INTEGER
);
CREATE INDEX alerts_due ON alerts (status, next_attempt_at);
