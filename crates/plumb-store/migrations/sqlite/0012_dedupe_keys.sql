-- Trigger dedupe (issue 10): the key of each event that started a run,
-- committed in the same transaction as the run, so two deliveries of one
-- event start exactly one run. A key counts until `expires_at` (its
-- window); the purge job deletes it afterwards. `key` is the SHA-256 of
-- the evaluated key (hex): an event's identity, never its content.
CREATE TABLE dedupe_keys (
    workflow    TEXT NOT NULL,
    key         TEXT NOT NULL,
    run_id      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    PRIMARY KEY (workflow, key)
) WITHOUT ROWID;
CREATE INDEX dedupe_keys_expiry ON dedupe_keys (expires_at);
