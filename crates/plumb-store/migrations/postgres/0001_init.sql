-- plumb's store on PostgreSQL: the same tables as the cumulative SQLite
-- schema (migrations/sqlite/0001..0006), in one script.
--
-- * Times are Unix milliseconds (BIGINT); every whole number is BIGINT, so
--   both backends read the same i64s.
-- * JSON is kept as TEXT: what is read back is byte for byte what was
--   written, and a for_each's item outputs are assembled from the text.
-- * Ids and names that listings order by are COLLATE "C": byte order, as
--   SQLite's, whatever the database's collation; run id prefixes are
--   looked up as ranges of the primary key.

-- Workflow file texts, by SHA-256. A run is pinned to the exact text it
-- started with, so a resume or replay never runs a different definition.
CREATE TABLE workflow_versions (
    hash        TEXT PRIMARY KEY,
    workflow    TEXT NOT NULL,
    file        TEXT NOT NULL,
    source      TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

-- One row per run. The lease columns say which claim may write the run's
-- journal. `strikes` counts claims that did not end cleanly, `not_before`
-- holds a run back after one; every claim and renewal bumps `heartbeat`,
-- and a watcher that sees it unchanged for `lease_ms` expires the lease.
CREATE TABLE runs (
    id                  TEXT COLLATE "C" PRIMARY KEY,
    workflow            TEXT COLLATE "C" NOT NULL,
    version             TEXT NOT NULL REFERENCES workflow_versions(hash),
    trigger_payload     TEXT NOT NULL,
    status              TEXT NOT NULL,
    claims              BIGINT NOT NULL DEFAULT 0,
    created_at          BIGINT NOT NULL,
    started_at          BIGINT,
    finished_at         BIGINT,
    updated_at          BIGINT NOT NULL,
    error               TEXT,
    failed_step         TEXT,
    failed_item         BIGINT,
    failed_attempt      BIGINT,
    failed_status_code  BIGINT,
    lease_owner         TEXT,
    lease_expires_at    BIGINT,
    max_concurrency     BIGINT,
    replays             BIGINT NOT NULL DEFAULT 0,
    strikes             BIGINT NOT NULL DEFAULT 0,
    last_error          TEXT,
    not_before          BIGINT,
    heartbeat           BIGINT NOT NULL DEFAULT 0,
    lease_ms            BIGINT
);
CREATE INDEX runs_by_created ON runs (created_at DESC, id DESC);
CREATE INDEX runs_by_workflow ON runs (workflow, created_at DESC);
CREATE INDEX runs_by_workflow_status ON runs (workflow, status);
-- The two claim lanes, each walked in (created_at, id) order so `LIMIT 1`
-- stops at the first row: interrupted runs (running, no lease) and the
-- queue. Small: ended runs, the bulk of the table, are in neither.
CREATE INDEX runs_interrupted ON runs (created_at, id)
    WHERE status = 'running' AND lease_owner IS NULL;
CREATE INDEX runs_queued ON runs (created_at, id) WHERE status = 'queued';
-- Leased runs, per workflow: the concurrency limit's count and the
-- watchers' listing.
CREATE INDEX runs_leased ON runs (workflow)
    WHERE status = 'running' AND lease_owner IS NOT NULL;

-- The step journal: one row per step (item = -1) and per for_each item.
-- A row whose status is terminal is the committed outcome of that step or
-- item; resume skips it and restores its output.
CREATE TABLE steps (
    run_id       TEXT COLLATE "C" NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step_id      TEXT COLLATE "C" NOT NULL,
    item         BIGINT NOT NULL,
    status       TEXT NOT NULL,
    attempt      BIGINT NOT NULL,
    state        TEXT,
    output       TEXT,
    error        TEXT,
    status_code  BIGINT,
    started_at   BIGINT NOT NULL,
    finished_at  BIGINT,
    PRIMARY KEY (run_id, step_id, item)
);

-- Every failed attempt of a step or item, per replay round, for the
-- timeline. Written only on failure.
CREATE TABLE step_attempts (
    run_id       TEXT COLLATE "C" NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step_id      TEXT COLLATE "C" NOT NULL,
    item         BIGINT NOT NULL,
    round        BIGINT NOT NULL,
    attempt      BIGINT NOT NULL,
    started_at   BIGINT NOT NULL,
    finished_at  BIGINT NOT NULL,
    status_code  BIGINT,
    error        TEXT NOT NULL,
    retryable    BOOLEAN NOT NULL,
    PRIMARY KEY (run_id, step_id, item, round, attempt)
);

-- One row per schedule slot ever considered: fired (run_id set) or skipped
-- by the catch-up policy (run_id NULL). The primary key is what makes a
-- slot fire at most once, across restarts and processes.
CREATE TABLE schedule_fires (
    workflow  TEXT NOT NULL,
    slot      BIGINT NOT NULL,
    run_id    TEXT,
    fired_at  BIGINT NOT NULL,
    PRIMARY KEY (workflow, slot)
);

-- Alert outbox: written in the same transaction that fails the run, then
-- delivered (and retried). An alert that cannot be delivered ends `failed`
-- and stays visible.
CREATE TABLE alerts (
    id               TEXT COLLATE "C" PRIMARY KEY,
    run_id           TEXT NOT NULL,
    workflow         TEXT NOT NULL,
    channel          TEXT NOT NULL,
    payload          TEXT NOT NULL,
    status           TEXT NOT NULL,
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT NOT NULL,
    last_error       TEXT,
    created_at       BIGINT NOT NULL,
    delivered_at     BIGINT
);
CREATE INDEX alerts_due ON alerts (next_attempt_at, id) WHERE status = 'pending';
CREATE INDEX alerts_undelivered ON alerts (created_at DESC, id DESC)
    WHERE status IN ('pending', 'failed');

-- One row rewritten by readiness checks: proves the store can commit now.
CREATE TABLE health (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at  BIGINT NOT NULL
);

-- Sealed secrets: XChaCha20-Poly1305 ciphertexts, never plaintext. key_id is
-- the fingerprint of the master key that sealed the value.
CREATE TABLE secrets (
    name        TEXT COLLATE "C" PRIMARY KEY,
    nonce       BYTEA NOT NULL,
    ciphertext  BYTEA NOT NULL,
    key_id      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    rotated_at  BIGINT,
    updated_at  BIGINT NOT NULL
);

-- API tokens: only a SHA-256 of the token is kept.
CREATE TABLE api_tokens (
    id          TEXT PRIMARY KEY,
    name        TEXT COLLATE "C" NOT NULL UNIQUE,
    role        TEXT NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);

-- The audit log: append-only, each entry carrying the hash of the one
-- before it (a hash chain over a canonical encoding), so an edited,
-- deleted, reordered or inserted entry breaks the chain.
CREATE TABLE audit_log (
    seq        BIGINT PRIMARY KEY,
    at         BIGINT NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    subject    TEXT NOT NULL,
    details    TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);

-- The chain's head, moved in the same transaction as each append. New
-- entries chain from here, not from the last row, so deleting entries at
-- the end leaves a gap that `plumb audit verify` reports. The row exists
-- from the start (seq 0: no entry yet) so that every append can lock it:
-- appends from many processes queue on that lock and never fork the chain.
CREATE TABLE audit_head (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    seq   BIGINT NOT NULL,
    hash  TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- A random secret of this store: a server proves it serves this store by
-- an HMAC of a challenge with it, before the CLI hands it an API token.
-- 64 lowercase hex digits, as on SQLite; gen_random_uuid() draws from the
-- server's strong random source (244 random bits in the two).
CREATE TABLE instance (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    secret  TEXT NOT NULL
);
INSERT INTO instance (id, secret)
VALUES (1, encode(sha256((gen_random_uuid()::text || gen_random_uuid()::text)::bytea), 'hex'));

-- What is deployed: the version (SHA-256 of the file) of plumb.yaml and of
-- each workflow last started or reloaded, so a change is audited once.
CREATE TABLE deployments (
    kind         TEXT NOT NULL,
    name         TEXT NOT NULL,
    version      TEXT NOT NULL,
    file         TEXT NOT NULL,
    deployed_at  BIGINT NOT NULL,
    PRIMARY KEY (kind, name)
);
